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
from dataclasses import dataclass, replace

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
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "p": 10**15, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
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
            raise ValueError(f"{name}={value!r} is not a size; use bytes or a number with a unit: B, kB, MB, GB, "
                             "TB, PB or KiB, MiB, GiB, TiB, PiB (e.g. '64MiB', '512MB', '2GiB')")
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


def tile_view(buf, shape):
    """The first ``shape[0] * shape[1]`` entries of a flat work buffer, as a matrix."""
    return buf[: shape[0] * shape[1]].reshape(shape)


def exact_plan(n: int, n_targets: int, d: int, *, itemsize: int, n_temps: int, n_sides: int, budget: int,
               tile_cap: int, block_size=None, fused_precision: str | None = None) -> tuple[BlockPlan, bool]:
    """The exact sweep's tiles under ``budget``: ``(plan, factored_copy)``, for either engine.

    The composed engine's costs set the shape; ``factored_copy`` says whether
    the column factors of the weighted sums go into a copy of the targets (bt x
    D) or, for tiles of fewer than D rows, into the exponential tile itself (bq
    x bt).  With ``fused_precision`` (the fused engine) the target tiles are
    narrowed to what the fused work space fits (:func:`fused_tile_width`).
    """
    it, nt = itemsize, n_temps

    def plan(factored_copy: bool):
        return plan_blocks(
            n, n_targets, budget=budget,
            # centred queries and norms, the accumulators of each side and temperature
            # (combined in place at the end), and their float64 log-scales
            fixed=it * (n * d * (1 + n_sides * nt) + n * (2 + 8 * nt) + 2 * d) + 8 * n * 4 * nt
            # row floors and the fixed scales of the sweep (Floors, Scales)
            + n * (16 + it * (6 + 2 * nt)),
            # distance tile (shifted in place), exponential tile, hit mask, near-duplicate
            # refinement (a quarter of a tile)
            per_tile_entry=3 * it + 1,
            # row block of the weighted sums, float64 row vectors
            per_query_row=it * (d + 10) + 8 * 20,
            # augmented targets (and their factored copy), float64 column vectors
            per_target_row=it * ((2 if factored_copy else 1) * d + 2 * nt + 14) + 8 * (4 * nt + 10),
            max_tile_entries=tile_cap,
            override=block_size,
            what=f"the exact field with N={n}, D={d} and {nt} temperature(s)",
        )

    out = plan(True)
    if out.bq < d:
        short = plan(False)
        if short.bq < d:
            out = short
    if fused_precision is not None and block_size is None:
        out = replace(out, bt=fused_tile_width(out, n, d, n_temps=nt, n_sides=n_sides, budget=budget,
                                               precision=fused_precision))
    return out, out.bq >= d


def fused_tile_width(plan: BlockPlan, n: int, d: int, *, n_temps: int, n_sides: int, budget: int,
                     precision: str) -> int:
    """Targets per fused tile: at most the plan's, within what the fused engine holds.

    The fused sweep holds per tile entry the product ``S`` and one weight tile
    per temperature (plus a three-part split of one weight tile with
    ``"tf32x3"``), and beyond the tiles the row states of both sides and, with
    ``"tf32x3"``, split copies of the queries and of a target tile.
    """
    nt, bq = n_temps, plan.bq
    split = precision == "tf32x3"
    per_entry = 4 * (1 + nt + (3 if split else 0))
    per_target = 4 * (d + 2) + (12 * d if split else 0)
    fixed = 4 * (n * d + 2 + n_sides * nt * n * (d + 2) + 4 * nt * n) + (12 * n * d if split else 0)
    width = (budget - SLACK - fixed) // (bq * per_entry + per_target)
    if width < 1:
        raise ValueError(f"memory_budget={budget} bytes is too small for the fused engine with N={n}, D={d} "
                         f"and {nt} temperature(s) at precision {precision!r}; raise memory_budget "
                         "or use engine='composed'")
    return int(min(plan.bt, width))
