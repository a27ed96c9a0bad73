"""A one-line progress bar on stderr, for anything slow (loading a 7B checkpoint, training, evaluation)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Appears only once a job has taken over `after_s` seconds; counts in whole units unless `scale`
    says otherwise (loading counts bytes and shows GB)."""

    def __init__(self, total: float, label: str, unit: str = "", scale: float = 1.0, after_s: float = 1.0):
        self.total, self.label, self.unit, self.scale = total, label, unit, scale
        self.start, self.after_s, self.done, self.shown = time.time(), after_s, 0.0, False

    def update(self, n: float = 1, note: str = ""):
        self.done += n
        elapsed = time.time() - self.start
        if elapsed < self.after_s and self.done < self.total:
            return
        if not self.shown and self.done >= self.total and elapsed < self.after_s:
            return  # finished quickly: say nothing
        self.shown = True
        frac = min(1.0, self.done / max(self.total, 1e-9))
        bar = "#" * int(30 * frac)
        if self.scale == 1.0:
            count = f"{int(self.done)}/{int(self.total)}"
        else:
            count = f"{self.done / self.scale:.1f}/{self.total / self.scale:.1f}"
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {count}{self.unit} {elapsed:.0f}s {note}")
        sys.stderr.flush()

    def close(self):
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
