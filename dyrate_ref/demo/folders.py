"""The demo's new folders (an exported dataset, a trained checkpoint): checked before any work, created
whole or not at all, like files.py's files."""

from __future__ import annotations

import os
import shutil
import tempfile

from ..commands import UserError
from ..files import check_parent, usual_mode


def check_new_folder(path: str, flag: str):
    """A folder a command will create (whole, write_atomic_dir): it must not exist yet, its parent must."""
    if not path.strip():
        raise UserError(f"{flag} is empty; give the name of a new folder")
    if os.path.exists(path):
        raise UserError(f"{flag} {path} already exists; give a new folder name (nothing is overwritten)")
    check_parent(path, flag)


def write_atomic_dir(path: str, write):
    """Call write(tmp_dir) on a new folder beside `path`, then rename it to `path`, which must not exist:
    a failure leaves no partial folder. The folder gets the usual mode (0777 less the umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.normpath(path)) + "-", suffix=".tmp", dir=folder)
    try:
        write(tmp)
        usual_mode(tmp, 0o777)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
