"""Fixed log-scales for a whole exact sweep, learnt on the mean-distance pass.

With ``feature_scale="auto"`` the sweep first measures every distance once; on
the way :class:`Floors` records each row's nearest target and the range of the
column minima, from which :meth:`Floors.scales` fixes one log-scale per row and
side for the whole sweep (:class:`Scales`), so the accumulators never need
rescaling (docs/design.md section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dc_field

from .sums import finite_range, quiet, span_limit
from .targets import TargetTile, side_of, y_unit

class Floors:
    """What :meth:`ExactSums.mean_distance` learns for the sweep, per side (0 positives, 1 negatives).

    ``rows[side]``: each query's smallest ``r`` over the targets it interacts
    with (inf for none); ``cols[side]``: the range of the targets' column
    minima; ``y_top[side]``: the largest ``|y - mu|``.
    """

    def __init__(self, xp, n, dtype, targets):
        sides = sorted({side_of(t) for t in targets})
        self.rows = {side: xp.full(n, xp.inf, dtype=dtype) for side in sides}
        self.cols = {side: [math.inf, -math.inf] for side in sides}
        self.y_top = {side: 0.0 for side in sides}

    def add(self, xp, rows, tile: TargetTile, r, cmin) -> None:
        """Take in a distance tile (``r`` and ``cmin`` overwritten; self pairs already inf)."""
        side = side_of(tile.run)
        if tile.weightless is not None:
            r[:, tile.weightless] = xp.inf
            cmin[tile.weightless] = xp.inf
        floor = self.rows[side][rows]
        xp.minimum(floor, r.min(axis=1), out=floor)
        lo, hi = finite_range(xp, cmin)
        col = self.cols[side]
        col[0], col[1] = min(col[0], lo), max(col[1], hi)
        self.y_top[side] = max(self.y_top[side], tile.y_top)

    def scales(self, es, coefs, sums, row_lse):
        """Fixed log-scales for the sweep of ``es`` at the logit coefficients ``coefs``, presetting ``m`` of its ``sums`` and ``row_lse``;
        None where some term that matters could fall out of range (each tile then sets its own).

        With every row shifted by its floor ``f_i`` (so ``exp(-c (r_ij - f_i)) <= 1``,
        and 1 at its nearest target) and every column factor ``exp(b_j - B)`` by
        a cap ``B >= max b``, a row's largest term is at least ``exp(min b - B)``;
        so the spread of ``b`` must stay within :func:`span_limit`.  Bidirectional
        ``b_j = log w_j - LC_j / 2`` with ``-c cmin_j <= LC_j <= -c cmin_j + log N``.
        """
        xp, f64 = es.xp, es.xp.float64
        limit = span_limit(es.dtype)
        w = {side: [math.inf, -math.inf] for side in self.rows}
        for t in es.targets:
            lo, hi = (0.0, 0.0) if t.log_weight is None else finite_range(xp, t.log_weight.astype(f64))
            w[side_of(t)] = [min(w[side_of(t)][0], lo), max(w[side_of(t)][1], hi)]
        w_lo, w_top = min(v[0] for v in w.values()), max(v[1] for v in w.values())
        if es.bidirectional and math.isfinite(w_top) and w_top - w_lo > limit:
            return None
        cap = {}
        for k, c in enumerate(coefs):
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
        out = Scales(cap=cap, w_top=w_top if math.isfinite(w_top) else 0.0,
                      unit={side: y_unit(top) for side, top in self.y_top.items()})
        lowest = None
        for side, floor in self.rows.items():
            out.floor[side] = floor.astype(f64)
            out.near[side] = xp.where(xp.isfinite(floor), floor, 0.0).astype(es.dtype)
            out.span[side] = finite_range(xp, out.floor[side])
            lowest = out.floor[side] if lowest is None else xp.minimum(lowest, out.floor[side])
        with quiet(xp):
            for k, c in enumerate(coefs):
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
class Scales:
    """Fixed log-scales of one sweep (:meth:`Floors.scales`)."""

    cap: dict  # (k, side) -> B, the cap of the column log-factors
    w_top: float  # the largest log weight (0 without weights)
    unit: dict  # side -> y unit (:func:`_y_unit`)
    floor: dict = dc_field(default_factory=dict)  # side -> (N,) float64 row floors (inf: none)
    near: dict = dc_field(default_factory=dict)  # side -> the floors in the working dtype, 0 for none
    span: dict = dc_field(default_factory=dict)  # side -> (min, max) of the finite floors
    lse_factor: dict = dc_field(default_factory=dict)  # k -> side -> exp(-c (floor_side - lowest floor))

