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

from .backend import device_of, placement_of, to_host
from .kernels import logit_coef, sqdist_stacked
from .memory import tile_cap
from .nystrom import column_log_sums, kernel_products
from .sums import logsumexp, quiet


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

    Many small class groups are batched (:class:`_Batches`, :func:`_nystrom_sums`): a few
    operations per temperature instead of a loop over the classes (docs/design.md section 8.15).
    The third item returned: with ``repel`` and batched groups, the negatives' side with the queries
    as the negatives (:func:`self_repulsion`), else None (the caller sweeps the negatives).
    """
    if _batchable(pf, xa, groups):
        return _batched(pf, xp, xa, _Batches(pf, xp, xa, groups, None, {}), _nystrom_sums, repel)
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
    return out, fallback, None


def _sample_parts(pf, xp, g: QueryGroup, ysc, sample_rows):
    """The sample rows that correct group ``g``, by shard: ``(landmark slice, rows, n / B, their indices)``."""
    offsets = np.concatenate([[0], np.cumsum([pf.shards[i].m for i in g.shards])])
    parts = []
    for j, i in enumerate(g.shards):
        key = None if pf.classes == [None] else i
        mine = sample_rows.get(key)
        if mine is not None and len(mine):
            rows = xp.asarray(mine)
            parts.append((slice(int(offsets[j]), int(offsets[j + 1])), ysc[rows], pf.shards[i].n / int(rows.shape[0]),
                          rows))
    return parts


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
            dist = _masked_distances(xp, pf.kernel, uc[None], ysc[idx][None])[0]  # m x rows
            for k in range(nt):
                kuy = xp.exp(dist * -logit_coef(pf.kernel, pf.taus[k])).astype(xp.float64)
                out[idx, k, :m] = (pf.inverse_gram(dev, xp, [si], k) @ kuy).T.astype(pf.dtype)
    return out


def corrected_attraction(pf, xp, xa, groups, ys, sample_rows, maps=None, repel: bool = False):
    """The positives' side like :func:`bidirectional_attraction`, with the Nystrom sums corrected
    by the residual of a uniform sample ``ys`` of the data (``pos_sample`` of the field).

    The residual's sums regroup into cheap pieces: the sample's own Nystrom
    summaries, ``(n / B) W^{-1} k(U, Y_s) [Y_s, 1]`` (m x (D+1), float64), are
    subtracted from the cached ones, and its exact terms
    ``(n / B) k(x, y) c_y^{-1/2} [y, 1]`` (an N x B block, exact column sums
    over the queries) are added: per call O(N (m + B) D + m B D + m^2 D).
    Rows whose corrected sums are not positive keep the Nystrom values
    (counted as fallback rows).  ``sample_rows``: the rows of ``ys`` per shard
    index (``None`` for an unconditional cache).  ``maps``: the rows'
    :func:`sample_maps`, when the caller keeps them (no landmark-sample block
    then).

    The class groups are batched (:class:`_Batches`): every temperature is a
    few operations on (groups x queries x landmarks) arrays, not a loop over
    the classes (docs/design.md section 2.7).  Returns like
    :func:`bidirectional_attraction` (``repel``: the negatives' side too, when
    its block fits).
    """
    centre = pf.on_device(placement_of(xp, xa))["centre"]
    return _batched(pf, xp, xa, _Batches(pf, xp, xa, groups, ys - centre, sample_rows, maps), _corrected_sums,
                    repel)


def _batchable(pf, xa, groups) -> bool:
    """Whether the class groups are worth batching: more than one, and their padded (groups x
    queries x landmarks) block within a tile (larger groups amortise their own overheads)."""
    if groups is None or len(groups) < 2:
        return False
    nq = max(len(rows) for _, rows in groups)
    nm = max(pf.shards[si].m for si, _ in groups)
    entries = len(groups) * nq * nm
    return entries <= tile_cap(device_of(xa)) and 8 * entries * xa.dtype.itemsize <= pf.memory_budget


def _batched(pf, xp, xa, bt: "_Batches", sums, repel: bool = False):
    """Per temperature ``(b, log_w, log_r)`` in the queries' order, and the fallback counts, from
    ``sums(pf, xp, bt, k)`` over the stacked groups ``bt``; with ``repel`` (and a queries x queries
    block per group that fits, :func:`_repulsion_fits`), the negatives' side (:func:`self_repulsion`)
    in the same form, else None."""
    out, fallback = [], []
    for k in range(len(pf.temperatures)):
        b, log_w, log_r, nbad = sums(pf, xp, bt, k)
        out.append(_in_query_order(pf, xp, xa, bt, (b, log_w, log_r)))
        fallback.append(nbad)
    neg = self_repulsion(pf, xp, xa, bt) if repel and _repulsion_fits(pf, xa, bt) else None
    return out, fallback, neg


def _in_query_order(pf, xp, xa, bt: "_Batches", parts):
    """``(b, log_w, log_r)`` of the stacked groups as (N x D, N, N) arrays in the queries' order."""
    n, d = xa.shape
    outs = (xp.empty((n, d), dtype=pf.dtype), xp.empty(n, dtype=xp.float64), xp.empty(n, dtype=xp.float64))
    for o, p in zip(outs, parts):
        o[bt.rows] = p[bt.valid]
    return outs


def _repulsion_fits(pf, xa, bt: "_Batches") -> bool:
    """Whether the negatives' side is worth forming with the stacked groups: more than one group (one
    group of all the queries is the sweep's own case, which it does faster), and their queries x queries
    blocks within a tile and the memory budget."""
    entries = len(bt.groups) * bt.nq * bt.nq
    return (len(bt.groups) > 1 and entries <= tile_cap(device_of(xa))
            and 8 * entries * xa.dtype.itemsize <= pf.memory_budget)


def self_repulsion(pf, xp, xa, bt: "_Batches"):
    """Algorithm 2's negatives' side with each group's queries as its negatives (self pairs masked), all
    groups at once: per temperature ``(b, log_w, log_r)`` in the queries' order, ``b`` centred on the
    cache's centre (docs/design.md section 8.19).

    The same sums as the exact sweep over the negatives: column sums over the group's other queries,
    ``log_w = log sum_j k_ij c_j^{-1/2}`` and ``log_r = log sum_j k_ij`` (-inf for a query alone in its
    group: it has no negative); one stacked block instead of the sweep's tiles and passes."""
    eye = xp.eye(bt.nq, dtype=bool)[None]
    pair = bt.valid[:, :, None] & bt.valid[:, None, :] & ~eye
    dq = _masked_distances(xp, pf.kernel, bt.xq, bt.xq, pair)
    out = []
    with quiet(xp):
        for k in range(len(pf.temperatures)):
            lq = dq * -logit_coef(pf.kernel, pf.taus[k])  # -inf off the pairs
            half = _half_column_sums(xp, lq)
            e = lq - half[:, None, :]  # k_ij c_j^{-1/2} = exp(e_ij)
            shift = e.max(axis=2)
            shift = xp.where(xp.isfinite(shift), shift, 0).astype(pf.dtype)
            p = xp.exp(e - shift[:, :, None])  # units exp(shift_i)
            s = p.sum(axis=2)
            r = (p @ xp.exp(half)[:, :, None])[:, :, 0]  # k_ij = exp(e_ij) c_j^{1/2}: the plain row sums
            has = s > 0
            b = (p @ bt.xq) / xp.where(has, s, 1.0)[:, :, None]
            out.append(_in_query_order(pf, xp, xa, bt, (b, _log_sums(xp, shift, s, has),
                                                         _log_sums(xp, shift, r, has))))
    return out


class _Batches:
    """The query groups of :func:`corrected_attraction`, padded and stacked: (groups x rows x ...) arrays.

    Per group ``g``: its queries (``nq`` rows at most), its landmarks (``nm``),
    the sample rows that correct it (``ns``, each with its scale ``n_s / B_s``
    and the landmarks of its own shard), and the distances between them; or,
    with the sample rows' ``maps``, their ``W^{-1} k(U, y)`` (``zy``: T x groups
    x nm x ns) instead of the landmark-sample distances.
    Padding is masked: padded queries, landmarks and sample rows get logit
    -inf, so they add nothing to any sum.
    """

    def __init__(self, pf, xp, xa, groups, ysc, sample_rows, maps=None):
        dev = pf.on_device(placement_of(xp, xa))
        gs = list(query_groups(pf, xp, xa, groups))
        nb, d, dt = len(gs), xa.shape[1], pf.dtype
        parts = [_sample_parts(pf, xp, g, ysc, sample_rows) for g in gs]
        nq = max(int(g.xs.shape[0]) for g in gs)
        nm = max(int(g.uc.shape[0]) for g in gs)
        ns = max([sum(int(yb.shape[0]) for _, yb, _, _ in p) for p in parts] + [1])
        self.groups, self.nq, self.nm, self.ns, self.dev = gs, nq, nm, ns, dev
        self.key = (tuple(tuple(g.shards) for g in gs), nm)  # the padded summaries depend on this only
        self.xq = xq = xp.zeros((nb, nq, d), dtype=dt)  # each group's queries - c (zeros: padding)
        self.y1 = xp.zeros((nb, ns, d + 1), dtype=dt)  # [y - c, 1] of the sample rows
        self.scale = xp.zeros((nb, ns), dtype=dt)  # n_s / B_s of each sample row's shard
        self.valid = xp.zeros((nb, nq), dtype=bool)
        pairs = np.zeros((nb, nm, ns), dtype=bool)  # landmark and sample row of the same shard
        self.has_sample = any(parts)
        self.zy = None if maps is None else xp.zeros((maps.shape[1], nb, nm, ns), dtype=dt)
        for j, (g, p) in enumerate(zip(gs, parts)):
            q = int(g.xs.shape[0])
            xq[j, :q] = g.xs - dev["centre"]
            self.valid[j, :q] = True
            at = 0
            for sl, yb, scale, rows in p:
                cols = slice(at, at + int(yb.shape[0]))
                pairs[j, sl, cols] = True
                if maps is not None:
                    self.zy[:, j, sl, cols] = maps[rows, :, :sl.stop - sl.start].transpose(1, 2, 0)
                self.y1[j, cols, :d] = yb
                self.y1[j, cols, d] = 1
                self.scale[j, cols] = scale
                at = cols.stop
        uc, has_u = self.landmarks(xp, d, dt)
        dist = (lambda a, b, mask: _masked_distances(xp, pf.kernel, a, b, mask))  # noqa: E731
        self.du = dist(xq, uc, self.valid[:, :, None] & has_u[:, None, :])  # query-landmark (inf: padding)
        if self.has_sample:
            ys, has_y = self.y1[:, :, :d], self.scale > 0
            self.dy = dist(xq, ys, self.valid[:, :, None] & has_y[:, None, :])  # query-sample
            self.duy = None if maps is not None else dist(uc, ys, xp.asarray(pairs))  # landmark-sample (inf: other shard)
        else:
            self.dy = xp.full((nb, nq, ns), float("inf"), dtype=dt)
            self.duy = xp.full((nb, nm, ns), float("inf"), dtype=dt)
        self.rows = xp.concatenate([xp.asarray(g.idx) if not isinstance(g.idx, slice)
                                    else xp.arange(xa.shape[0]) for g in gs])

    def landmarks(self, xp, d: int, dtype):
        """Every group's landmarks (centred), padded: (groups x nm x D), and which are real (made once
        per device and set of groups)."""
        def make():
            uc = _padded(xp, self, [g.uc for g in self.groups], d, dtype)
            has = xp.asarray(np.arange(self.nm)[None, :] < np.array([[g.uc.shape[0]] for g in self.groups]))
            return uc, has
        return self.kept(("landmarks",), make)

    def folded(self, xp, k: int, d: int):
        """``A [G | t]`` of every group at temperature ``k``, padded: (groups x nm x (D+1)), float64 (made
        once per device and set of groups)."""
        return self.kept(("folded", k), lambda: _padded(xp, self, [g.folded[k] for g in self.groups], d + 1,
                                                        xp.float64))

    def inverse_grams(self, pf, xp, k: int):
        """``W^{-1}`` of every group's shards (block diagonal), padded: (groups x nm x nm), float64 (made
        once per device and set of groups)."""
        def make():
            out = xp.zeros((len(self.groups), self.nm, self.nm), dtype=xp.float64)
            for j, g in enumerate(self.groups):
                m = g.uc.shape[0]
                out[j, :m, :m] = pf.inverse_gram(self.dev, xp, g.shards, k)
            return out
        return self.kept(("winv", k), make)

    def kept(self, what, make):
        """``make()``, kept on the device for the next call with the same groups (only the last set of
        groups is kept: with many classes the set changes from call to call)."""
        kept = self.dev.get("batched")
        if kept is None or kept["key"] != self.key:
            kept = self.dev["batched"] = {"key": self.key}
        if what not in kept:
            kept[what] = make()
        return kept[what]


def _corrected_sums(pf, xp, bt: _Batches, k: int):
    """One temperature of :func:`corrected_attraction`, all groups at once: ``(b, log_w, log_r,
    fallback rows)`` as (groups x rows) arrays (padded rows hold garbage; ``bt.valid`` marks the rest).

    The sample's Nystrom part ``E W^{-1} K_s [Y_s, 1]`` (``K_s = k(U, Y_s) n / B``) is multiplied in
    the cheaper order (docs/design.md section 8.16): ``E (W^{-1} (K_s [Y_s, 1]))`` (m^2 (D+1)
    float64 products per group) or, with fewer queries per group than feature columns,
    ``((E W^{-1}) K_s) [Y_s, 1]`` (nq m^2): the residual terms ``e - a`` of each query and sample row
    are then formed before the last product."""
    d = bt.y1.shape[2] - 1
    dt = pf.dtype
    coef = logit_coef(pf.kernel, pf.taus[k])
    folded = bt.folded(xp, k, d)  # A [G | t], float64
    with quiet(xp):
        # k_iu c_u^{-1/2} = exp(e_iu) and k_iu = exp(e_iu) c_u^{1/2}: column sums over each group's queries
        Lu, half, e_u = _landmark_terms(pf, xp, bt, k)
        Ly = bt.dy * -coef
        half_y = _half_column_sums(xp, Ly)  # the sample points' exact column sums
        e_y = Ly - half_y[:, None, :]
        shift = xp.maximum(xp.maximum(e_u.max(axis=2), Lu.max(axis=2)),
                           xp.maximum(e_y.max(axis=2), Ly.max(axis=2)))  # every term below is <= 1 in its units
        shift = xp.where(xp.isfinite(shift), shift, 0).astype(dt)
        E = xp.exp(e_u - shift[:, :, None])  # units exp(shift_i)
        root_c = xp.exp(half)  # c_u^{1/2}

        def nystrom():  # [acc | s_w] of the Nystrom sums alone (with a sample: for its product order, or fallback)
            return E @ bt.kept(("folded32", k), lambda: folded.astype(dt))

        t_col = folded[:, :, d]  # W^{-1} t, corrected below for the plain row sums
        nys = pr = None if bt.has_sample else nystrom()
        if bt.has_sample:
            ay = xp.exp(e_y - shift[:, :, None]) * bt.scale[:, None, :]  # exact terms, units exp(shift_i)
            pr, t_col, nys = _sample_sums(pf, xp, bt, k, E, ay, folded, nystrom)
        r = (E @ (t_col.astype(dt) * root_c)[:, :, None])[:, :, 0]  # plain row sums k_i. W^{-1} t
        if bt.has_sample:
            r += (ay @ xp.exp(half_y)[:, :, None])[:, :, 0]
    bad = (~(pr[:, :, d] > 0) | ~(r > 0)) & bt.valid
    nbad = int(bad.sum()) if bt.has_sample else 0
    if nbad:  # the sample's estimate went negative there: Nystrom alone
        pr = xp.where(bad[:, :, None], nystrom() if nys is None else nys, pr)
        r = xp.where(bad, (E @ (folded[:, :, d].astype(dt) * root_c)[:, :, None])[:, :, 0], r)
    s_w = pr[:, :, d]
    has = (s_w > 0) & (r > 0)  # False only without any data (and on padding)
    safe_s = xp.where(has, s_w, 1.0)
    b = pr[:, :, :d] / safe_s[:, :, None]
    return b, _log_sums(xp, shift, safe_s, has), _log_sums(xp, shift, r, has), nbad


def _sample_sums(pf, xp, bt: _Batches, k: int, E, ay, folded, nystrom):
    """The corrected sums ``[acc | s_w]`` of one temperature, ``W^{-1} t`` corrected for the plain row sums,
    and the Nystrom sums alone where they were formed (else None), for :func:`_corrected_sums`: the sample's
    Nystrom part ``E W^{-1} K_s [Y_s, 1]`` subtracted, its exact terms ``ay`` added, in the cheaper order."""
    d = bt.y1.shape[2] - 1
    dt, f64 = pf.dtype, xp.float64
    if bt.zy is not None:  # the rows' maps: W^{-1} K_s as given (docs/design.md section 8.18)
        kz = bt.zy[k] * bt.scale[:, None, :]
        if bt.nq < d + 1:  # the Nystrom terms a = E W^{-1} K_s of every (query, sample row) pair
            nys = nystrom()
            return nys + (ay - E @ kz) @ bt.y1, folded[:, :, d] - kz.sum(axis=2, dtype=f64), nys
        corrected = folded - (kz @ bt.y1).astype(f64)
        return E @ corrected.astype(dt) + ay @ bt.y1, corrected[:, :, d], None
    kuy = xp.exp(bt.duy * -logit_coef(pf.kernel, pf.taus[k])) * bt.scale[:, None, :]  # K_s, working dtype
    winv = bt.inverse_grams(pf, xp, k)
    if bt.nq < d + 1:  # (E W^{-1}) K_s: the Nystrom terms a of every (query, sample row) pair
        # one product for both: the rows of E, and (K_s 1)^T whose product is (W^{-1} K_s 1)^T (W symmetric)
        ew = xp.concatenate([E.astype(f64), kuy.sum(axis=2, dtype=f64)[:, None, :]], axis=1) @ winv
        nys = nystrom()
        return nys + (ay - ew[:, :-1] @ kuy.astype(f64)).astype(dt) @ bt.y1, folded[:, :, d] - ew[:, -1], nys
    # W^{-1} (K_s [Y_s, 1]) subtracted from the cached sums; its last column is W^{-1} K_s 1
    corrected = folded - winv @ (kuy @ bt.y1).astype(f64)
    return E @ corrected.astype(dt) + ay @ bt.y1, corrected[:, :, d], None


def _landmark_terms(pf, xp, bt: "_Batches", k: int):
    """``(Lu, half, e_u)`` at temperature ``k``: the query-landmark logits, half the log column sums
    over each group's queries, and ``e_u = Lu - half`` (``k_iu c_u^{-1/2} = exp(e_u)``)."""
    Lu = bt.du * -logit_coef(pf.kernel, pf.taus[k])  # -inf on padding
    half = _half_column_sums(xp, Lu)
    return Lu, half, Lu - half[:, None, :]


def _nystrom_sums(pf, xp, bt: "_Batches", k: int):
    """One temperature of :func:`bidirectional_attraction`, all groups at once (no sample): like
    :func:`_corrected_sums`.  Rows whose Nystrom sums lost their sign or their digits (below
    ``den_floor`` of the magnitude of their terms) use the landmarks as the data, group by group."""
    d = bt.y1.shape[2] - 1
    dt = pf.dtype
    # per landmark: [A G | A t | |A t|] (working dtype), then the same two sums weighted by c_u^{1/2}
    folded = bt.kept(("folded_w", k), lambda: _padded(xp, bt, [g.folded[k] for g in bt.groups], d + 2, dt))
    with quiet(xp):
        Lu, half, e_u = _landmark_terms(pf, xp, bt, k)
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
    return b, _log_sums(xp, shift, den, has), _log_sums(xp, shift, rsum, has), nbad


def _padded(xp, bt: "_Batches", per_group, cols: int, dtype):
    """Per-group (landmarks x >= cols) arrays, their first ``cols`` columns stacked and zero-padded to
    (groups x nm x cols)."""
    out = xp.zeros((len(per_group), bt.nm, cols), dtype=dtype)
    for j, a in enumerate(per_group):
        out[j, :a.shape[0]] = a[:, :cols]
    return out


def _masked_distances(xp, kernel: str, a, b, mask=None):
    """The kernel's distances of stacked sets (:func:`dxfield.kernels.sqdist_stacked`), ``inf`` off
    ``mask`` (padding, other shards; None: every pair)."""
    d2 = sqdist_stacked(a, b, mask)
    if kernel == "laplace":
        xp.sqrt(xp.maximum(d2, 0, out=d2), out=d2)
    return d2 if mask is None else xp.where(mask, d2, xp.asarray(float("inf"), dtype=d2.dtype))


def _half_column_sums(xp, logits):
    """``0.5 log sum_i exp(logits_gij)`` over each group's queries (axis 1); 0 for an empty column
    (padding, or a landmark no query of its group sees), whose terms are all 0 anyway."""
    with quiet(xp):
        lse = logsumexp(xp, logits, 1)
    return xp.where(xp.isfinite(lse), 0.5 * lse, 0.0)
