"""The composed engine's arithmetic on one distance tile: row sums, column sums, weights.

Given a tile of distances between a block of queries and a tile of targets,
:class:`RowPass` folds ``exp(-c r)`` (each row shifted by its floor, each
target by its column factor) into the running row sums of every temperature
with one matrix product per temperature, and takes the bidirectional column
sums from the same exponentials where the range allows (docs/design.md
sections 2.1 and 3).  The fused engine does the same in CUDA kernels
(:mod:`dxfield.fused`).
"""

from __future__ import annotations

import math

from .memory import tile_view
from .sums import LogSumExp, RowSums, finite_range, quiet, span_limit
from .targets import TargetTile, side_of


class RowPass:
    """Row (and column) sums of one sweep's distance tiles at the logit coefficients ``coefs``."""

    def __init__(self, es, coefs):
        self.xp, self.dtype, self.d = es.xp, es.dtype, es.d
        self.bidirectional, self.factored_copy = es.bidirectional, es.factored_copy
        self.coefs = tuple(coefs)

    def column_sums(self, ws, r, cmin, cols, ks=None, near=None):
        """Fold the column sums of ``exp(-c_k r)`` into ``cols[k]`` (for ``k`` in ``ks``).

        ``r`` is overwritten, unless ``near`` is given: then ``r`` holds the
        shifted distances ``r - near_i`` and is kept.
        """
        xp = self.xp
        cmin64 = cmin.astype(xp.float64)
        low = xp.where(xp.isfinite(cmin), cmin, 0.0).astype(r.dtype, copy=False)[None, :]
        e = tile_view(ws["e"], r.shape)
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

    def row_sums(self, ws, rows, r, cmin, tile: TargetTile, col_lse, sums, row_lse, fixed):
        """Add one distance tile ``r`` (masked pairs inf; overwritten) to the row sums of every
        temperature.

        Each row is shifted by a floor ``f_i <= min_j r_ij``: the sweep's fixed
        one (``fixed``, see :class:`dxfield.scales.Floors`) or the tile's row minimum.
        ``col_lse[k]``: the column log-sum-exp of the logits (bidirectional); None
        with whole columns, where this tile gives them.
        """
        xp, f64, limit = self.xp, self.xp.float64, span_limit(self.dtype)
        side = side_of(tile.run)
        if fixed is None:
            rmin = r.min(axis=1)
            floor = rmin.astype(f64)
            lo, hi = finite_range(xp, floor)
            near = xp.where(xp.isfinite(rmin), rmin, 0.0).astype(r.dtype, copy=False)
        else:
            floor, near = fixed.floor[side][rows], fixed.near[side][rows]
            lo, hi = fixed.span[side]
        if not math.isfinite(lo):
            return  # no pair of these rows interacts
        v = r
        v -= near[:, None]  # >= 0, inf where masked
        e = tile_view(ws["e"], r.shape)
        own_columns = self.bidirectional and col_lse is None
        if own_columns:
            # Column sums from the row-shifted exponentials below, as
            # exp(-c (r_ij - lo)) = exp(-c (r_ij - f_i)) exp(-c (f_i - lo)) with lo = min f,
            # when every column maximum and row factor stays within range; otherwise
            # directly from exp(-c (r_ij - cmin_j)).
            span = max(hi, finite_range(xp, cmin)[1]) - lo
            direct = [k for k, c in enumerate(self.coefs) if c * span > limit]
            if direct:
                cols = [LogSumExp(xp, tile.n, self.dtype) for _ in self.coefs]
                self.column_sums(ws, v, cmin, cols, direct, near=near)
        for k, c in enumerate(self.coefs):
            xp.multiply(v, -c, out=e)
            xp.exp(e, out=e)  # exp(-c (r_ij - f_i)) <= 1
            lc = None if col_lse is None else col_lse[k]
            if own_columns:
                if c * span > limit:
                    lc = cols[k].value()
                else:
                    rho = xp.exp(-c * (floor - lo)).astype(self.dtype)
                    with quiet(xp):
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
        with quiet(xp):
            b = xp.where(xp.isfinite(lc), -0.5 * lc, -xp.inf)  # a column no query reaches adds nothing
        return b if logw is None else b + logw

    def _column_factors(self, tile: TargetTile, b, top):
        """``exp(b - top)``, the targets' factors in the row sums (None: all 1)."""
        xp = self.xp
        if b is None and top != 0.0:
            b = xp.zeros(tile.n)  # unit weights under a cap set by other targets
        return None if b is None else xp.exp(b - top).astype(self.dtype)  # 0 where b = -inf

    def _weighted_sums(self, ws, tile: TargetTile, e, f, row_factor=None):
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
        if g is not None and self.factored_copy:
            y = tile_view(ws["yf"], (tile.n, self.d))
            xp.multiply(tile.ym2, g[:, None], out=y)
        elif g is not None:
            e *= g[None, :]
        mm = tile_view(ws["mm"], (e.shape[0], self.d))
        xp.matmul(e, y, out=mm)
        return mm

    def _add_rows(self, ws, rows, k, e, tile: TargetTile, lc, rs: RowSums, lse, fixed):
        """Add ``e = exp(-c (r_ij - f_i))`` to one temperature's sums at the sweep's fixed
        scales (:class:`dxfield.scales.Scales`): no per-tile rescaling."""
        xp, dt = self.xp, self.dtype
        side = side_of(tile.run)
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

    def _fold_rows(self, ws, rows, c, e, v, near, floor, tile: TargetTile, lc, rs: RowSums, lse):
        """Fold ``e = exp(-c (r_ij - r_i))`` (``r_i`` the row minima) into one temperature's
        row sums and row log-sum-exp.

        The row sums weight target ``j`` by ``exp(b_j)`` (:meth:`_column_log_factors`)::

            sum_j exp(-c r_ij + b_j) [y_j, 1] = exp(-c r_i + max b) e @ (exp(b - max b) [y, 1])

        one GEMM with the column factors folded into the targets, as long as
        their spread stays within range (:func:`span_limit`).  Otherwise the
        tile's log-weights are formed entry by entry (:meth:`_fold_rows_direct`).
        The row log-sum-exp (weights ``w``, no ``LC``) likewise from ``e``.
        """
        xp, dt = self.xp, self.dtype
        logw = tile.log_weight
        b = self._column_log_factors(lc, logw)
        b_lo, b_top = (0.0, 0.0) if b is None else finite_range(xp, b)
        w_lo, w_top = (0.0, 0.0) if logw is None else finite_range(xp, logw)
        if not math.isfinite(b_top):
            return  # no target of this tile carries weight
        limit = span_limit(dt)
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

    def _fold_rows_direct(self, ws, rows, c, e, v, near, tile: TargetTile, b, rs: RowSums, lse):
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
        rs.add(rows, logits(b), tile.ym2, tile_view(ws["mm"], (e.shape[0], self.d)), -0.5)

