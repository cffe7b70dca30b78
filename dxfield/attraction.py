"""The projected field's attraction: estimators of the positives' side from the summaries.

Three estimators, each a function of the summaries ``pf`` (a
:class:`dxfield.summaries.Summaries`), the queries and their class groups:

* :func:`row_attraction` -- the row-normalised barycentre ``b+(x) = k(x, U) A G /
  k(x, U) A t`` (docs/design.md section 2.4);
* :func:`bidirectional_attraction` -- Algorithm 2's positives' side against the
  whole summarised data, column sums taken at the landmarks (section 2.6);
* :func:`corrected_attraction` -- the same, corrected by the residual of a
  uniform sample of the data (section 2.7).

They share one loop over the class groups of the queries (:func:`query_groups`)
and one landmark fallback for rows whose Nystrom sums lost their sign or their
digits (:func:`landmark_fallback`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import device_of, placement_of
from .kernels import logit_coef, sqdist
from .memory import tile_cap
from .nystrom import column_log_sums, kernel_products
from .sums import logsumexp


@dataclass
class QueryGroup:
    """Queries that see the same landmarks: one class (its own shard) or all (every shard)."""

    shards: list  # indices of the shards whose landmarks the group sees
    xs: Any  # the group's queries
    idx: Any  # where its rows go in the output (a full slice for all queries)
    uc: Any  # landmarks centred on the cache's centre, working dtype
    uu: Any  # their squared norms
    mass: Any  # data points each landmark stands for (n / m of its shard)
    folded: list  # per temperature A [G | t | |A t|] (working dtype)


def query_groups(pf, xp, xa, groups):
    """Yield a :class:`QueryGroup` per class group (``groups`` from the labels), or one for all."""
    dev = pf.on_device(placement_of(xp, xa))
    nt = len(pf.temperatures)
    for si, rows in [(None, None)] if groups is None else groups:
        if si is None:
            yield QueryGroup(list(range(len(pf.shards))), xa, slice(None), dev["uc_all"], dev["uu_all"],
                             dev["mass_all"], dev["folded_all"])
        else:
            idx = xp.asarray(rows)
            yield QueryGroup([si], xa[idx], idx, dev["uc"][si], dev["uu"][si], dev["mass"][si],
                             [dev["folded"][si][k] for k in range(nt)])


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


def _log_sums(xp, shift, s, has, top=0.0):
    """``shift + top + log s`` in float64 where ``has``, else -inf."""
    with np.errstate(divide="ignore"):
        return xp.where(has, shift.astype(xp.float64) + top + xp.log(xp.where(has, s, 1.0).astype(xp.float64)),
                        -xp.inf)


def bidirectional_attraction(pf, xp, xa, groups):
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
    """
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
            log_w, log_r = _log_sums(xp, shift, den, has), _log_sums(xp, shift, rsum, has, tops[k])
            for o, p in zip(out[k], (b, log_w, log_r)):
                o[g.idx] = p
    return out, fallback


def _sample_parts(pf, xp, g: QueryGroup, ysc, sample_rows):
    """The sample rows that correct group ``g``, by shard: ``(landmark slice, rows, n / B)``."""
    offsets = np.concatenate([[0], np.cumsum([pf.shards[i].m for i in g.shards])])
    parts = []
    for j, i in enumerate(g.shards):
        key = None if pf.classes == [None] else i
        mine = sample_rows.get(key)
        if mine is not None and len(mine):
            rows = xp.asarray(mine)
            parts.append((slice(int(offsets[j]), int(offsets[j + 1])), ysc[rows], pf.shards[i].n / int(rows.shape[0])))
    return parts


def corrected_attraction(pf, xp, xa, groups, ys, sample_rows):
    """The positives' side like :func:`bidirectional_attraction`, with the Nystrom sums corrected
    by the residual of a uniform sample ``ys`` of the data (``pos_sample`` of the field).

    The residual's sums regroup into cheap pieces: the sample's own Nystrom
    summaries, ``(n / B) W^{-1} k(U, Y_s) [Y_s, 1]`` (m x (D+1), float64), are
    subtracted from the cached ones, and its exact terms
    ``(n / B) k(x, y) c_y^{-1/2} [y, 1]`` (an N x B block, exact column sums
    over the queries) are added: per call O(N (m + B) D + m B D + m^2 D).
    Rows whose corrected sums are not positive keep the Nystrom values
    (counted as fallback rows).  ``sample_rows``: the rows of ``ys`` per shard
    index (``None`` for an unconditional cache).
    """
    n, d = xa.shape
    nt = len(pf.temperatures)
    dt, f64 = pf.dtype, xp.float64
    out = [(xp.empty((n, d), dtype=dt), xp.empty(n, dtype=f64), xp.empty(n, dtype=f64)) for _ in range(nt)]
    fallback = [0] * nt
    centre = pf.on_device(placement_of(xp, xa))["centre"]
    ysc = ys - centre
    dist = (lambda a, b: xp.sqrt(sqdist(a, b))) if pf.kernel == "laplace" else sqdist  # noqa: E731
    for g in query_groups(pf, xp, xa, groups):
        xc = g.xs - centre
        samples = _sample_parts(pf, xp, g, ysc, sample_rows)
        du = dist(xc, g.uc)  # N x m
        dys = [dist(xc, yb) for _, yb, _ in samples]  # N x B_j
        duys = [dist(g.uc[sl], yb) for sl, yb, _ in samples]  # m_j x B_j
        for k in range(nt):
            b, log_w, log_r, nbad = _corrected_sums(pf, xp, g, k, du, samples, dys, duys)
            fallback[k] += nbad
            for o, p in zip(out[k], (b, log_w, log_r)):
                o[g.idx] = p
    return out, fallback


def _corrected_sums(pf, xp, g: QueryGroup, k: int, du, samples, dys, duys):
    """One temperature of :func:`corrected_attraction` for group ``g``: ``(b, log_w, log_r, fallback rows)``."""
    d = g.xs.shape[1]
    dt, f64 = pf.dtype, xp.float64
    coef = logit_coef(pf.kernel, pf.taus[k])
    winv = pf.inverse_gram(pf.on_device(placement_of(xp, g.xs)), xp, g.shards, k)
    folded = g.folded[k][:, :d + 1]  # A [G | t]
    # k_iu c_u^{-1/2} = exp(e_iu) and k_iu = exp(e_iu) c_u^{1/2}: column sums over the queries
    Lu = du * -coef
    half = 0.5 * logsumexp(xp, Lu, 0)
    e_u = Lu - half.astype(dt)[None, :]
    shift = xp.maximum(e_u.max(axis=1), Lu.max(axis=1))  # every term below is <= 1 in its units
    halves, e_y = [], []
    for dy in dys:
        L = dy * -coef
        halves.append(0.5 * logsumexp(xp, L, 0))  # the sample points' exact column sums
        e_y.append(L - halves[-1].astype(dt)[None, :])
        shift = xp.maximum(shift, xp.maximum(e_y[-1].max(axis=1), L.max(axis=1)))
    # the sample's Nystrom summaries, subtracted from the cached ones (float64, m x (D+1))
    corrected = folded.astype(f64)
    for (sl, yb, scale), duy in zip(samples, duys):
        # the sums k(U, Y_s) [Y_s, 1] in the working dtype, like the cached ones (Summaries.accumulate)
        kuy = xp.exp(duy * -coef)
        yb1 = xp.concatenate([yb, xp.ones((yb.shape[0], 1), dtype=dt)], axis=1)
        corrected[sl] -= scale * (winv[sl, sl] @ (kuy @ yb1).astype(f64))
    E = xp.exp(e_u - shift[:, None])  # units exp(shift_i)
    mats = corrected.astype(dt)
    pr = E @ mats  # [acc | s_w]
    root_c = xp.exp(half).astype(dt)  # c_u^{1/2}
    r = E @ (mats[:, d] * root_c)  # plain row sums k_i. W^{-1} t
    for (sl, yb, scale), h, e in zip(samples, halves, e_y):
        ay = xp.exp(e - shift[:, None])
        pr[:, :d] += scale * (ay @ yb)
        pr[:, d] += scale * ay.sum(axis=1)
        r += scale * (ay @ xp.exp(h).astype(dt))
    bad = ~(pr[:, d] > 0) | ~(r > 0)
    nbad = 0
    if samples and bool(bad.any()):  # the sample's estimate went negative there: Nystrom alone
        nbad = int(bad.sum())
        pr[bad] = E[bad] @ folded
        r[bad] = E[bad] @ (folded[:, d] * root_c)
    s_w = pr[:, d]
    has = (s_w > 0) & (r > 0)  # False only without any data
    safe_s = xp.where(has, s_w, 1.0)
    b = pr[:, :d] / safe_s[:, None]
    return b, _log_sums(xp, shift, safe_s, has), _log_sums(xp, shift, r, has), nbad
