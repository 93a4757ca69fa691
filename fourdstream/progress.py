"""A progress line for long work: frames done / expected and rate, on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """Report ``done/total label`` and the rate while work goes on.

    On a terminal the line is rewritten in place (at most 4 times a second);
    otherwise (logs, batch jobs) a line is printed every ``log_every`` seconds.
    """

    def __init__(self, total: int, label: str = "frames", *, stream=None, enabled: bool = True,
                 log_every: float = 5.0):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval = 0.25 if self.tty else log_every
        self.done = 0
        self.start = self._last = time.perf_counter()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._show(now)

    def _show(self, now: float, end: str = "") -> None:
        rate = self.done / max(now - self.start, 1e-9)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        line = f"{self.done:,}/{self.total:,} {self.label}{pct}, {rate:,.0f} {self.label}/s"
        if self.tty:
            self.stream.write("\r" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self._show(time.perf_counter(), end="\n")
