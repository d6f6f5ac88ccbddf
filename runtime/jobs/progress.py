"""Progress that reads well on a terminal and in a log file, and the process's peak memory.

On a terminal: a tqdm bar. Anywhere else (a log file, a pipe, a batch scheduler's output): one
plain line every `every` seconds and one at the end, e.g.

    triviaqa test deepen-avg: 120/500 questions (24%), 1.9/s, 3m21s left
"""
from __future__ import annotations

import resource
import sys
import time


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "items", enabled: bool = True,
                 stream=None, every: float = 30.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.note = ""
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit.rstrip("s") or unit, file=self.stream,
                            mininterval=1)

    def update(self, n: int = 1, note: str = ""):
        """`n` more items done; `note` (e.g. "4.1 tok/s") is shown with the count."""
        self.done += n
        self.note = note or self.note
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def _line(self, now: float):
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = f", {_duration((self.total - self.done) / rate)} left" if rate and self.total > self.done else ""
        note = f", {self.note}" if self.note else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}{share}, {rate:.2g}/s{left}{note}",
              file=self.stream, flush=True)

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
