"""The exact drifting field, evaluated in tiles with bounded memory.

Math (design.md 2.1-2.3).  Queries ``x`` (N x D), positives ``y+`` (P x D),
negatives ``y-`` (M x D, by default the queries with self pairs masked), logits
``l_ij = log k(x_i, y_j)`` over the concatenated targets.

*Bidirectional* (Algorithm 2 of the drifting paper)::

    A_ij = sqrt(softmax_j(l)_ij * softmax_i(l)_ij) = exp(l_ij - LR_i/2 - LC_j/2)
    W+ = A+ * rowsum(A-),  W- = A- * rowsum(A+),  V = W+ y+ - W- y-

with ``LR_i`` the log-sum-exp of row ``i`` and ``LC_j`` that of column ``j``.
Because ``exp(-LR_i/2)`` is one factor per row it comes out of every row sum::

    V_i = exp(-LR_i) * (S-_i N+_i - S+_i N-_i),
    S±_i = sum_j exp(l_ij - LC_j/2),  N±_i = sum_j exp(l_ij - LC_j/2) y_j.

So one sweep over target tiles suffices when a tile spans all queries (its
column sums are then complete); otherwise each target tile is swept twice, once
for its column sums and once for the row sums.  The final factor is applied in
log space and drift normalisation removes a common scale first.

Streaming without under- or overflow.  Logits are ``l_ij = -c r_ij`` with ``r``
the distance (Laplace) or its square (Gaussian), ``c > 0`` per temperature, and
``-inf`` for pairs that do not interact (self pairs, other classes, weight 0).
Every weighted sum is factored around a per-row floor ``f_i <= min_j r_ij``::

    sum_j exp(l_ij + b_j) [y_j, 1] = exp(-c f_i + B) * E_i. @ (exp(b - B) [y, 1]),
    E_ij = exp(-c (r_ij - f_i)) <= 1,

with the column log-factors ``b_j = log w_j - LC_j / 2`` (bidirectional; ``log
w_j`` for the row field) capped by ``B >= max b``.  ``E`` takes one ``exp`` per
entry and temperature, ``f`` is shared by all temperatures (one subtraction per
entry), and one matrix product per temperature gives all the sums (the column
factors go into the targets), with no per-entry shift.  This is exact as long
as the terms that matter (within ``eps^2`` of a row's largest) stay normal
numbers, which holds when the spread of ``b`` is at most :func:`_span_limit`
(about 47 in float32, 630 in float64):

* with ``feature_scale="auto"`` the mean-distance sweep also records each row's
  nearest interacting target per side and the range of the column minima,
  from which ``B`` (``-c cmin_j <= LC_j <= -c cmin_j + log N``) and fixed floors
  follow for the whole sweep (:class:`_Floors`): the accumulators then need no
  rescaling at all, and the same bound covers the spread;
* otherwise (or when that bound is too wide, e.g. outliers at small
  temperatures) each tile takes its own row minima and ``B = max b``, and folds
  its sums into running ones with a log-scale per row (:class:`RowSums`), which
  moves only when a tile outweighs it by ``exp(_LAG)``; a tile whose ``b``
  spread is too wide forms its log-weights entry by entry instead.

The column sums ``LC_j`` come from the same ``E``: ``sum_i exp(-c (r_ij -
lo)) = (rho @ E)_j`` with ``rho_i = exp(-c (f_i - lo))``, ``lo = min f``, when
the column minima and the floors lie within the same limit; otherwise from
``exp(-c (r_ij - cmin_j))``.

Distances come from one product of augmented matrices, ``[x | |x|^2 | 1] @
[-2 y | 1 | |y|^2]^T`` (:func:`dxfield.kernels.augmented_queries`), then the
near-duplicate refinement of :func:`dxfield.kernels.sqdist_tile`.

*Row-normalised* (mean shift, what the projected field approximates)::

    b±(x_i) = sum_j k(x_i, y±_j) y±_j / sum_j k(x_i, y±_j),   V = b+ - b-,

with ``b- := x_i`` for a query without any negative (N = 1 with self negatives
only, or all weights zero), so its field is the plain mean shift toward the
positives.  Bidirectional gives V = 0 there (no negative mass to balance).

Weighted negatives: a negative of weight ``w`` counts as ``w`` copies of that
point (its kernel entries are multiplied by ``w`` in the row sums; its own
column normalisation is unchanged).  Integer weights therefore give exactly the
field of a duplicated negative.

Feature scale: with ``feature_scale="auto"`` the features are divided by
``S = mean distance / sqrt(D)`` (mean over every query-target pair except
masked self pairs) and the kernel uses ``tau * sqrt(D)``, i.e. logits are
``-(d / mean d) / tau``; the field is returned in these normalised units.  The
mean needs one extra sweep over the distances; it keeps as many distance tiles
as the unused part of the budget holds, so the field sweep skips their products.

Memory: beyond its inputs the call holds O((N + tile) D) accumulators and a few
tiles of ``bq x bt`` entries chosen from ``memory_budget`` (default 64 MiB),
plus the distance tiles kept in what the plan leaves of the budget; never an
N x (P + M) array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from numbers import Real
from typing import Any

from . import _checks
from ._backend import device_context, floating_dtype, place
from ._memory import parse_budget, plan_blocks, tile_cap
from ._fused import resolve as resolve_engine
from .kernels import (_set_diagonal, augmented_queries, augmented_targets, check_kernel, logit_coef, sq_norms,
                      sqdist_tile)

NORMALIZATIONS = ("bidirectional", "row")
# On the CPU the sweep's elementwise passes stream from memory whatever the tile size, while
# each tile costs a fixed update of the N x D accumulators: tiles larger than the generic
# cache-sized cap pay off (measured: 2^19 entries, 1024 x 512 at the benchmark's shape).
_CPU_TILE = 1 << 19
DEFAULT_TEMPERATURES = (0.02, 0.05, 0.2)


@dataclass
class Targets:
    """A run of targets: positives, the queries as negatives, or explicit negatives."""

    y: Any  # (n, D) in the working dtype, uncentred
    negative: bool
    log_weight: Any = None  # (n,) or None
    is_queries: bool = False  # these targets are the queries: mask i == j
    labels: Any = None  # (n,) ints: pairs whose query label differs are masked (class-conditional)

    @property
    def n(self) -> int:
        return int(self.y.shape[0])


# A running log-scale moves up only when new sums would exceed its scale by more than
# exp(_LAG): most tiles then leave it (and the accumulators) as they are, and running sums
# stay below exp(_LAG) per tile, far from overflow.
_LAG = 8.0


def _fold(xp, m, idx, shift, sums):
    """Fold partial sums ``exp(shift) * sums`` into a running ``(m, s)``; return the factors.

    ``m`` (float64) at ``idx`` rises to ``shift + log(sums)`` where that exceeds
    it by more than ``_LAG`` (or it was -inf); the factors ``(old, new)``
    (float64) bring the running and the new sums to it: ``s <- old * s + new *
    sums``, so a running ``s`` that received anything is >= 1 and the new part
    at most ``exp(_LAG)``.  Both factors come from the stored ``m``, so no
    rounding falls between them.  ``shift = -inf`` or ``sums = 0`` adds nothing.
    """
    shift = shift.astype(xp.float64, copy=False)
    sums = sums.astype(xp.float64, copy=False)
    with _quiet(xp):
        m_old = m[idx].copy()
        top = shift + xp.log(sums)
        m_new = xp.where(top > m_old + _LAG, top, m_old)
        m[idx] = m_new
        live = xp.isfinite(m_new)
        old = xp.where(live, xp.exp(m_old - m_new), 1.0)
        new = xp.where(live & (sums > 0), xp.exp(shift - m_new), 0.0)
    return old, new


def _shifted_exp(xp, tile, axis: int):
    """``exp(tile - max)`` in place along ``axis``; return the shifts (the maxima, 0 for a
    line of -inf only)."""
    top = tile.max(axis=axis)
    safe = xp.where(xp.isfinite(top), top, 0.0).astype(tile.dtype, copy=False)
    tile -= safe[:, None] if axis == 1 else safe[None, :]
    xp.exp(tile, out=tile)
    return safe


class RowSums:
    """Streaming sums over targets for one temperature and one side.

    Holds, per query row, a log-scale ``m`` (float64), ``s = sum_j exp(e_ij -
    m)`` and ``acc = sum_j exp(e_ij - m) y_j`` (y centred) for the log-weights
    ``e`` seen so far.  ``m`` either runs along (:meth:`fold`, :meth:`add`:
    ``s >= 1`` once a row received anything) or is fixed for a whole sweep:
    the sums are added directly, then :meth:`settle` moves ``s`` into ``m``.
    Feeding tiles in any order gives the same result up to rounding.
    """

    def __init__(self, xp, n: int, d: int, dtype):
        self.xp = xp
        self.m = xp.full(n, -xp.inf)
        self.s = xp.zeros(n, dtype=dtype)
        self.acc = xp.zeros((n, d), dtype=dtype)

    def fold(self, rows: slice, shift, s_t):
        """Take in a tile's row sums ``exp(shift_i) * s_t_i``: update ``m`` and ``s`` and rescale
        ``acc``; return the factor (per row) the tile's weighted sums need before being added
        to ``acc[rows]``."""
        xp = self.xp
        dt = self.s.dtype
        started = xp.isfinite(self.m[rows])  # rows that received something (elsewhere acc is 0)
        old, new = _fold(xp, self.m, rows, shift, s_t)
        s = self.s[rows]
        s *= old.astype(dt)
        s += new.astype(dt) * s_t
        moved = xp.nonzero(started & (old != 1.0))[0]  # rows whose scale went up: rare
        if moved.shape[0]:
            acc = self.acc[rows]
            acc[moved] *= old[moved].astype(dt)[:, None]
        return new.astype(dt)

    def settle(self, y_scale: float = 1.0) -> None:
        """Move ``s`` into ``m`` (``s = 1`` where it is positive), scaling ``acc`` by ``y_scale / s``
        (``acc`` summed targets ``y / y_scale``)."""
        xp = self.xp
        has = self.s > 0
        safe = xp.where(has, self.s, 1.0).astype(xp.float64)
        self.m = xp.where(has, self.m + xp.log(safe), self.m)
        self.acc *= (y_scale / safe).astype(self.acc.dtype)[:, None]
        self.s = has.astype(self.s.dtype)

    def add(self, rows: slice, e, y, mm_out, y_scale: float = 1.0) -> None:
        """Add a tile of log-weights ``e`` (bq x bt, overwritten) for targets ``y_scale * y``
        (``y`` bt x D)."""
        shift = _shifted_exp(self.xp, e, 1)
        e *= (self.fold(rows, shift, e.sum(axis=1)) * y_scale)[:, None]
        self.xp.matmul(e, y, out=mm_out)
        self.acc[rows] += mm_out


class LogSumExp:
    """Streaming log-sum-exp: per entry a running log-scale ``m`` (float64) and ``s``."""

    def __init__(self, xp, n: int, dtype):
        self.xp = xp
        self.m = xp.full(n, -xp.inf)
        self.s = xp.zeros(n, dtype=dtype)

    def fold(self, idx, shift, sums) -> None:
        """Fold in ``log(exp(shift) * sums)`` entry by entry."""
        old, new = _fold(self.xp, self.m, idx, shift, sums)
        s = self.s[idx]
        s *= old.astype(s.dtype)
        s += new.astype(s.dtype) * sums

    def add(self, idx, tile, axis: int) -> None:
        """Fold in ``tile`` (overwritten), reduced over ``axis``."""
        shift = _shifted_exp(self.xp, tile, axis)
        self.fold(idx, shift, tile.sum(axis=axis))

    def value(self):
        xp = self.xp
        with _quiet(xp):
            return self.m + xp.log(self.s)


def _quiet(xp):
    import numpy as np

    return np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore")


def _span_limit(dtype) -> float:
    """Largest spread (natural log) of the column factors a factored exponent may have.

    A term that matters (within ``eps^2`` of its row's largest) then has both
    factors and their product above the smallest normal number, with a margin.
    """
    import numpy as np

    fi = np.finfo(dtype)
    return -math.log(float(fi.tiny)) + 2.0 * math.log(float(fi.eps)) - 8.0


def _finite_range(xp, vec):
    """``(min, max)`` over the finite entries of ``vec``; ``(inf, -inf)`` if there are none."""
    fin = xp.isfinite(vec)
    if not bool(fin.any()):
        return math.inf, -math.inf
    return float(xp.min(xp.where(fin, vec, xp.inf))), float(xp.max(xp.where(fin, vec, -xp.inf)))


@dataclass
class _TargetTile:
    """A tile of targets as the sweep uses it."""

    ya: Any  # (bt, D + 2) augmented, [-2 yc | 1 | yy] (:func:`augmented_targets`)
    yy: Any  # (bt,) squared norms of the centred targets yc
    j0: int  # index of its first target in its run
    run: Targets
    log_weight: Any  # (bt,) float64 or None
    labels: Any  # (bt,) or None
    y_unit: float  # the products take ym2 / y_unit (:func:`_y_unit`)
    y_top: float  # max |yc_j| (an upper bound of the coordinates)
    weightless: Any = None  # indices of the targets of weight 0, or None

    @property
    def n(self) -> int:
        return int(self.ya.shape[0])

    @property
    def ym2(self):
        """``-2 yc`` (bt x D), a view of ``ya``."""
        return self.ya[:, :-2]

    @property
    def y_scale(self) -> float:
        """Sums over ``ym2 / y_unit`` times this are sums over ``yc``."""
        return -0.5 * self.y_unit


class ExactSums:
    """Tiled sweep over targets producing :class:`RowSums` per temperature and side.

    Shared by :func:`drift_field` and the projected field's exact repulsion.
    Coordinates are centred on the queries' mean; every field built from these
    sums is translation invariant, so the centre never needs adding back.
    """

    # The fused GPU engine (dxfield._fused) runs both sweeps when ``ops`` is set; ``precision``
    # is its GEMM precision ("float32", "tf32x3" or "tf32").
    ops = None
    precision = "float32"

    def __init__(self, xp, x, targets: list[Targets], *, log_kernel_scales, kernel: str,
                 bidirectional: bool, budget: int, block_size=None, tile_cap: int, sides=(0, 1),
                 query_labels=None):
        self.xp = xp
        self.query_labels = query_labels  # (N,) ints, with Targets.labels: block-diagonal by class
        self.x = x
        self.targets = targets
        self.kernel = kernel
        self.coefs = tuple(log_kernel_scales)  # logits = -coef * (d or d^2); settable before sweep()
        self.bidirectional = bidirectional
        self.sides = tuple(sides)  # which RowSums to keep: 0 positives, 1 negatives
        self.budget, self.block_size = budget, block_size  # the fused engine plans its own tiles
        n, d = x.shape
        self.n, self.d = n, d
        self.dtype = x.dtype
        it = self.dtype.itemsize
        nt = len(self.coefs)
        def plan(factored_copy: bool):
            return plan_blocks(
                n, max(t.n for t in targets), budget=budget,
                # centred queries and norms, the accumulators of each side and temperature
                # (combined in place at the end), and their float64 log-scales
                fixed=it * (n * d * (1 + len(self.sides) * nt) + n * (2 + 8 * nt) + 2 * d) + 8 * n * 4 * nt
                # row floors and the fixed scales of the sweep (_Floors, _Scales)
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

        # The column factors of the weighted sums go into a copy of the targets (bt x D) or,
        # for tiles of fewer than D rows, into the exponential tile itself (bq x bt).
        self.plan = plan(True)
        if self.plan.bq < d:
            short = plan(False)
            if short.bq < d:
                self.plan = short
        self._factored_copy = self.plan.bq >= d
        self._kept = {}  # distance tiles mean_distance() keeps for sweep(), within the budget
        self._floors = None  # what mean_distance() learns for sweep() (_Floors)
        self._ws = None  # tile buffers (_workspace)
        self.mu = x.mean(axis=0)
        # [xc | |xc|^2 | 1]: with [-2 yc | 1 | |yc|^2] one product gives the squared distances
        self._xa = xp.empty((n, d + 2), dtype=self.dtype)
        self.xc = self._xa[:, :d]
        xp.subtract(x, self.mu, out=self.xc)
        self.xx = sq_norms(self.xc)
        augmented_queries(self.xc, self.xx, out=self._xa)

    # -- tiles -------------------------------------------------------------------------
    def _workspace(self):
        """Tile buffers, allocated once and shared by both sweeps."""
        if self._ws is not None:
            return self._ws
        xp, plan = self.xp, self.plan
        size = plan.bq * plan.bt
        self._ws = dict(
            r=xp.empty(size, dtype=self.dtype),
            e=xp.empty(size, dtype=self.dtype),
            hits=xp.empty(size, dtype=bool),
            cmin=xp.empty(plan.bt, dtype=self.dtype),
            mm=xp.empty(plan.bq * self.d, dtype=self.dtype),
            ya=xp.empty(plan.bt * (self.d + 2), dtype=self.dtype),
            yf=xp.empty(plan.bt * self.d if self._factored_copy else 0, dtype=self.dtype),
        )
        return self._ws

    @staticmethod
    def _view(buf, shape):
        return buf[: shape[0] * shape[1]].reshape(shape)

    def _target_runs(self):
        """Yield ``(t, j0, cols)`` per target tile: its run, first index and slice in the run."""
        for t in self.targets:
            for j0 in range(0, t.n, self.plan.bt):
                yield t, j0, slice(j0, j0 + self.plan.bt)

    def _target_tiles(self):
        """Yield ``(t, j0, yc, yy, logw, tlab)`` per target tile (``yc`` centred, ``yy`` its norms)."""
        for t, j0, cols in self._target_runs():
            yc = t.y[cols] - self.mu
            yield t, j0, yc, sq_norms(yc), _part(t.log_weight, cols), _part(t.labels, cols)

    def _tiles(self, ws, units=None):
        """Yield a :class:`_TargetTile` per target tile, built in ``ws`` (valid until the next);
        ``units[side]``: one y unit per side."""
        xp, d = self.xp, self.d
        for t, j0, cols in self._target_runs():
            y = t.y[cols]
            ya = self._view(ws["ya"], (y.shape[0], d + 2))
            yc = ya[:, :d]
            xp.subtract(y, self.mu, out=yc)
            yy = sq_norms(yc)
            augmented_targets(yc, yy, out=ya)  # yc becomes -2 yc in place
            top = math.sqrt(float(yy.max())) if yy.size else 0.0  # >= max |yc|
            logw = _part(t.log_weight, cols)
            weightless = None
            if logw is not None:
                logw = logw.astype(xp.float64)
                weightless = xp.nonzero(logw == -xp.inf)[0]
                weightless = weightless if weightless.shape[0] else None
            unit = _y_unit(top) if units is None else units[_side(t)]
            yield _TargetTile(ya, yy, j0, t, logw, _part(t.labels, cols), unit, top, weightless)

    def _distance_tiles(self, ws, tile: _TargetTile, masked=0.0, unpaired=False, cached=False):
        """Yield ``(rows, r, cmin)`` over query tiles; ``r`` is d (laplace) or d^2 (gaussian),
        ``cmin`` its column minima over the pairs not masked.

        Self pairs (and, with ``unpaired``, other-class pairs and targets of
        weight 0: pairs that do not interact) are set to ``masked``.  With
        ``cached``, tiles kept by :meth:`mean_distance` are used (and released)
        instead of being recomputed; they may be overwritten.
        """
        xp, bq, n = self.xp, self.plan.bq, self.n
        bt = tile.n
        cmin = ws["cmin"][:bt]
        for i0 in range(0, n, bq):
            rows = slice(i0, min(n, i0 + bq))
            shape = (rows.stop - i0, bt)
            r = self._kept.pop((id(tile.run), tile.j0, i0), None) if cached else None
            fresh = r is None
            if fresh:
                r = self._view(ws["r"], shape)
                xp.matmul(self._xa[rows], tile.ya.T, out=r)
                sqdist_tile(self.xc[rows], self.xx[rows], tile.ym2, tile.yy, r, self._view(ws["e"], shape),
                            self._view(ws["hits"], shape),
                            self_offset=(tile.j0 - i0) if tile.run.is_queries else None, self_value=masked,
                            colmin=cmin, formed=True, refine_entries=r.size // 4, yc_scale=-2.0)
                if self.kernel == "laplace":
                    xp.sqrt(r, out=r)
                    xp.sqrt(cmin, out=cmin)
            elif tile.run.is_queries:
                _set_diagonal(r, tile.j0 - i0, masked)
            masks = unpaired and tile.labels is not None
            if masks:  # other-class pairs do not interact
                other = self._view(ws["hits"], shape)
                xp.not_equal(self.query_labels[rows][:, None], tile.labels[None, :], out=other)
                r[other] = masked
            if masks or not fresh:
                r.min(axis=0, out=cmin)
            if unpaired and tile.weightless is not None:  # zero-weight targets add nothing anywhere
                r[:, tile.weightless] = masked
                cmin[tile.weightless] = masked
            yield rows, r, cmin

    # -- sweeps ------------------------------------------------------------------------
    def mean_distance(self) -> float:
        """Mean ``||x_i - y_j||`` over every pair except masked self pairs (float64 sum).

        On the way it keeps distance tiles for :meth:`sweep` in the budget the
        plan leaves unused, and (without class labels) records what lets the
        sweep use fixed log-scales (:class:`_Floors`).
        """
        if self.ops is not None:
            from ._fused import mean_distance
            return mean_distance(self)
        xp = self.xp
        ws = self._workspace()
        room = self.budget - self.plan.nbytes
        floors = None if self.query_labels is not None else _Floors(xp, self.n, self.dtype, self.targets)
        total, count = 0.0, 0
        for tile in self._tiles(ws):
            for rows, r, cmin in self._distance_tiles(ws, tile):
                if r.nbytes <= room:
                    self._kept[(id(tile.run), tile.j0, rows.start)] = r.copy()
                    room -= r.nbytes
                d = r if self.kernel == "laplace" else xp.sqrt(r, out=self._view(ws["e"], r.shape))
                if tile.labels is not None:  # only same-class pairs interact, so only they set the scale
                    same = self._view(ws["hits"], d.shape)
                    xp.equal(self.query_labels[rows][:, None], tile.labels[None, :], out=same)
                    d *= same
                    count += int(same.sum()) - d.size
                total += float(d.sum(dtype=xp.float64))
                count += d.size
                if tile.run.is_queries:
                    off, bq = tile.j0 - rows.start, rows.stop - rows.start
                    count -= max(0, min(tile.n, bq - off) - max(0, -off))
                    if floors is not None:
                        _set_diagonal(r, off, xp.inf)
                if floors is not None:
                    floors.add(xp, rows, tile, r, cmin)
        self._floors = floors
        return total / count if count > 0 else 0.0

    def sweep(self):
        """Return ``(sums, row_lse)``: ``sums[k][side]`` are :class:`RowSums`; ``row_lse[k]``
        the row log-sum-exp over all (weighted) targets, or None for row normalisation."""
        if self.ops is not None:
            from ._fused import exact_sweep
            return exact_sweep(self)
        xp, n, d, dt = self.xp, self.n, self.d, self.dtype
        nt = len(self.coefs)
        sums = [[RowSums(xp, n, d, dt) if side in self.sides else None for side in (0, 1)] for _ in range(nt)]
        row_lse = [LogSumExp(xp, n, dt) for _ in range(nt)] if self.bidirectional else None
        fixed = None if self._floors is None else self._floors.scales(self, sums, row_lse)
        ws = self._workspace()
        whole_columns = self.plan.bq >= n
        for tile in self._tiles(ws, None if fixed is None else fixed.unit):
            side = _side(tile.run)
            if side not in self.sides:
                raise ValueError("ExactSums: targets on a side that was not requested")
            col_lse = None
            if self.bidirectional and not whole_columns:
                # First sweep over query tiles: complete the column sums of this target tile.
                cols = [LogSumExp(xp, tile.n, dt) for _ in range(nt)]
                for rows, r, cmin in self._distance_tiles(ws, tile, math.inf, unpaired=True):
                    self._column_sums(ws, r, cmin, cols)
                col_lse = [c.value() for c in cols]
            for rows, r, cmin in self._distance_tiles(ws, tile, math.inf, unpaired=True, cached=True):
                self._row_sums(ws, rows, r, cmin, tile, col_lse, [s[side] for s in sums], row_lse, fixed)
        if fixed is not None:
            for per_k in sums:
                for side, rs in enumerate(per_k):
                    if rs is not None:
                        rs.settle(-0.5 * fixed.unit.get(side, 1.0))  # they summed -2 yc / unit
        self._ws = None
        return sums, row_lse

    def _column_sums(self, ws, r, cmin, cols, ks=None, near=None):
        """Fold the column sums of ``exp(-c_k r)`` into ``cols[k]`` (for ``k`` in ``ks``).

        ``r`` is overwritten, unless ``near`` is given: then ``r`` holds the
        shifted distances ``r - near_i`` and is kept.
        """
        xp = self.xp
        cmin64 = cmin.astype(xp.float64)
        low = xp.where(xp.isfinite(cmin), cmin, 0.0).astype(r.dtype, copy=False)[None, :]
        e = self._view(ws["e"], r.shape)
        if near is None:
            r -= low
        ones = xp.ones(r.shape[0], dtype=r.dtype)
        for k in range(len(self.coefs)) if ks is None else ks:
            if near is None:
                xp.multiply(r, -self.coefs[k], out=e)
            else:  # -c (v_ij + near_i - cmin_j)
                xp.subtract(near[:, None], low, out=e)
                e += r
                e *= -self.coefs[k]
            xp.exp(e, out=e)
            cols[k].fold(slice(None), -self.coefs[k] * cmin64, ones @ e)

    def _row_sums(self, ws, rows, r, cmin, tile: _TargetTile, col_lse, sums, row_lse, fixed):
        """Add one distance tile ``r`` (masked pairs inf; overwritten) to the row sums of every
        temperature.

        Each row is shifted by a floor ``f_i <= min_j r_ij``: the sweep's fixed
        one (``fixed``, see :class:`_Floors`) or the tile's row minimum.
        ``col_lse[k]``: the column log-sum-exp of the logits (bidirectional); None
        with whole columns, where this tile gives them.
        """
        xp, f64, limit = self.xp, self.xp.float64, _span_limit(self.dtype)
        side = _side(tile.run)
        if fixed is None:
            rmin = r.min(axis=1)
            floor = rmin.astype(f64)
            lo, hi = _finite_range(xp, floor)
            near = xp.where(xp.isfinite(rmin), rmin, 0.0).astype(r.dtype, copy=False)
        else:
            floor, near = fixed.floor[side][rows], fixed.near[side][rows]
            lo, hi = fixed.span[side]
        if not math.isfinite(lo):
            return  # no pair of these rows interacts
        v = r
        v -= near[:, None]  # >= 0, inf where masked
        e = self._view(ws["e"], r.shape)
        own_columns = self.bidirectional and col_lse is None
        if own_columns:
            # Column sums from the row-shifted exponentials below, as
            # exp(-c (r_ij - lo)) = exp(-c (r_ij - f_i)) exp(-c (f_i - lo)) with lo = min f,
            # when every column maximum and row factor stays within range; otherwise
            # directly from exp(-c (r_ij - cmin_j)).
            span = max(hi, _finite_range(xp, cmin)[1]) - lo
            direct = [k for k, c in enumerate(self.coefs) if c * span > limit]
            if direct:
                cols = [LogSumExp(xp, tile.n, self.dtype) for _ in self.coefs]
                self._column_sums(ws, v, cmin, cols, direct, near=near)
        for k, c in enumerate(self.coefs):
            xp.multiply(v, -c, out=e)
            xp.exp(e, out=e)  # exp(-c (r_ij - f_i)) <= 1
            lc = None if col_lse is None else col_lse[k]
            if own_columns:
                if c * span > limit:
                    lc = cols[k].value()
                else:
                    rho = xp.exp(-c * (floor - lo)).astype(self.dtype)
                    with _quiet(xp):
                        lc = -c * lo + xp.log((rho @ e).astype(f64))
            lse = None if row_lse is None else row_lse[k]
            if fixed is None:
                self._fold_rows(ws, rows, c, e, v, near, floor, tile, lc, sums[k], lse)
            else:
                self._add_rows(ws, rows, k, e, tile, lc, sums[k], lse, fixed)

    def _column_log_factors(self, lc, logw):
        """``b_j``, the log of target ``j``'s factor in the row sums: ``log w_j - LC_j / 2``
        (bidirectional) or ``log w_j`` (None: no factors)."""
        if not self.bidirectional:
            return logw
        xp = self.xp
        with _quiet(xp):
            b = xp.where(xp.isfinite(lc), -0.5 * lc, -xp.inf)  # a column no query reaches adds nothing
        return b if logw is None else b + logw

    def _column_factors(self, tile: _TargetTile, b, top):
        """``exp(b - top)``, the targets' factors in the row sums (None: all 1)."""
        xp = self.xp
        if b is None and top != 0.0:
            b = xp.zeros(tile.n)  # unit weights under a cap set by other targets
        return None if b is None else xp.exp(b - top).astype(self.dtype)  # 0 where b = -inf

    def _weighted_sums(self, ws, tile: _TargetTile, e, f, row_factor=None):
        """``diag(row_factor) e diag(f / y_unit) (-2 yc)`` (``e`` overwritten): the tile's
        weighted target sums, times ``1 / tile.y_scale``.

        The column factors go into a copy of the targets (bt x D) or, for tiles
        of fewer than D rows, into ``e`` (bq x bt).
        """
        xp, dt = self.xp, self.dtype
        if row_factor is not None:
            e *= row_factor[:, None]
        g = None if f is None else f / dt.type(tile.y_unit)
        if g is None and tile.y_unit != 1.0:
            g = xp.full(tile.n, 1.0 / tile.y_unit, dtype=dt)
        y = tile.ym2
        if g is not None and self._factored_copy:
            y = self._view(ws["yf"], (tile.n, self.d))
            xp.multiply(tile.ym2, g[:, None], out=y)
        elif g is not None:
            e *= g[None, :]
        mm = self._view(ws["mm"], (e.shape[0], self.d))
        xp.matmul(e, y, out=mm)
        return mm

    def _add_rows(self, ws, rows, k, e, tile: _TargetTile, lc, rs: RowSums, lse, fixed):
        """Add ``e = exp(-c (r_ij - f_i))`` to one temperature's sums at the sweep's fixed
        scales (:class:`_Scales`): no per-tile rescaling."""
        xp, dt = self.xp, self.dtype
        side = _side(tile.run)
        f = self._column_factors(tile, self._column_log_factors(lc, tile.log_weight), fixed.cap[k, side])
        ones = xp.ones(tile.n, dtype=dt)
        rs.s[rows] += e @ (ones if f is None else f)
        if lse is not None:
            if tile.log_weight is None:  # weight 1: log weight 0
                t = (e @ ones) * dt.type(math.exp(-fixed.w_top))
            else:
                t = e @ xp.exp(tile.log_weight - fixed.w_top).astype(dt)
            lse.s[rows] += t * fixed.lse_factor[k][side][rows]
        rs.acc[rows] += self._weighted_sums(ws, tile, e, f)

    def _fold_rows(self, ws, rows, c, e, v, near, floor, tile: _TargetTile, lc, rs: RowSums, lse):
        """Fold ``e = exp(-c (r_ij - r_i))`` (``r_i`` the row minima) into one temperature's
        row sums and row log-sum-exp.

        The row sums weight target ``j`` by ``exp(b_j)`` (:meth:`_column_log_factors`)::

            sum_j exp(-c r_ij + b_j) [y_j, 1] = exp(-c r_i + max b) e @ (exp(b - max b) [y, 1])

        one GEMM with the column factors folded into the targets, as long as
        their spread stays within range (:func:`_span_limit`).  Otherwise the
        tile's log-weights are formed entry by entry (:meth:`_fold_rows_direct`).
        The row log-sum-exp (weights ``w``, no ``LC``) likewise from ``e``.
        """
        xp, dt = self.xp, self.dtype
        logw = tile.log_weight
        b = self._column_log_factors(lc, logw)
        b_lo, b_top = (0.0, 0.0) if b is None else _finite_range(xp, b)
        w_lo, w_top = (0.0, 0.0) if logw is None else _finite_range(xp, logw)
        if not math.isfinite(b_top):
            return  # no target of this tile carries weight
        limit = _span_limit(dt)
        if b_top - b_lo > limit or (lse is not None and w_top - w_lo > limit):
            self._fold_rows_direct(ws, rows, c, e, v, near, tile, b, rs, lse)
            return
        f = self._column_factors(tile, b, b_top)
        ones = xp.ones(tile.n, dtype=dt)
        s_t = e @ (ones if f is None else f)
        base = -c * floor  # log of each row's largest kernel value in the tile (-inf: none)
        if lse is not None:
            if logw is None:
                t_t = s_t if f is None else e @ ones
            else:
                t_t = e @ xp.exp(logw - w_top).astype(dt)
            lse.fold(rows, base + w_top, t_t)
        new = rs.fold(rows, base + b_top, s_t)
        rs.acc[rows] += self._weighted_sums(ws, tile, e, f, new * dt.type(tile.y_scale))

    def _fold_rows_direct(self, ws, rows, c, e, v, near, tile: _TargetTile, b, rs: RowSums, lse):
        """:meth:`_fold_rows` with the log-weights formed entry by entry (``e`` overwritten)."""
        xp, dt = self.xp, self.dtype

        def logits(extra):  # -c r_ij (+ extra_j) into e
            xp.multiply(v, -c, out=e)
            xp.subtract(e, (c * near)[:, None], out=e)
            if extra is not None:
                xp.add(e, extra.astype(dt)[None, :], out=e)
            return e

        if lse is not None:
            lse.add(rows, logits(tile.log_weight), 1)
        rs.add(rows, logits(b), tile.ym2, self._view(ws["mm"], (e.shape[0], self.d)), -0.5)


def _part(a, cols):
    return None if a is None else a[cols]


def _side(t: Targets) -> int:
    return 1 if t.negative else 0


def _y_unit(top: float) -> float:
    """A power of two >= ``top`` (at most 1): small targets are scaled up to it in the products."""
    return 2.0 ** min(0, math.ceil(math.log2(top))) if 0.0 < top < math.inf else 1.0


class _Floors:
    """What :meth:`ExactSums.mean_distance` learns for the sweep, per side (0 positives, 1 negatives).

    ``rows[side]``: each query's smallest ``r`` over the targets it interacts
    with (inf for none); ``cols[side]``: the range of the targets' column
    minima; ``y_top[side]``: the largest ``|y - mu|``.
    """

    def __init__(self, xp, n, dtype, targets):
        sides = sorted({_side(t) for t in targets})
        self.rows = {side: xp.full(n, xp.inf, dtype=dtype) for side in sides}
        self.cols = {side: [math.inf, -math.inf] for side in sides}
        self.y_top = {side: 0.0 for side in sides}

    def add(self, xp, rows, tile: _TargetTile, r, cmin) -> None:
        """Take in a distance tile (``r`` and ``cmin`` overwritten; self pairs already inf)."""
        side = _side(tile.run)
        if tile.weightless is not None:
            r[:, tile.weightless] = xp.inf
            cmin[tile.weightless] = xp.inf
        floor = self.rows[side][rows]
        xp.minimum(floor, r.min(axis=1), out=floor)
        lo, hi = _finite_range(xp, cmin)
        col = self.cols[side]
        col[0], col[1] = min(col[0], lo), max(col[1], hi)
        self.y_top[side] = max(self.y_top[side], tile.y_top)

    def scales(self, es: "ExactSums", sums, row_lse):
        """Fixed log-scales for the sweep of ``es``, presetting ``m`` of its ``sums`` and ``row_lse``;
        None where some term that matters could fall out of range (each tile then sets its own).

        With every row shifted by its floor ``f_i`` (so ``exp(-c (r_ij - f_i)) <= 1``,
        and 1 at its nearest target) and every column factor ``exp(b_j - B)`` by
        a cap ``B >= max b``, a row's largest term is at least ``exp(min b - B)``;
        so the spread of ``b`` must stay within :func:`_span_limit`.  Bidirectional
        ``b_j = log w_j - LC_j / 2`` with ``-c cmin_j <= LC_j <= -c cmin_j + log N``.
        """
        xp, f64 = es.xp, es.xp.float64
        limit = _span_limit(es.dtype)
        w = {side: [math.inf, -math.inf] for side in self.rows}
        for t in es.targets:
            lo, hi = (0.0, 0.0) if t.log_weight is None else _finite_range(xp, t.log_weight.astype(f64))
            w[_side(t)] = [min(w[_side(t)][0], lo), max(w[_side(t)][1], hi)]
        w_lo, w_top = min(v[0] for v in w.values()), max(v[1] for v in w.values())
        if es.bidirectional and math.isfinite(w_top) and w_top - w_lo > limit:
            return None
        cap = {}
        for k, c in enumerate(es.coefs):
            for side, (lo_w, hi_w) in w.items():
                lo_c, hi_c = self.cols[side]
                if es.bidirectional:
                    spread = c * (hi_c - lo_c) / 2 + 0.5 * math.log(max(es.n, 1)) + (hi_w - lo_w)
                    top = c * hi_c / 2 + hi_w
                else:
                    spread, top = hi_w - lo_w, hi_w
                if math.isfinite(top) and spread > limit:
                    return None
                cap[k, side] = top if math.isfinite(top) else 0.0  # not finite: nothing to add
        out = _Scales(cap=cap, w_top=w_top if math.isfinite(w_top) else 0.0,
                      unit={side: _y_unit(top) for side, top in self.y_top.items()})
        lowest = None
        for side, floor in self.rows.items():
            out.floor[side] = floor.astype(f64)
            out.near[side] = xp.where(xp.isfinite(floor), floor, 0.0).astype(es.dtype)
            out.span[side] = _finite_range(xp, out.floor[side])
            lowest = out.floor[side] if lowest is None else xp.minimum(lowest, out.floor[side])
        with _quiet(xp):
            for k, c in enumerate(es.coefs):
                for side in self.rows:
                    if sums[k][side] is not None:
                        sums[k][side].m = -c * out.floor[side] + cap[k, side]
                    if row_lse is not None:
                        gap = xp.where(xp.isfinite(out.floor[side]), out.floor[side] - lowest, xp.inf)
                        out.lse_factor.setdefault(k, {})[side] = xp.exp(-c * gap).astype(es.dtype)
                if row_lse is not None:
                    row_lse[k].m = -c * lowest + out.w_top
        return out


@dataclass
class _Scales:
    """Fixed log-scales of one sweep (:meth:`_Floors.scales`)."""

    cap: dict  # (k, side) -> B, the cap of the column log-factors
    w_top: float  # the largest log weight (0 without weights)
    unit: dict  # side -> y unit (:func:`_y_unit`)
    floor: dict = dc_field(default_factory=dict)  # side -> (N,) float64 row floors (inf: none)
    near: dict = dc_field(default_factory=dict)  # side -> the floors in the working dtype, 0 for none
    span: dict = dc_field(default_factory=dict)  # side -> (min, max) of the finite floors
    lse_factor: dict = dc_field(default_factory=dict)  # k -> side -> exp(-c (floor_side - lowest floor))


def combine(xp, sums, row_lse, *, drift_norm: bool, xc=None):
    """Per-temperature fields from the streamed sums, drift-normalised if asked, summed.

    Works in place on the accumulators (they are consumed), so combining needs
    no memory beyond the sums themselves.  ``xc``: the centred queries, needed
    by row normalisation for rows without any negative (there ``b- := x_i``).
    """
    total = None
    for k, (pos, neg) in enumerate(sums):
        if row_lse is None:
            v = pos.acc
            has_pos = pos.s > 0
            v /= xp.where(has_pos, pos.s, 1.0)[:, None]
            if not bool(has_pos.all()):  # no positive of its class: no attraction (b+ := x_i)
                v[~has_pos] = xc[~has_pos]
            has_neg = neg.s > 0
            neg.acc /= xp.where(has_neg, neg.s, 1.0)[:, None]
            if not bool(has_neg.all()):
                # No negative mass (N = 1 self-only, or all weights 0): no repulsion, and the
                # field is the mean shift b+(x_i) - x_i, local to the query.
                neg.acc[~has_neg] = xc[~has_neg]
            v -= neg.acc
        else:
            # V_i = exp(m+_i + m-_i - LR_i) * (s-_i acc+_i - s+_i acc-_i)
            with _quiet(xp):
                logf = pos.m + neg.m - row_lse[k].value()
            finite = xp.isfinite(logf)
            v = pos.acc
            v *= neg.s[:, None]
            neg.acc *= pos.s[:, None]
            v -= neg.acc
            if drift_norm:  # only the relative factor matters before normalising
                ref = xp.max(xp.where(finite, logf, -xp.inf)) if bool(finite.any()) else 0.0
                logf = logf - ref
            factor = xp.where(finite, xp.exp(xp.where(finite, logf, 0.0)), 0.0).astype(v.dtype, copy=False)
            v *= factor[:, None]
        del pos.acc, neg.acc
        if drift_norm:
            v = normalize_drift(xp, v)
        if total is None:
            total = v
        else:
            total += v
    return total


def normalize_drift(xp, v):
    """``v / sqrt(mean_i ||v_i||^2 / D)``; an all-zero field stays zero."""
    flat = v.reshape(-1)
    peak = float(xp.max(xp.abs(flat))) if flat.size else 0.0
    if not (peak > 0 and math.isfinite(peak)):
        return v
    v /= peak  # first to O(1), so the sum of squares cannot overflow in float32
    rms = math.sqrt(float(xp.vdot(flat, flat)) / flat.size)  # no N x D temporary
    v /= rms
    return v


def _exact_tile_cap(device) -> int:
    return max(tile_cap(device), _CPU_TILE) if device.kind == "cpu" else tile_cap(device)


def _weights(xp, neg_weight, m: int, dtype, check_finite: bool):
    """Log of per-negative weights: scalar or (M,), each finite and >= 0."""
    import numpy as np

    if isinstance(neg_weight, float):
        w = xp.full(m, neg_weight, dtype=dtype)
    else:
        w = neg_weight
        if w.ndim != 1 or w.shape[0] != m:
            raise ValueError(f"neg_weight must be a number or an array of shape ({m},) (one per negative), got shape {tuple(w.shape)}")
        if w.dtype.kind not in "fiub":
            raise TypeError(f"neg_weight must hold real numbers, got dtype {w.dtype}")
        w = w.astype(dtype, copy=False)
    # Checked even with check_finite=False: a negative weight would break the row sums.
    bad = ~xp.isfinite(w) | (w < 0)
    if bool(bad.any()):
        first = int(np.argmax(bad.get() if hasattr(bad, "get") else bad))
        raise ValueError(f"neg_weight must be finite and >= 0; neg_weight[{first}] = {float(w[first])!r}")
    with _quiet(xp):
        return xp.log(w)


def resolve_negatives(neg, neg_weight, include_self):
    """Check the negatives' options; return ``include_self`` (resolved) and ``neg_weight``
    (None, a float for any scalar, or the array as given)."""
    if include_self is None:
        include_self = neg is None
    if neg is None and not include_self:
        raise ValueError("include_self=False needs explicit negatives: pass neg, or keep include_self")
    if neg_weight is not None and neg is None:
        raise ValueError("neg_weight weights the explicit negatives: pass neg as well")
    if neg_weight is not None and (isinstance(neg_weight, Real) or getattr(neg_weight, "ndim", None) == 0):
        neg_weight = float(neg_weight)  # Python, NumPy or 0-d array scalar: one weight for all
    return include_self, neg_weight


def drift_field(x, pos, neg=None, *, temperatures=DEFAULT_TEMPERATURES, normalization: str = "bidirectional",
                kernel: str = "laplace", feature_scale="auto", drift_norm: bool = True, neg_weight=None,
                include_self: bool | None = None, return_scale: bool = False, memory_budget=None,
                block_size=None, backend=None, check_finite: bool = True, labels=None, pos_labels=None,
                neg_labels=None, engine=None, precision: str = "float32"):
    """Exact drifting field ``V`` (N x D) at the queries ``x``.

    Parameters
    ----------
    x : array (N, D)
        Queries: generated samples (or their features). NumPy, CuPy, or any
        DLPack-capable array such as a torch tensor (taken zero-copy).
    pos : array (P, D)
        Positives (real samples): attraction.
    neg : array (M, D), optional
        Explicit negatives: repulsion.  Default: the queries themselves, each
        query's own pair masked.
    temperatures : float or sequence of float, default (0.02, 0.05, 0.2)
        One field per temperature; with ``drift_norm`` each is normalised, then
        they are summed.
    normalization : {"bidirectional", "row"}
        ``"bidirectional"``: Algorithm 2 of the drifting paper (row and column
        softmax).  ``"row"``: mean shift ``b+(x) - b-(x)``.
    kernel : {"laplace", "gaussian"}
        ``exp(-d / tau)`` (default) or ``exp(-d^2 / (2 tau^2))``.
    feature_scale : "auto", float or None
        ``"auto"``: divide features by ``S = mean distance / sqrt(D)`` and use
        ``tau * sqrt(D)`` (logits ``-(d / mean d) / tau``).  A float: that ``S``.
        None: raw features and raw ``tau``.  The field is returned in the
        scaled units (``V_raw / S``).
    drift_norm : bool, default True
        Per temperature, ``V <- V / sqrt(mean_i ||V_i||^2 / D)``.
    neg_weight : float or array (M,), optional
        Weights of the explicit negatives (classifier-free guidance); a weight
        ``w`` counts a negative as ``w`` copies.  Needs ``neg``.
    include_self : bool, optional
        Also use the queries as negatives (self pairs masked).  Default: True
        when ``neg`` is None, else False; with ``neg`` and ``neg_weight`` this is
        the guidance setting (generated batch plus weighted real negatives).
    return_scale : bool
        Also return the feature scale ``S`` used (None when unscaled).
    memory_budget : int or str, optional
        Extra bytes this call may use (default ``$DXFIELD_MEMORY_BUDGET``, else
        64 MiB on the CPU and 512 MiB on a GPU).
    block_size : (int, int), optional
        Force the tile shape (query rows, target rows); for tests and tuning.
    backend : {"auto", "numpy", "cupy"}, optional
        Where to compute (default ``$DXFIELD_BACKEND`` or ``"auto"``: follow the input).
    check_finite : bool, default True
        Reject NaN/Inf inputs (one pass over the inputs).
    labels, pos_labels, neg_labels : int arrays (N,), (P,), (M,), optional
        Class-conditional field in one call: a query interacts only with
        targets of its own class (positives, other queries, and explicit
        negatives with ``neg_labels``; explicit negatives without labels
        interact with every query, e.g. guidance's unconditional negatives).
        Equivalent to one call per class, except that ``feature_scale="auto"``
        takes one mean over all same-class pairs.  Needs ``pos_labels``.
    engine : {"auto", "composed", "fused"}, optional
        How the sweeps run (default ``$DXFIELD_ENGINE`` or ``"auto"``).
        ``"composed"``: array operations (NumPy or CuPy), the reference.
        ``"fused"``: CUDA RawKernels around cuBLAS products (GPU, float32;
        see :mod:`dxfield._fused`).  ``"auto"``: fused on a GPU for float32
        inputs, composed otherwise.
    precision : {"float32", "tf32"}, default "float32"
        Precision of the fused engine's matrix products.  ``"tf32"`` uses the
        tensor cores (about 1e-3 relative error in the products); GPU only.

    Returns
    -------
    V : array (N, D), in the namespace and on the device of the inputs
        (NumPy for CPU inputs, CuPy for GPU inputs); float64 if any input is
        float64, else float32.  With ``return_scale``, ``(V, S)``.

    Notes
    -----
    Cost O(N (N + P + M) D) flops per call (shared by all temperatures) and
    memory bounded by ``memory_budget`` beyond the inputs; exact, not approximated.

    Examples
    --------
    >>> import numpy as np, dxfield
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(64, 2)), rng.normal(size=(256, 2)) + 3.0
    >>> V = dxfield.drift_field(x, y)
    >>> V.shape, bool((V.mean(0) > 0).all())  # generated points are pulled toward the data
    ((64, 2), True)
    """
    temps = _checks.temperatures(temperatures)
    normalization = _checks.choice(normalization, "normalization", NORMALIZATIONS)
    kernel = check_kernel(kernel)
    block = _checks.block_size(block_size)
    parse_budget(memory_budget)  # a bad budget fails before any work
    include_self, neg_weight = resolve_negatives(neg, neg_weight, include_self)
    scale_arg = feature_scale
    if not (feature_scale is None or (isinstance(feature_scale, str) and feature_scale == "auto")):
        if isinstance(feature_scale, str):
            raise ValueError(f"feature_scale={feature_scale!r} is not valid; use 'auto', a number > 0, or None")
        scale_arg = _checks.positive_float(feature_scale, "feature_scale")

    if labels is not None and pos_labels is None:
        raise ValueError("labels (of the queries) needs pos_labels (of the positives) too")
    if labels is None and (pos_labels is not None or neg_labels is not None):
        raise ValueError("pos_labels/neg_labels need labels (of the queries) too")
    if neg_labels is not None and neg is None:
        raise ValueError("neg_labels labels the explicit negatives: pass neg as well")
    arrays = {"x": x, "pos": pos, "neg": neg, "labels": labels, "pos_labels": pos_labels,
              "neg_labels": neg_labels}
    weights_is_array = neg_weight is not None and not isinstance(neg_weight, float)
    if weights_is_array:
        arrays["neg_weight"] = neg_weight
    placement, a = place(arrays, backend)
    xp = placement.xp
    budget = parse_budget(memory_budget, device=placement.device)
    with device_context(placement):
        dtype = floating_dtype(xp, a["x"], a["pos"], a["neg"])
        xa = _checks.float_matrix(a["x"], "x", dtype, check_finite=check_finite)
        n, d = xa.shape
        pa = _checks.float_matrix(a["pos"], "pos", dtype, dim=d, check_finite=check_finite)
        qlab = _checks.class_labels(a["labels"], n, "labels")
        plab = _checks.class_labels(a["pos_labels"], pa.shape[0], "pos_labels")
        targets = [Targets(pa, False, labels=plab)]
        if include_self:
            targets.append(Targets(xa, True, is_queries=True, labels=qlab))
        if neg is not None:
            na = _checks.float_matrix(a["neg"], "neg", dtype, dim=d, check_finite=check_finite)
            logw = None
            if neg_weight is not None:
                logw = _weights(xp, a["neg_weight"] if weights_is_array else neg_weight, na.shape[0], dtype, check_finite)
            targets.append(Targets(na, True, log_weight=logw,
                                   labels=_checks.class_labels(a["neg_labels"], na.shape[0], "neg_labels")))

        # One engine for both sweeps: its plan is checked against the budget before any work,
        # and the mean-distance sweep reuses its centred queries and tile shape.
        sweeper = ExactSums(xp, xa, targets, log_kernel_scales=[1.0] * len(temps), kernel=kernel,
                            bidirectional=normalization == "bidirectional", budget=budget,
                            block_size=block, tile_cap=_exact_tile_cap(placement.device), query_labels=qlab)
        sweeper.ops = resolve_engine(engine, precision, placement, dtype, len(temps))
        sweeper.precision = precision
        scale = None
        unit = 1.0  # distance unit the temperatures are measured in
        if scale_arg == "auto":
            mean_d = sweeper.mean_distance()
            scale = mean_d / math.sqrt(d) if mean_d > 0 and math.isfinite(mean_d) else 1.0
        elif scale_arg is not None:
            scale = float(scale_arg)
        if scale is not None:
            unit = scale * math.sqrt(d)
        sweeper.coefs = tuple(logit_coef(kernel, tau * unit) for tau in temps)
        sums, row_lse = sweeper.sweep()
        v = combine(xp, sums, row_lse, drift_norm=drift_norm, xc=sweeper.xc)
        del sweeper
        if scale is not None and not drift_norm:
            v /= scale
        v = placement.to_origin(v)
        return (v, scale) if return_scale else v

