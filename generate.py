#!/usr/bin/env python
"""Answer a question about an image: python generate.py --image x.jpg --prompt "What is this?"

All options: python generate.py --help. The code lives in dyrate_ref/cli.py.
"""

from dyrate_ref.cli import run
from dyrate_ref.commands import exits

if __name__ == "__main__":
    with exits():  # a problem with the input: one line on stderr, exit status 2, no traceback
        run()
