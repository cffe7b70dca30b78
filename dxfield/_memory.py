"""Memory model: turn a byte budget into block sizes.

Blockwise code never holds an n x m kernel matrix; it holds a few tiles of
``bq x bt`` entries plus per-row and per-target vectors.  The budget covers
everything a call allocates beyond its inputs and output (accumulators
included), so a test can run a call under tracemalloc and check the peak.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

DEFAULT_BUDGET = 64 * 2**20
# On a GPU the default is larger: tiles of a few thousand squared keep cuBLAS and the
# fused kernels busy (a 64 MiB budget at N = 4096 gives tiles ~450 targets wide, where
# launch latency rivals the work).  Still O(inputs) for the sizes GPUs are used for.
GPU_DEFAULT_BUDGET = 512 * 2**20
# Small allocations a plan does not itemise: NumPy's ufunc/einsum buffers (8192
# entries each), per-tile vectors of a few entries, Python objects.
SLACK = 256 * 2**10
BUDGET_ENV = "DXFIELD_MEMORY_BUDGET"

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}


def parse_budget(value=None, name: str = "memory_budget", device=None) -> int:
    """Bytes from an int, a string such as ``"64MiB"``/``"1.5GB"``, or None (env, then default).

    The default is :data:`DEFAULT_BUDGET`, or :data:`GPU_DEFAULT_BUDGET` when ``device``
    is a CUDA device."""
    if value is None:
        env = os.environ.get(BUDGET_ENV)
        if not env:
            return GPU_DEFAULT_BUDGET if getattr(device, "kind", "cpu") == "cuda" else DEFAULT_BUDGET
        value, name = env, BUDGET_ENV
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '64MiB', got {value!r}")
    if isinstance(value, (int, float)):
        nbytes = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}={value!r} is not a size; use bytes or e.g. '64MiB', '512MB', '2GiB'")
        nbytes = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise TypeError(f"{name} must be a number of bytes or a string like '64MiB', got {value!r}")
    if not math.isfinite(nbytes) or nbytes <= 0:
        raise ValueError(f"{name} must be > 0 bytes, got {value!r}")
    return int(nbytes)


@dataclass(frozen=True)
class BlockPlan:
    """Tile shape chosen for a call, and the bytes it is expected to use."""

    bq: int  # query rows per tile
    bt: int  # target rows per tile
    nbytes: int  # estimated peak extra bytes (fixed + tiles)

    @property
    def whole_columns(self) -> bool:
        """True when one tile spans every query (single pass for column sums)."""
        return self._n_queries <= self.bq

    _n_queries: int = 0


def plan_blocks(
    n_queries: int,
    n_targets: int,
    *,
    budget: int,
    fixed: int,
    per_tile_entry: int,
    per_query_row: int,
    per_target_row: int,
    max_tile_entries: int,
    min_targets: int = 128,
    override: tuple[int, int] | None = None,
    what: str = "this call",
) -> BlockPlan:
    """Choose ``(bq, bt)`` so that ``fixed + tile costs <= budget``.

    Prefers tiles spanning all queries (so column-wise reductions finish in
    one pass) with at least ``min_targets`` targets; otherwise square tiles.
    ``max_tile_entries`` caps a tile so it stays cache-friendly.
    """

    fixed += SLACK

    def cost(bq: int, bt: int) -> int:
        return fixed + per_tile_entry * bq * bt + per_query_row * bq + per_target_row * bt

    if override is not None:
        bq, bt = min(override[0], n_queries), min(override[1], n_targets)
        return BlockPlan(bq, bt, cost(bq, bt), n_queries)
    avail = budget - fixed
    smallest = cost(1, 1)
    if smallest > budget:
        raise ValueError(
            f"memory_budget={budget} bytes is too small for {what}: its accumulators alone "
            f"need about {fixed} bytes and one tile {smallest - fixed} more; "
            f"raise memory_budget to at least {_round_up_mib(smallest)}"
        )
    cap_t = max(1, max_tile_entries // max(1, n_queries))
    bt = (avail - per_query_row * n_queries) // (per_tile_entry * n_queries + per_target_row)
    if bt >= min(n_targets, min_targets):
        bt = int(min(bt, n_targets, max(cap_t, min(n_targets, min_targets))))
        return BlockPlan(n_queries, bt, cost(n_queries, bt), n_queries)
    # Square-ish tiles: per_tile_entry*s^2 + (q+t)*s <= avail.
    a, b = per_tile_entry, per_query_row + per_target_row
    s = int((-b + math.sqrt(b * b + 4 * a * avail)) / (2 * a))
    s = max(1, s)
    bq = max(1, min(s, n_queries))
    bt = max(1, min(n_targets, (avail - per_query_row * bq) // (per_tile_entry * bq + per_target_row)))
    return BlockPlan(bq, bt, cost(bq, bt), n_queries)


def _round_up_mib(nbytes: int) -> str:
    return f"{math.ceil(nbytes / 2**20 * 10) / 10:.1f}MiB"


def tile_cap(device) -> int:
    """Largest tile (entries) worth using: cache-sized on the CPU, large on a GPU."""
    return 1 << 18 if device.kind == "cpu" else 1 << 24
