"""A one-line progress bar on stderr, for anything slow (loading a 7B checkpoint, training, evaluation)."""

from __future__ import annotations

import sys
import time


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
