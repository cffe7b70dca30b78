"""A small text progress bar for long one-off work (summary building).

Writes to stderr only when asked (``progress=True``) and when stderr is a
terminal or the caller insists; no dependency beyond the standard library.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "summaries") as bar: bar.update(k)``; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool = False, stream=None, unit: str = "rows"):
        self.total, self.desc, self.enabled, self.unit = max(1, int(total)), desc, bool(enabled), unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._draw(final=True)

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            self._draw()

    def _draw(self, final: bool = False) -> None:
        frac = min(1.0, self.done / self.total)
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        msg = (f"\r{self.desc}: [{bar}] {100 * frac:5.1f}% {self.done}/{self.total} {self.unit} "
               f"{rate:,.0f} {self.unit}/s" + (f" eta {eta:.0f}s" if not final and eta == eta else f" {elapsed:.1f}s"))
        self.stream.write(msg + ("\n" if final else ""))
        self.stream.flush()
