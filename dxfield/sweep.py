"""The exact sweep: targets in tiles against all queries, under a memory budget.

:class:`ExactSums` cuts the targets into tiles of the memory plan
(:func:`dxfield.memory.exact_plan`), measures the mean distance when the
feature scale is automatic, and sweeps the tiles into streamed row sums per
temperature and side (:mod:`dxfield.sums`).  The arithmetic on each distance
tile is :class:`dxfield.rowpass.RowPass` (composed engine) or
:mod:`dxfield.fused` (CUDA kernels).  Shared by :func:`dxfield.drift_field` and
the projected field's exact repulsion.  Math: docs/design.md sections 2.1 and 3.
"""

from __future__ import annotations

import math

from .kernels import augmented_queries, augmented_targets, set_diagonal, sq_norms, sqdist_tile
from .memory import exact_plan, tile_view
from .rowpass import RowPass
from .scales import Floors
from .sums import LogSumExp, RowSums
from .targets import Targets, TargetTile, part, side_of, y_unit

class ExactSums:
    """Tiled sweep over targets producing :class:`RowSums` per temperature and side.

    Built complete: the queries, the target runs, the kernel, the normalisation,
    the memory plan and the engine (``ops``: the fused engine's CUDA operations,
    or None for the composed path; ``precision``: its GEMM precision).  Then
    :meth:`mean_distance` (optional, once) and :meth:`sweep` with the logit
    coefficients.  Coordinates are centred on the queries' mean; every field
    built from these sums is translation invariant, so the centre never needs
    adding back.
    """

    def __init__(self, xp, x, targets: list[Targets], *, n_temperatures: int, kernel: str,
                 bidirectional: bool, budget: int, block_size=None, tile_cap: int, sides=(0, 1),
                 query_labels=None, ops=None, precision: str = "float32"):
        self.xp = xp
        self.query_labels = query_labels  # (N,) ints, with Targets.labels: block-diagonal by class
        self.x = x
        self.targets = targets
        self.kernel = kernel
        self.n_temperatures = int(n_temperatures)
        self.bidirectional = bidirectional
        self.sides = tuple(sides)  # which RowSums to keep: 0 positives, 1 negatives
        self.budget, self.block_size = budget, block_size
        self.ops, self.precision = ops, precision
        n, d = x.shape
        self.n, self.d = n, d
        self.dtype = x.dtype
        self.plan, self.factored_copy = exact_plan(
            n, max(t.n for t in targets), d, itemsize=self.dtype.itemsize, n_temps=self.n_temperatures,
            n_sides=len(self.sides), budget=budget, tile_cap=tile_cap, block_size=block_size,
            fused_precision=None if ops is None else precision)
        self._kept = {}  # distance tiles mean_distance() keeps for sweep(), within the budget
        self._floors = None  # what mean_distance() learns for sweep() (Floors)
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
            yf=xp.empty(plan.bt * self.d if self.factored_copy else 0, dtype=self.dtype),
        )
        return self._ws

    def _target_runs(self):
        """Yield ``(t, j0, cols)`` per target tile: its run, first index and slice in the run."""
        for t in self.targets:
            for j0 in range(0, t.n, self.plan.bt):
                yield t, j0, slice(j0, j0 + self.plan.bt)

    def target_tiles(self):
        """Yield ``(t, j0, yc, yy, logw, tlab)`` per target tile (``yc`` centred, ``yy`` its norms)."""
        for t, j0, cols in self._target_runs():
            yc = t.y[cols] - self.mu
            yield t, j0, yc, sq_norms(yc), part(t.log_weight, cols), part(t.labels, cols)

    def _tiles(self, ws, units=None):
        """Yield a :class:`TargetTile` per target tile, built in ``ws`` (valid until the next);
        ``units[side]``: one y unit per side."""
        xp, d = self.xp, self.d
        for t, j0, cols in self._target_runs():
            y = t.y[cols]
            ya = tile_view(ws["ya"], (y.shape[0], d + 2))
            yc = ya[:, :d]
            xp.subtract(y, self.mu, out=yc)
            yy = sq_norms(yc)
            augmented_targets(yc, yy, out=ya)  # yc becomes -2 yc in place
            top = math.sqrt(float(yy.max())) if yy.size else 0.0  # >= max |yc|
            logw = part(t.log_weight, cols)
            weightless = None
            if logw is not None:
                logw = logw.astype(xp.float64)
                weightless = xp.nonzero(logw == -xp.inf)[0]
                weightless = weightless if weightless.shape[0] else None
            unit = y_unit(top) if units is None else units[side_of(t)]
            yield TargetTile(ya, yy, j0, t, logw, part(t.labels, cols), unit, top, weightless)

    def _distance_tiles(self, ws, tile: TargetTile, masked=0.0, unpaired=False, cached=False):
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
                r = tile_view(ws["r"], shape)
                xp.matmul(self._xa[rows], tile.ya.T, out=r)
                sqdist_tile(self.xc[rows], self.xx[rows], tile.ym2, tile.yy, r, tile_view(ws["e"], shape),
                            tile_view(ws["hits"], shape),
                            self_offset=(tile.j0 - i0) if tile.run.is_queries else None, self_value=masked,
                            colmin=cmin, formed=True, refine_entries=r.size // 4, yc_scale=-2.0)
                if self.kernel == "laplace":
                    xp.sqrt(r, out=r)
                    xp.sqrt(cmin, out=cmin)
            elif tile.run.is_queries:
                set_diagonal(r, tile.j0 - i0, masked)
            masks = unpaired and tile.labels is not None
            if masks:  # other-class pairs do not interact
                other = tile_view(ws["hits"], shape)
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
        sweep use fixed log-scales (:class:`Floors`).
        """
        if self.ops is not None:
            from .fused import mean_distance
            return mean_distance(self)
        xp = self.xp
        ws = self._workspace()
        room = self.budget - self.plan.nbytes
        floors = None if self.query_labels is not None else Floors(xp, self.n, self.dtype, self.targets)
        total, count = 0.0, 0
        for tile in self._tiles(ws):
            for rows, r, cmin in self._distance_tiles(ws, tile):
                if r.nbytes <= room:
                    self._kept[(id(tile.run), tile.j0, rows.start)] = r.copy()
                    room -= r.nbytes
                d = r if self.kernel == "laplace" else xp.sqrt(r, out=tile_view(ws["e"], r.shape))
                if tile.labels is not None:  # only same-class pairs interact, so only they set the scale
                    same = tile_view(ws["hits"], d.shape)
                    xp.equal(self.query_labels[rows][:, None], tile.labels[None, :], out=same)
                    d *= same
                    count += int(same.sum()) - d.size
                total += float(d.sum(dtype=xp.float64))
                count += d.size
                if tile.run.is_queries:
                    off, bq = tile.j0 - rows.start, rows.stop - rows.start
                    count -= max(0, min(tile.n, bq - off) - max(0, -off))
                    if floors is not None:
                        set_diagonal(r, off, xp.inf)
                if floors is not None:
                    floors.add(xp, rows, tile, r, cmin)
        self._floors = floors
        return total / count if count > 0 else 0.0

    def sweep(self, coefs):
        """Return ``(sums, row_lse)`` at the logit coefficients ``coefs`` (one per temperature:
        logits ``-coef * d`` or ``-coef * d^2``): ``sums[k][side]`` are :class:`RowSums`;
        ``row_lse[k]`` the row log-sum-exp over all (weighted) targets, or None for row
        normalisation."""
        coefs = tuple(coefs)
        if len(coefs) != self.n_temperatures:
            raise ValueError(f"sweep: {len(coefs)} coefficients for a plan of {self.n_temperatures} temperatures")
        if self.ops is not None:
            from .fused import exact_sweep
            return exact_sweep(self, coefs)
        xp, n, d, dt = self.xp, self.n, self.d, self.dtype
        nt = len(coefs)
        sums = [[RowSums(xp, n, d, dt) if side in self.sides else None for side in (0, 1)] for _ in range(nt)]
        row_lse = [LogSumExp(xp, n, dt) for _ in range(nt)] if self.bidirectional else None
        fixed = None if self._floors is None else self._floors.scales(self, coefs, sums, row_lse)
        ws = self._workspace()
        rp = RowPass(self, coefs)
        whole_columns = self.plan.bq >= n
        for tile in self._tiles(ws, None if fixed is None else fixed.unit):
            side = side_of(tile.run)
            if side not in self.sides:
                raise ValueError("ExactSums: targets on a side that was not requested")
            col_lse = None
            if self.bidirectional and not whole_columns:
                # First sweep over query tiles: complete the column sums of this target tile.
                cols = [LogSumExp(xp, tile.n, dt) for _ in range(nt)]
                for rows, r, cmin in self._distance_tiles(ws, tile, math.inf, unpaired=True):
                    rp.column_sums(ws, r, cmin, cols)
                col_lse = [c.value() for c in cols]
            for rows, r, cmin in self._distance_tiles(ws, tile, math.inf, unpaired=True, cached=True):
                rp.row_sums(ws, rows, r, cmin, tile, col_lse, [s[side] for s in sums], row_lse, fixed)
        if fixed is not None:
            for per_k in sums:
                for side, rs in enumerate(per_k):
                    if rs is not None:
                        rs.settle(-0.5 * fixed.unit.get(side, 1.0))  # they summed -2 yc / unit
        self._ws = None
        return sums, row_lse
