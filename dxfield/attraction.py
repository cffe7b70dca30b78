"""The projected field's attraction: estimators of the positives' side from the summaries.

Three estimators, each a function of the summaries ``pf`` (a
:class:`dxfield.summaries.Summaries`), the queries and their class groups:

* :func:`row_attraction` -- the row-normalised barycentre ``b+(x) = k(x, U) A G /
  k(x, U) A t`` (docs/design.md section 2.4);
* :func:`bidirectional_attraction` -- Algorithm 2's positives' side against the
  whole summarised data, column sums taken at the landmarks (section 2.6);
* the corrected attraction (:mod:`dxfield.correction`) -- the same, corrected by
  the residual of a uniform sample of the data (section 2.7).

They share one loop over the class groups of the queries
(:func:`dxfield.stacking.query_groups`), or its stacked form
(:class:`dxfield.stacking.Batches`), and one landmark fallback for rows whose
Nystrom sums lost their sign or their digits (:func:`landmark_fallback`).
"""

from __future__ import annotations

import numpy as np

from .backend import device_of, placement_of, to_host
from .kernels import logit_coef
from .memory import tile_cap
from .nystrom import column_log_sums, kernel_products
from .blocksums import log_sums, settled, weighted
from .stacking import (Batches, Block, QueryGroup, blocked, landmark_terms, masked_distances, padded,
                       query_groups, repulsion_fits)
from .sums import quiet


def _products_kw(pf, xa) -> dict:
    return dict(budget=pf.memory_budget, tile_entries=tile_cap(device_of(xa)))


def landmark_fallback(pf, xp, g: QueryGroup, bad_idx, k: int, columns, **kw):
    """The landmarks as the data, for the rows ``bad_idx`` of group ``g`` at temperature ``k``.

    ``columns`` are the per-landmark columns the estimator's Nystrom product
    had (the landmarks' coordinates and masses in their place); returns the
    row-shifted products and their shifts.
    """
    dev_centre = pf.on_device(placement_of(xp, g.xs))["centre"]
    ext = xp.concatenate(columns, axis=1)
    return kernel_products(xp, g.xs[bad_idx], g.uc, g.uu, dev_centre, [ext], [pf.taus[k]], pf.kernel,
                           shift_rows=True, **_products_kw(pf, g.xs), **kw)


def row_attraction(pf, xp, xa, groups, ops=None, precision="float32"):
    """Per temperature b+ (N x D) in coordinates centred on the cache's centre; and fallback counts."""
    n, d = xa.shape
    nt = len(pf.temperatures)
    centre = pf.on_device(placement_of(xp, xa))["centre"]
    out = [xp.empty((n, d), dtype=pf.dtype) for _ in range(nt)]
    fallback = [0] * nt
    for g in query_groups(pf, xp, xa, groups):
        prods, _ = kernel_products(xp, g.xs, g.uc, g.uu, centre, g.folded, pf.taus, pf.kernel,
                                   shift_rows=True, ops=ops, precision=precision, **_products_kw(pf, xa))
        for k, pr in enumerate(prods):
            # Fallback where the denominator is not positive or is lost in cancellation:
            # below den_floor relative to the magnitude of the terms it sums.
            num, den = pr[:, :d], pr[:, d]
            bad = ~(den > pf.den_floor * pr[:, d + 1])
            nbad = int(bad.sum())
            if nbad:
                fallback[k] += nbad
                bad_idx = xp.nonzero(bad)[0]
                ones = xp.ones((g.uc.shape[0], 1), dtype=g.uc.dtype)
                fb, _ = landmark_fallback(pf, xp, g, bad_idx, k, [g.uc, ones], ops=ops)
                num[bad_idx] = fb[0][:, :d]
                den[bad_idx] = fb[0][:, d]
            out[k][g.idx] = num / den[:, None]
    return out, fallback


def bidirectional_attraction(pf, xp, xa, groups, repel: bool = False):
    """The positives' side of Algorithm 2 against the whole summarised data, per temperature.

    Column sums over the queries are taken at the landmarks,
    ``c_u = sum_i k(x_i, u)``, and stand for those of the data points
    around them: ``sum_j k(x, y_j) c_j^{-1/2} [y_j, 1] ~ k(x, U) diag(c^{-1/2})
    W^{-1} [G_raw | t_raw]`` (exact with every point a landmark and ridge -> 0).
    Returns a list over temperatures of ``(b, log_w, log_r)``: ``b`` (N x D,
    centred on the cache's centre) the column-weighted barycentre, ``log_w =
    log sum_j k_ij c_j^{-1/2}`` and ``log_r = log sum_j k_ij`` (float64), and
    the fallback counts (rows where a Nystrom sum lost its sign or its digits
    use the landmarks as the data, each with the mass ``n / m`` of its shard).

    Many small class groups are batched (:class:`Batches`, :class:`_NystromBlock`): one exponential per
    entry and temperature, the temperatures stacked, instead of a loop over the classes (docs/design.md
    sections 8.15, 8.37).  The third item returned: with ``repel`` and batched groups, the negatives' side
    with the queries as the negatives (:func:`dxfield.stacking.block_repulsion`), else None (the caller
    sweeps the negatives).
    """
    if _batchable(pf, xa, groups):
        bt = Batches(pf, xp, xa, groups, None, {})
        neg = repel and repulsion_fits(pf, xa, bt)
        return blocked(pf, xp, xa, bt, _NystromBlock(pf, xp, bt, neg), _nystrom_sums, neg)
    n, d = xa.shape
    nt = len(pf.temperatures)
    centre = pf.on_device(placement_of(xp, xa))["centre"]
    out = [(xp.empty((n, d), dtype=pf.dtype), xp.empty(n), xp.empty(n)) for _ in range(nt)]
    fallback = [0] * nt
    kw = _products_kw(pf, xa)
    for g in query_groups(pf, xp, xa, groups):
        lcs, dists = column_log_sums(xp, g.xs, g.uc, g.uu, centre, pf.taus, pf.kernel, **kw)
        colw, mats, tops, ws = [], [], [], []
        for k, lc in enumerate(lcs):
            top = float(lc.max())
            w = xp.exp(0.5 * (lc - top)).astype(pf.dtype)  # c_u^{1/2} / max: k_iu = e_iu c_u^{1/2}
            # columns: [A G | A t | |A t| | (A t) w | |A t| w]
            mats.append(xp.concatenate([g.folded[k], g.folded[k][:, d:d + 2] * w[:, None]], axis=1))
            colw.append(-0.5 * lc)
            tops.append(0.5 * top)
            ws.append(w)
        prods, shifts = kernel_products(xp, g.xs, g.uc, g.uu, centre, mats, pf.taus, pf.kernel,
                                        shift_rows=True, col_log_weights=colw, distances=dists, **kw)
        for k, pr in enumerate(prods):
            shift = shifts[k]
            num, den, rsum = pr[:, :d], pr[:, d], pr[:, d + 2]
            bad = ~(den > pf.den_floor * pr[:, d + 1]) | ~(rsum > pf.den_floor * pr[:, d + 3])
            nbad = int(bad.sum())
            if nbad:
                fallback[k] += nbad
                bad_idx = xp.nonzero(bad)[0]
                m1, mw = g.mass[:, None], (g.mass * ws[k])[:, None]
                fb, fs = landmark_fallback(pf, xp, g, bad_idx, k, [g.uc * m1, m1, m1, mw, mw],
                                           col_log_weights=[colw[k]])
                pr[bad_idx] = fb[0]
                shift[bad_idx] = fs[0]
            has = den > 0  # only without any data (n = 0)
            b = num / xp.where(has, den, 1.0)[:, None]
            log_w, log_r = log_sums(xp, shift, den, has), log_sums(xp, shift, rsum, has, tops[k])
            for o, p in zip(out[k], (b, log_w, log_r)):
                o[g.idx] = p
    return out, fallback, None


def sample_maps(pf, xp, ysc, sample_rows):
    """``W^{-1} k(U, y)`` of every row ``y`` of ``ysc`` (centred) on its own shard's landmarks, per
    temperature: (rows x T x m_max), the working dtype, zero beyond the shard's ``m``.

    These are the rows' Nystrom coefficients: the Nystrom term of a query ``x`` and a data point ``y``
    is ``k(x, U) diag(c_U^{-1/2}) W^{-1} k(U, y)``, so a correction sample whose maps are given skips
    its landmark distances and the ``m x m`` product of each call (docs/design.md section 8.18).
    ``sample_rows``: the rows per shard index (``None``: the one shard of an unconditional cache)."""
    dev = pf.on_device(placement_of(xp, ysc))
    nt = len(pf.temperatures)
    out = xp.zeros((ysc.shape[0], nt, max(s.m for s in pf.shards)), dtype=pf.dtype)
    chunk = max(1, pf.memory_budget // (8 * (3 + nt) * max(pf.n_landmarks, 1)))
    for key, rows in sample_rows.items():
        si = 0 if key is None else key
        uc, m = dev["uc"][si], pf.shards[si].m
        for r0 in range(0, len(rows), chunk):
            idx = xp.asarray(rows[r0:r0 + chunk])
            dist = masked_distances(xp, pf.kernel, uc[None], ysc[idx][None])[0]  # m x rows
            for k in range(nt):
                kuy = xp.exp(dist * -logit_coef(pf.kernel, pf.taus[k])).astype(xp.float64)
                out[idx, k, :m] = (pf.inverse_gram(dev, xp, [si], k) @ kuy).T.astype(pf.dtype)
    return out


def _batchable(pf, xa, groups) -> bool:
    """Whether the class groups are worth batching: more than one, and their padded (groups x
    queries x landmarks) block within a tile (larger groups amortise their own overheads)."""
    if groups is None or len(groups) < 2:
        return False
    nq = max(len(rows) for _, rows in groups)
    nm = max(pf.shards[si].m for si, _ in groups)
    entries = len(groups) * nq * nm
    return entries <= tile_cap(device_of(xa)) and 8 * entries * xa.dtype.itemsize <= pf.memory_budget


class _NystromBlock(Block):
    """:func:`bidirectional_attraction`'s batched sums, and the queries' own repulsion, from one exponential
    per entry and temperature (:class:`dxfield.blocksums.Side`; docs/design.md section 8.37): the
    query-landmark block's row sums against ``[A G | A t | |A t|]``, weighted by the landmarks' column
    factors ``c_u^{-1/2}`` and plain.  Rows whose Nystrom sums lost their sign or their digits (below
    ``den_floor`` of the magnitude of their terms) use the landmarks as the data, group by group."""

    def __init__(self, pf, xp, bt: Batches, neg: bool):
        super().__init__(pf, xp, bt, bt.du, neg)

    def positives(self, ks, coefs, P, F, top):
        """Per temperature of ``ks`` the positives' ``(b, log_w, log_r, fallback rows)``."""
        pf, xp, bt = self.pf, self.xp, self.bt
        d, dt = bt.xq.shape[2], pf.dtype
        cols = bt.kept(("folded_abs",), lambda: xp.stack(
            [padded(xp, bt, [g.folded[k] for g in bt.groups], d + 2, dt) for k in range(len(pf.taus))]))
        cols = cols[ks[0]:ks[-1] + 1]  # [A G | A t | |A t|] per temperature
        with quiet(xp):
            acc = weighted(xp, P, F, cols)  # rows in units exp(-c f_i + top)
            plain = P @ cols[..., d:]  # [k A t | k |A t|], rows in units exp(-c f_i)
        units = self.pos.units(coefs)
        unit_w = units + top[..., None]
        den, rsum = acc[..., d], plain[..., 0]
        bad = bt.valid & (~(den > pf.den_floor * acc[..., d + 1]) | ~(rsum > pf.den_floor * plain[..., 1]))
        nbad = [int(v) for v in to_host(xp.count_nonzero(bad.reshape(len(ks), -1), axis=1))]
        for i, k in enumerate(ks):
            if nbad[i]:
                self._fallback(k, bad[i], acc[i], plain[i], unit_w[i], units[i], self.pos.log_factors[i])
        b, log_w, log_r = settled(xp, acc[..., :d], den, rsum, unit_w, units)
        return [(b[i], log_w[i], log_r[i], nbad[i]) for i in range(len(ks))]

    def _fallback(self, k, bad, acc, plain, unit_w, units, log_factors):
        """The landmarks as the data for the ``bad`` rows at temperature ``k``, in place: their weighted sums,
        plain sums and both units (``log_factors``: the landmarks' ``-0.5 log c_u``)."""
        pf, xp, bt = self.pf, self.xp, self.bt
        d = bt.xq.shape[2]
        half = xp.where(xp.isfinite(log_factors), -log_factors, 0.0)  # 0.5 log c_u
        for j in np.nonzero(to_host(bad.any(axis=1)))[0]:
            g = bt.groups[j]
            m, idx = g.uc.shape[0], xp.nonzero(bad[j])[0]
            m1, mw = g.mass[:, None], (g.mass * xp.exp(half[j, :m]))[:, None]
            fb, fs = landmark_fallback(pf, xp, g, idx, k, [g.uc * m1, m1, m1, mw, mw],
                                       col_log_weights=[-half[j, :m]])
            acc[j, idx] = fb[0][:, :d + 2]
            plain[j, idx] = fb[0][:, d + 2:]
            unit_w[j, idx] = fs[0]
            units[j, idx] = fs[0]


def _nystrom_sums(pf, xp, bt: "Batches", k: int):
    """One temperature of :func:`bidirectional_attraction`, all groups at once (no sample): like the
    corrected sums of :mod:`dxfield.correction`.  Rows whose Nystrom sums lost their sign or their digits
    (below ``den_floor`` of the magnitude of their terms) use the landmarks as the data, group by group."""
    d = bt.y1.shape[2] - 1
    dt = pf.dtype
    # per landmark: [A G | A t | |A t|] (working dtype), then the same two sums weighted by c_u^{1/2}
    folded = bt.kept(("folded_w", k), lambda: padded(xp, bt, [g.folded[k] for g in bt.groups], d + 2, dt))
    with quiet(xp):
        Lu, half, e_u = landmark_terms(pf, xp, bt, k)
        shift = xp.maximum(e_u.max(axis=2), Lu.max(axis=2))
        shift = xp.where(xp.isfinite(shift), shift, 0).astype(dt)
        E = xp.exp(e_u - shift[:, :, None])  # units exp(shift_i)
        root_c = xp.exp(half).astype(dt)  # c_u^{1/2} <= sqrt(queries): no overflow
        pr = E @ xp.concatenate([folded, folded[:, :, d:d + 2] * root_c[:, :, None]], axis=2)
    den, rsum = pr[:, :, d], pr[:, :, d + 2]
    bad = bt.valid & (~(den > pf.den_floor * pr[:, :, d + 1]) | ~(rsum > pf.den_floor * pr[:, :, d + 3]))
    nbad = int(bad.sum())
    if nbad:
        for j in np.nonzero(to_host(bad.any(axis=1)))[0]:
            g = bt.groups[j]
            m, idx = g.uc.shape[0], xp.nonzero(bad[j])[0]
            m1, mw = g.mass[:, None], (g.mass * root_c[j, :m])[:, None]
            fb, fs = landmark_fallback(pf, xp, g, idx, k, [g.uc * m1, m1, m1, mw, mw],
                                       col_log_weights=[-half[j, :m]])
            pr[j, idx] = fb[0]  # den and rsum are views of pr: they see these rows
            shift[j, idx] = fs[0]
    has = den > 0  # False only without any data (and on padding)
    b = pr[:, :, :d] / xp.where(has, den, 1.0)[:, :, None]
    return b, log_sums(xp, shift, den, has), log_sums(xp, shift, rsum, has), nbad
