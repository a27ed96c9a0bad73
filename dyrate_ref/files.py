"""Output files: checked before any work (check_outputs and friends), written whole or not at all."""

from __future__ import annotations

import os
import tempfile

from .commands import UserError


def write_atomic(path: str, write):
    """Call write(tmp_path) on a temporary file beside `path`, then rename it onto `path`: a failure
    never leaves a partial file and never touches an existing one. The file gets the mode any program's
    new file gets (0666 less the umask), not mkstemp's private 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + "-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        usual_mode(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def usual_mode(path: str, base: int):
    """The mode any program's new file (0o666) or folder (0o777) gets: less the umask (which can only be
    read by setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, base & ~umask)


# ----------------------------------------------------------------------------------------------------
# Checking output paths before any work: every command's outputs go through these, so a mistake is one
# line and exit 2 before anything slow runs, and nothing the user gave us is ever overwritten.


def _inside(path: str, folder: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, top]) == top


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs, inputs=()):
    """outputs: [(flag, path or None)] of files a command will write; inputs: [(what, path or None)] it
    reads (a folder stands for every file in it). Refused with a UserError, before any work: an output
    that is a directory, whose folder does not exist or is not writable, that is one of the inputs (or
    inside an input folder), or that is another output of the same run."""
    outputs = [(flag, path) for flag, path in outputs if path is not None]
    for i, (flag, path) in enumerate(outputs):
        if not path.strip():
            raise UserError(f"{flag} is empty; give a file name")
        if os.path.isdir(path):
            raise UserError(f"{flag} {path} is a directory; give a file name")
        check_parent(path, flag)
        for what, source in inputs:
            if source is None:
                continue
            if (os.path.isdir(source) and _inside(path, source)) or _same_file(path, source):
                raise UserError(f"{flag} {path} would overwrite {what} ({source}); write the output elsewhere")
        for other_flag, other in outputs[:i]:
            if _same_file(path, other):
                raise UserError(f"{flag} and {other_flag} are the same file ({path}); give each its own")


def check_input_file(path: str, flag: str, what: str):
    """A file a command reads, named by `flag` (or by what it is) and described by `what` ("a trace
    file"): refused with one line when the path is empty, a folder or missing, before anything opens it."""
    if not path.strip():
        raise UserError(f"{flag} is empty; give {what}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give {what}")
    if not os.path.exists(path):
        raise UserError(f"{flag} {path} does not exist; give {what}")


def checkpoint_inputs(weights_dir: str, files: list[str] | None = None, flag: str = "--weights") -> list[tuple[str, str]]:
    """The one rule for a checkpoint folder among check_outputs' inputs. A command that runs a model reads
    files beside its weights (a predictor, a VTW calibration, the examples): the whole folder is its input
    and no output may go inside it. A command whose output belongs beside the weights (calibrate_vtw,
    train_predictor: the very files the methods will read) passes the files it does read (`files`:
    loading.weight_inputs), none of which an output may replace."""
    if files is None:
        return [(f"a file of the {flag} folder", weights_dir)]
    return [(f"a file the {flag} folder gives the model ({os.path.basename(f)})", f) for f in files]


def check_parent(path: str, flag: str):
    """The folder an output goes into exists and is writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: folder {folder} is not writable")


def check_folder(path: str, flag: str):
    """A folder a command writes files into: an existing, writable one, or a new one whose parent exists
    (the command creates it when it writes, so a run refused later leaves nothing behind)."""
    if not path.strip():
        raise UserError(f"{flag} is empty; give a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder; give a folder to write the figures into")
    where = path if os.path.isdir(path) else (os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(where):
        raise UserError(f"{flag} {path}: its parent folder {where} does not exist; create it first")
    if not os.access(where, os.W_OK):
        raise UserError(f"{flag} {path}: {'folder' if where == path else 'parent folder'} is not writable")
