"""The one exception type for problems the user can fix, and the one wrapper that turns it into an exit.

Every command (generate.py and each `python -m dyrate_ref....` tool) runs through `command_main`: a
UserError becomes one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys


class UserError(Exception):
    """Something the user gave us is wrong; the message says what and what to do."""


def command_main(run, argv=None):
    """Call run(argv) -> exit code (None means 0) and exit with it; UserError -> 'error: ...', exit 2."""
    try:
        code = run(argv) or 0
    except UserError as e:
        sys.stdout.flush()
        sys.stderr.write(f"error: {e}\n")
        code = 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
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
