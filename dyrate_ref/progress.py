"""A one-line progress bar on stderr, for anything slow (loading a 7B checkpoint, training, evaluation)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Appears only once a job has taken over `after_s` seconds; counts whole units, or bytes (shown in
    MB below 1 GB, else GB). On a terminal the line redraws itself in place; into a pipe or a log file
    it is written once, when the job ends, so the file holds one readable line, not hundreds of
    carriage returns."""

    def __init__(self, total: float, label: str, unit: str = "", bytes_: bool = False, after_s: float = 1.0):
        self.total, self.label, self.unit = total, label, unit
        self.scale, self.unit = (1.0, unit) if not bytes_ else ((1e6, " MB") if total < 1e9 else (1e9, " GB"))
        self.start, self.after_s, self.done, self.shown = time.time(), after_s, 0.0, False
        self.tty = sys.stderr.isatty()
        self.last = ""

    def line(self, note: str = "") -> str:
        elapsed = time.time() - self.start
        frac = min(1.0, self.done / max(self.total, 1e-9))
        bar = "#" * int(30 * frac)
        if self.scale == 1.0:
            count = f"{int(self.done)}/{int(self.total)}"
        else:
            count = f"{self.done / self.scale:.1f}/{self.total / self.scale:.1f}"
        return f"{self.label} [{bar:<30}] {count}{self.unit} {elapsed:.0f}s {note}".rstrip()

    def update(self, n: float = 1, note: str = ""):
        self.done += n
        elapsed = time.time() - self.start
        if elapsed < self.after_s and self.done < self.total:
            return
        if not self.shown and self.done >= self.total and elapsed < self.after_s:
            return  # finished quickly: say nothing
        self.shown = True
        self.last = self.line(note)
        if self.tty:
            sys.stderr.write("\r" + self.last)
            sys.stderr.flush()

    def close(self):
        if self.shown:
            sys.stderr.write(("\n" if self.tty else self.last + "\n"))
            sys.stderr.flush()
