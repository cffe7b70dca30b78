"""Progress bars for long one-off work (streaming the summaries), through tqdm when it is installed.

dxfield does not depend on tqdm: without it, ``progress=True`` writes one line
to stderr when the work ends instead of a live bar.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, desc: str, *, enabled: bool = False, unit: str = "rows"):
    """``with progress_bar(n, "summaries", enabled=True) as bar: bar.update(k)``; silent when disabled."""
    if not enabled:
        yield _Silent()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        bar = _Summary(total, desc, unit)
        yield bar
        bar.close()
        return
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


class _Summary:
    """Counts what was done and says so on stderr at the end (tqdm missing)."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.done = int(total), desc, unit, 0
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += int(n)

    def close(self) -> None:
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"{self.desc}: {self.done}/{self.total} {self.unit} in {elapsed:.1f}s\n")
