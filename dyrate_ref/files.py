"""Writing output files whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile


def write_atomic(path: str, write):
    """Call write(tmp_path) on a temporary file beside `path`, then rename it onto `path`: a failure
    never leaves a partial file and never touches an existing one. The file gets the mode any program's
    new file gets (0666 less the umask), not mkstemp's private 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + "-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        _usual_mode(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _usual_mode(path: str, base: int):
    """The mode any program's new file (0o666) or folder (0o777) gets: less the umask (which can only be
    read by setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, base & ~umask)


def write_json(path: str, obj):
    """JSON, indented for a reader, written whole or not at all."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    write_atomic(path, write)


def write_atomic_dir(path: str, write):
    """Call write(tmp_dir) on a new folder beside `path`, then rename it to `path`, which must not exist:
    a failure leaves no partial folder. The folder gets the usual mode (0777 less the umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.normpath(path)) + "-", suffix=".tmp", dir=folder)
    try:
        write(tmp)
        _usual_mode(tmp, 0o777)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
