"""What every command shares: the one exception type for problems the user can fix and the one wrapper
that turns it into an exit (generate.py runs inside `exits()`, each tool through `command_main`), the
parser whose usage errors are one line, the flags several commands share, and the progress bar.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from contextlib import contextmanager


class UserError(Exception):
    """Something the user gave us is wrong; the message says what and what to do."""


@contextmanager
def exits():
    """The body of a command: a UserError becomes 'error: ...' on stderr and exit status 2, Ctrl-C exit
    130, a reader that went away (`... | head`) a quiet exit 141; anything else is a bug and keeps its
    traceback."""
    try:
        yield
    except UserError as e:
        sys.stdout.flush()
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BrokenPipeError:  # stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


def command_main(run, argv=None):
    """A tool's main: run(argv) -> exit code (None means 0) inside exits(), then exit with the code."""
    with exits():
        code = run(argv) or 0
    sys.exit(code)


def summary(doc: str) -> str:
    """A module docstring's first sentence, whole (it may wrap over lines): what a command's --help says
    it does, never cut mid-sentence."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.?!])(\s|$)", paragraph)
    return m.group(1) if m else paragraph.rstrip(":") + "."


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a UserError: one line (no usage dump) and exit 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def parse_first(build_parser, name: str):
    """A command's flags parsed before its heavy imports, when its module runs as the command (`name` is
    "__main__"): --help and a flag error then answer at once instead of after importing torch (seconds).
    A flag error is the usual one line and exit 2; run() parses again (cheap) and does the rest."""
    if name != "__main__":
        return
    try:
        build_parser().parse_args()
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


# The embedded demo model, the default of every command that reads weights (torch-free, so that --help
# and flag errors answer before torch loads).
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "dyrate-shapes")

# A tool's method spec (evaluate --extra): the registry's names (tools/baselines.REGISTRY; a test checks them).
SPEC_FORM = ("NAME[:setting=value...], NAME a method or baseline (none, fastv, vtw, dyrate, dyrate-schedule, mass, "
             "random), the settings its own, as generate.py's flags (e.g. fastv:layer=1:rate=0.75, "
             "dyrate-schedule:schedule=0.5,0.9, dyrate:predictor=FILE:confidence=0.6, random:layer=1:rate=0.75, "
             "mass:mass=0.8)")
DTYPE_HELP = "auto (float32 on the CPU, float16 on CUDA), float32, float16 or bfloat16"


# ----------------------------------------------------------------------------------------------------
# The flags several commands share, declared and checked in one place: the checkpoint (--weights), the
# device and dtype, and torch's CPU threads. Each command's own flags stay in the command.


def add_weights(p, default: str | None = None, required: bool = False, help: str = "llava-hf checkpoint directory"):
    p.add_argument("--weights", default=default, required=required, help=help)


def add_device(p, default: str = "cpu", help: str = "cpu (default) or cuda"):
    p.add_argument("--device", default=default, help=help)


def add_dtype(p, help: str = DTYPE_HELP):
    p.add_argument("--dtype", default="auto", help=help)


def add_threads(p, help: str = "torch CPU threads (default: torch's choice, one per core; on a busy machine 1 is faster)"):
    p.add_argument("--threads", type=int, default=None, help=help)


def apply_threads(threads: int | None):
    """--threads: checked against this machine's cores, then given to torch (None: torch's choice)."""
    if threads is None:
        return
    import torch
    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise UserError(f"--threads {threads} must lie in 1..{cores} (this machine's cores)")
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# A one-line progress bar on stderr, for anything slow (loading a 7B checkpoint, training, evaluation).


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Appears only once a job has taken over `after_s` seconds; counts whole units, or bytes (shown in
    MB below 1 GB, else GB), with the elapsed time, the rate and the time left (ETA). On a terminal the
    line redraws itself in place; into a pipe or a log file a new line is written every `every_s`
    seconds and once when the job ends, so a log of a long run shows where it is without holding
    hundreds of carriage returns."""

    def __init__(self, total: float, label: str, unit: str = "", bytes_: bool = False, after_s: float = 1.0,
                 every_s: float = 10.0):
        self.total, self.label, self.unit = total, label, unit
        self.scale, self.unit = (1.0, unit) if not bytes_ else ((1e6, " MB") if total < 1e9 else (1e9, " GB"))
        self.start, self.after_s, self.done, self.shown = time.time(), after_s, 0.0, False
        self.every_s = every_s
        self.written_at = self.start  # into a pipe: when a line was last written (the first comes every_s in)
        self.tty = sys.stderr.isatty()
        self.last = ""

    def line(self, note: str = "") -> str:
        elapsed = time.time() - self.start
        frac = min(1.0, self.done / max(self.total, 1e-9))
        bar = "#" * int(30 * frac)
        if self.scale == 1.0:
            count = f"{int(self.done)}/{int(self.total)}"
            rate = f"{self.done / elapsed:.2f}{self.unit}/s" if elapsed > 0 else ""
        else:
            count = f"{self.done / self.scale:.1f}/{self.total / self.scale:.1f}"
            rate = f"{self.done / self.scale / elapsed:.1f}{self.unit}/s" if elapsed > 0 else ""
        eta = ""
        if 0 < self.done < self.total and elapsed > 0:
            eta = f"ETA {_duration((self.total - self.done) * elapsed / self.done)}"
        return " ".join(p for p in (f"{self.label} [{bar:<30}] {count}{self.unit}", _duration(elapsed), rate.strip(),
                                    eta, note) if p)

    def update(self, n: float = 1, note: str = ""):
        self.done += n
        now = time.time()
        elapsed = now - self.start
        if elapsed < self.after_s and self.done < self.total:
            return
        if not self.shown and self.done >= self.total and elapsed < self.after_s:
            return  # finished quickly: say nothing
        self.shown = True
        self.last = self.line(note)
        if self.tty:
            sys.stderr.write("\r" + self.last)
            sys.stderr.flush()
        elif self.done < self.total and now - self.written_at >= self.every_s:
            sys.stderr.write(self.last + "\n")  # a log line every every_s seconds
            sys.stderr.flush()
            self.written_at = now

    def close(self):
        if self.shown:
            sys.stderr.write(("\n" if self.tty else self.last + "\n"))
            sys.stderr.flush()
