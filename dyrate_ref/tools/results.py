"""The evaluation's resumable results file (evaluate --results FILE.jsonl)."""

from __future__ import annotations

import json
import os

from ..commands import UserError


class Results:
    """--results FILE.jsonl: a header line naming what was evaluated, then one JSON line per (method, item)
    written as soon as it is made. Opening an existing file reuses its records (resume); a file written
    for other weights, data or settings is refused rather than mixed. Each line is one write() on an
    O_APPEND descriptor, which a local Linux file system places whole at the end, so the lines of forked
    workers do not mix; a line cut by an interruption is dropped on resume."""

    def __init__(self, path: str, header: dict):
        self.done: dict[tuple[str, str], dict] = {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            *lines, cut = data.split(b"\n")  # `cut`: what follows the last newline, a line an interruption cut
            n = 1
            try:
                first = json.loads(lines[0]) if lines else None
                if not isinstance(first, dict) or first.get("results_of") != header["results_of"]:
                    raise UserError(f"--results {path} is not a results file of this command; give another file")
                for key, value in header.items():
                    if first.get(key) != value:
                        raise UserError(f"--results {path} was written with {key} {first.get(key)!r}, not {value!r}; "
                                        "give another file or remove it to start over")
                for n, line in enumerate(lines[1:], 2):
                    rec = json.loads(line)
                    self.done[(rec["method"], rec["id"])] = rec
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise UserError(f"--results {path}, line {n} is not a record of this command; "
                                "give another file or remove it to start over") from None
            if cut:
                os.truncate(path, len(data) - len(cut))
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o666)
            self.append(header)

    def append(self, rec: dict):
        os.write(self.fd, (json.dumps(rec) + "\n").encode())
