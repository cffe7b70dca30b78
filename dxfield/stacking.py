"""The queries' class groups, one by one or padded and stacked, for the projected field's estimators.

* :func:`query_groups` -- one :class:`QueryGroup` per class of the queries (or one of all of them);
* :class:`Batches` -- the same groups padded and stacked into (groups x rows x ...) arrays, with the
  correction sample's rows of each and the distances between them (docs/design.md sections 8.4, 8.15);
* :func:`block_repulsion` (and :func:`self_repulsion_at`) -- the negatives' side with each group's queries
  as its negatives, in the same stacked blocks (sections 8.19, 8.36);
* :func:`blocked` -- an estimator's sums from its block, temperatures stacked, with the term-by-term
  fallbacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .backend import device_of, placement_of
from .blocksums import Side, log_sums, settled, weighted
from .kernels import logit_coef, sqdist_stacked
from .memory import tile_cap
from .sums import logsumexp, quiet


@dataclass
class QueryGroup:
    """Queries that see the same landmarks: one class (its own shard) or all (every shard)."""

    shards: list  # indices of the shards whose landmarks the group sees
    source: Any  # all the queries of the call
    idx: Any  # where its rows go in the output (a full slice for all queries)
    uc: Any  # landmarks centred on the cache's centre, working dtype
    uu: Any  # their squared norms
    mass: Any  # data points each landmark stands for (n / m of its shard)
    folded: list  # per temperature A [G | t | |A t|] (working dtype)
    rows: Any = None  # ``idx`` on the host (None: all the queries)

    @cached_property
    def xs(self):
        """The group's queries (gathered once needed: the stacked groups gather all of them at once)."""
        return self.source if self.rows is None else self.source[self.idx]


def query_groups(pf, xp, xa, groups):
    """Yield a :class:`QueryGroup` per class group (``groups`` from the labels), or one for all."""
    dev = pf.on_device(placement_of(xp, xa))
    nt = len(pf.temperatures)
    for si, rows in [(None, None)] if groups is None else groups:
        if si is None:
            yield QueryGroup(list(range(len(pf.shards))), xa, slice(None), dev["uc_all"], dev["uu_all"],
                             dev["mass_all"], dev["folded_all"])
        else:
            yield QueryGroup([si], xa, xp.asarray(rows), dev["uc"][si], dev["uu"][si], dev["mass"][si],
                             [dev["folded"][si][k] for k in range(nt)], np.asarray(rows))


def padded_index(lists, width: int, pad: int) -> np.ndarray:
    """Host index lists as a (lists x width) array, each padded with ``pad``."""
    out = np.full((len(lists), width), pad, dtype=np.int64)
    for j, rows in enumerate(lists):
        out[j, :len(rows)] = rows
    return out


def sample_parts(pf, xp, g: QueryGroup, ysc, sample_rows):
    """The sample rows that correct group ``g``, by shard: ``(landmark slice, rows, n / B, their indices)``."""
    offsets = np.concatenate([[0], np.cumsum([pf.shards[i].m for i in g.shards])])
    parts = []
    for j, i in enumerate(g.shards):
        key = None if pf.classes == [None] else i
        mine = sample_rows.get(key)
        if mine is not None and len(mine):
            rows = xp.asarray(mine)
            parts.append((slice(int(offsets[j]), int(offsets[j + 1])), ysc[rows], pf.shards[i].n / len(mine), rows))
    return parts


def in_query_order(pf, xp, xa, bt: "Batches", parts):
    """``(b, log_w, log_r)`` of the stacked groups as (N x D, N, N) arrays in the queries' order."""
    n, d = xa.shape
    outs = (xp.empty((n, d), dtype=pf.dtype), xp.empty(n, dtype=xp.float64), xp.empty(n, dtype=xp.float64))
    for o, p in zip(outs, parts):
        o[bt.rows] = p[bt.valid]
    return outs


def repulsion_fits(pf, xa, bt: "Batches", one_group: bool = False) -> bool:
    """Whether the negatives' side is worth forming with the stacked groups: their queries x queries blocks
    within a tile and the memory budget, and more than one group unless ``one_group`` (one group of all the
    queries is otherwise the sweep's own case, which it does faster than :func:`self_repulsion_at`)."""
    entries = len(bt.groups) * bt.nq * bt.nq
    return ((one_group or len(bt.groups) > 1) and entries <= tile_cap(device_of(xa))
            and 8 * entries * xa.dtype.itemsize <= pf.memory_budget)


def self_repulsion_at(pf, xp, bt: "Batches", k: int):
    """Algorithm 2's negatives' side at temperature ``k`` with each group's queries as its negatives (self
    pairs masked), all groups at once, term by term: ``(b, log_w, log_r)`` as (groups x rows) arrays
    (padded rows hold garbage), ``b`` centred on the cache's centre (docs/design.md section 8.19).

    The same sums as the exact sweep over the negatives: column sums over the group's other queries,
    ``log_w = log sum_j k_ij c_j^{-1/2}`` and ``log_r = log sum_j k_ij`` (-inf for a query alone in its
    group: it has no negative).  :func:`block_repulsion` forms them from one exponential per entry; this
    is its fallback where the column factors spread beyond range."""
    with quiet(xp):
        lq = bt.self_distances(pf, xp) * -logit_coef(pf.kernel, pf.taus[k])  # -inf off the pairs
        half = half_column_sums(xp, lq)
        e = lq - half[:, None, :]  # k_ij c_j^{-1/2} = exp(e_ij)
        shift = e.max(axis=2)
        shift = xp.where(xp.isfinite(shift), shift, 0).astype(pf.dtype)
        p = xp.exp(e - shift[:, :, None])  # units exp(shift_i)
        s = p.sum(axis=2)
        r = (p @ xp.exp(half)[:, :, None])[:, :, 0]  # k_ij = exp(e_ij) c_j^{1/2}: the plain row sums
        has = s > 0
        b = (p @ bt.xq) / xp.where(has, s, 1.0)[:, :, None]
        return b, log_sums(xp, shift, s, has), log_sums(xp, shift, r, has)


def block_repulsion(xp, side, xq, coefs):
    """The negatives' side of every temperature of ``coefs`` from a :class:`dxfield.blocksums.Side` of the
    groups' queries against each other (:meth:`Batches.self_distances`): per temperature ``(b, log_w,
    log_r)`` as (groups x rows) arrays like :func:`self_repulsion_at`, or None where its column factors
    spread beyond range (docs/design.md section 8.36)."""
    P, F, top, ok = side.exps(coefs)
    if not any(ok):
        return [None] * len(coefs)
    d = xq.shape[2]
    xq1 = xp.concatenate([xq, xp.ones(xq.shape[:2] + (1,), dtype=xq.dtype)], axis=2)
    acc = weighted(xp, P, F, xp.broadcast_to(xq1[None], F.shape + (d + 1,)))
    units = side.units(coefs)
    b, log_w, log_r = settled(xp, acc[..., :d], acc[..., d], P.sum(axis=3), units + top[..., None], units)
    return [(b[i], log_w[i], log_r[i]) if ok[i] else None for i in range(len(coefs))]


class Block:
    """An estimator's sums from one exponential per entry and temperature, the temperatures stacked
    (:class:`dxfield.blocksums.Side`; docs/design.md sections 8.36-8.37): its positives' block ``dpos``
    (groups x queries x columns) and, with ``neg``, the groups' queries against each other.  A subclass
    gives :meth:`positives`; :func:`blocked` runs it."""

    def __init__(self, pf, xp, bt: "Batches", dpos, neg: bool):
        self.pf, self.xp, self.bt = pf, xp, bt
        self.pos = Side(xp, dpos, pf.dtype)
        self.neg = Side(xp, bt.self_distances(pf, xp), pf.dtype) if neg else None
        self.entries = int(dpos.size) + (0 if self.neg is None else int(self.neg.v.size))

    def sums(self, ks):
        """``{k: (positives, negatives)}`` for the temperatures ``ks``: ``(b, log_w, log_r, fallback rows)``
        and ``(b, log_w, log_r)`` as (groups x rows) arrays; either None where its factors spread beyond
        range (and the negatives None without them)."""
        pf, xp = self.pf, self.xp
        coefs = [logit_coef(pf.kernel, pf.taus[k]) for k in ks]
        out = dict.fromkeys(ks, (None, None))
        P, F, top, ok = self.pos.exps(coefs)
        if any(ok):
            for i, pos in enumerate(self.positives(ks, coefs, P, F, top)):
                out[ks[i]] = (pos if ok[i] else None, None)
        if self.neg is not None:
            for k, got in zip(ks, block_repulsion(xp, self.neg, self.bt.xq, coefs)):
                if got is not None:
                    out[k] = (out[k][0], got)
        return out

    def positives(self, ks, coefs, P, F, top):
        """Per temperature of ``ks`` the positives' ``(b, log_w, log_r, fallback rows)`` from the positives'
        side's ``(P, F, top)`` (:meth:`dxfield.blocksums.Side.exps`)."""
        raise NotImplementedError


def blocked(pf, xp, xa, bt: "Batches", block, positives_at, neg: bool):
    """An estimator's sums from a block (``block.sums(ks)``: ``{k: (positives, negatives)}``, either None
    where its factors spread beyond range; ``block.entries`` its size), every temperature in one stack where
    their blocks fit in a quarter of the budget, else one at a time; ``positives_at(pf, xp, bt, k)`` and
    :func:`self_repulsion_at` for what the block did not give.  Returns like
    :func:`dxfield.attraction.bidirectional_attraction`: per temperature the positives' ``(b, log_w,
    log_r)`` in the queries' order, the fallback counts, and with ``neg`` the negatives' side (else None)."""
    nt = len(pf.temperatures)
    got = {}
    if block is not None:
        each = 4 * block.entries * pf.dtype.itemsize
        for ks in [list(range(nt))] if nt * each <= pf.memory_budget // 4 else [[k] for k in range(nt)]:
            got.update(block.sums(ks))
    out, fallback, negs = [], [], []
    for k in range(nt):
        pos_k, neg_k = got.get(k, (None, None))
        if pos_k is None:
            pos_k = positives_at(pf, xp, bt, k)
        out.append(in_query_order(pf, xp, xa, bt, pos_k[:3]))
        fallback.append(pos_k[3])
        if neg:
            negs.append(in_query_order(pf, xp, xa, bt, self_repulsion_at(pf, xp, bt, k) if neg_k is None else neg_k))
    return out, fallback, negs if neg else None


class Batches:
    """The query groups of the batched estimators (:mod:`dxfield.correction`, :mod:`dxfield.attraction`),
    padded and stacked: (groups x rows x ...) arrays.

    Per group ``g``: its queries (``nq`` rows at most), its landmarks (``nm``),
    the sample rows that correct it (``ns``, each with its scale ``n_s / B_s``
    and the landmarks of its own shard), and the distances between them; or,
    with the sample rows' ``maps``, their ``W^{-1} k(U, y)`` (``zy``: groups x
    ns x T x nm) instead of the landmark-sample distances.
    Padding is masked: padded queries, landmarks and sample rows get logit
    -inf, so they add nothing to any sum.
    """

    def __init__(self, pf, xp, xa, groups, ysc, sample_rows, maps=None):
        dev = pf.on_device(placement_of(xp, xa))
        gs = list(query_groups(pf, xp, xa, groups))
        nb, d, dt, n = len(gs), xa.shape[1], pf.dtype, xa.shape[0]
        qrows = [np.arange(n) if g.rows is None else g.rows for g in gs]
        self.nq = nq = max(len(r) for r in qrows)
        self.nm = nm = max(int(g.uc.shape[0]) for g in gs)
        self.groups, self.dev = gs, dev
        self.dq = None  # the queries' distances to each other (self_distances), once needed
        self.key = (tuple(tuple(g.shards) for g in gs), nm)  # the padded summaries depend on this only
        qidx = padded_index(qrows, nq, n)  # the padding row is the centre: zeros once centred
        self.valid = xp.asarray(qidx < n)
        ext = xp.concatenate([xa, dev["centre"][None].astype(xa.dtype)])
        self.xq = xq = (ext[xp.asarray(qidx)] - dev["centre"]).astype(dt, copy=False)  # each group's queries - c
        self.rows = xp.asarray(np.concatenate(qrows))
        uc, has_u = self.landmarks(xp, d, dt)
        pairs = self._stack_sample(pf, xp, ysc, sample_rows, maps, has_u)  # landmark and sample row of one shard
        ns = self.ns
        dist = (lambda a, b, mask: masked_distances(xp, pf.kernel, a, b, mask))  # noqa: E731
        if self.has_sample:  # query-landmark and query-sample in one block (inf: padding)
            ys, has_y = self.y1[:, :, :d], self.scale > 0
            has = xp.concatenate([has_u, has_y], axis=1)
            self.dpos = dist(xq, xp.concatenate([uc, ys], axis=1), self.valid[:, :, None] & has[:, None, :])
            self.du, self.dy = self.dpos[:, :, :nm], self.dpos[:, :, nm:]
            self.duy = None if maps is not None else dist(uc, ys, pairs)  # landmark-sample (inf: other shard)
        else:
            self.du = dist(xq, uc, self.valid[:, :, None] & has_u[:, None, :])
            self.dy = xp.full((nb, nq, ns), float("inf"), dtype=dt)
            self.duy = xp.full((nb, nm, ns), float("inf"), dtype=dt)
        self.y_rows = self.y1 * self.scale[:, :, None]  # (n_s / B_s) [y - c, 1]

    def _stack_sample(self, pf, xp, ysc, sample_rows, maps, has_u):
        """Set ``ns``, ``y1``, ``scale``, ``zy`` and ``has_sample`` from the correction sample's rows of each
        group's shards; return which landmark and sample row share a shard (groups x nm x ns, on the device)."""
        gs, d, dt = self.groups, self.xq.shape[2], pf.dtype
        if ysc is None or any(len(g.shards) != 1 for g in gs):
            return self._stack_sample_parts(pf, xp, ysc, sample_rows, maps)
        keys = [None if pf.classes == [None] else g.shards[0] for g in gs]
        lists = [np.asarray(sample_rows.get(key, ()), dtype=np.int64) for key in keys]
        self.ns = ns = max([len(rows) for rows in lists] + [1])
        self.has_sample = any(len(rows) for rows in lists)
        sidx = padded_index(lists, ns, ysc.shape[0])
        real = sidx < ysc.shape[0]
        scale = np.array([pf.shards[g.shards[0]].n / max(len(rows), 1) for g, rows in zip(gs, lists)])
        self.scale = xp.asarray(np.where(real, scale[:, None], 0.0), dtype=dt)
        self.y1 = xp.empty((len(gs), ns, d + 1), dtype=dt)
        self.y1[:, :, :d] = xp.concatenate([ysc, xp.zeros((1, d), dtype=ysc.dtype)])[xp.asarray(sidx)]
        self.y1[:, :, d] = xp.asarray(real)
        self.zy = None
        if maps is not None:
            start = int(sidx[0, 0])
            if len(gs) == 1 and self.nm == maps.shape[2] and np.array_equal(sidx[0], np.arange(start, start + ns)):
                self.zy = maps[start:start + ns][None]  # one group taking its rows in order: a view
            else:
                pad = xp.zeros((1,) + maps.shape[1:], dtype=maps.dtype)
                self.zy = xp.concatenate([maps, pad])[xp.asarray(sidx)][..., :self.nm]
        return has_u[:, :, None] & xp.asarray(real)[:, None, :]

    def _stack_sample_parts(self, pf, xp, ysc, sample_rows, maps):
        """:meth:`_stack_sample` for groups that see several shards (unconditional queries on a class cache), or
        without a sample: shard by shard (:func:`sample_parts`)."""
        gs, d, dt, nm = self.groups, self.xq.shape[2], pf.dtype, self.nm
        parts = [[] if ysc is None else sample_parts(pf, xp, g, ysc, sample_rows) for g in gs]
        self.ns = ns = max([sum(int(yb.shape[0]) for _, yb, _, _ in p) for p in parts] + [1])
        self.y1 = xp.zeros((len(gs), ns, d + 1), dtype=dt)  # [y - c, 1] of the sample rows
        self.scale = xp.zeros((len(gs), ns), dtype=dt)  # n_s / B_s of each sample row's shard
        pairs = np.zeros((len(gs), nm, ns), dtype=bool)
        self.has_sample = any(parts)
        self.zy = None if maps is None else self._stacked_maps(xp, maps, parts, dt)
        for j, p in enumerate(parts):
            at = 0
            for sl, yb, scale, rows in p:
                cols = slice(at, at + int(yb.shape[0]))
                pairs[j, sl, cols] = True
                self.y1[j, cols, :d] = yb
                self.y1[j, cols, d] = 1
                self.scale[j, cols] = scale
                at = cols.stop
        return xp.asarray(pairs)

    def _stacked_maps(self, xp, maps, parts, dtype):
        """The sample rows' maps ``W^{-1} k(U, y)`` per group, padded: (groups x ns x T x nm)."""
        nb, ns, nm = len(parts), self.ns, self.nm
        out = xp.zeros((nb, ns, maps.shape[1], nm), dtype=dtype)
        for j, p in enumerate(parts):
            at = 0
            for sl, yb, _, rows in p:
                out[j, at:at + int(yb.shape[0]), :, sl] = maps[rows, :, :sl.stop - sl.start]
                at += int(yb.shape[0])
        return out

    def self_distances(self, pf, xp):
        """Each group's queries against each other (groups x nq x nq; inf off the pairs: self pairs and
        padding), made once per call."""
        if self.dq is None:
            eye = xp.eye(self.nq, dtype=bool)[None]
            pair = self.valid[:, :, None] & self.valid[:, None, :] & ~eye
            self.dq = masked_distances(xp, pf.kernel, self.xq, self.xq, pair)
        return self.dq

    def landmarks(self, xp, d: int, dtype):
        """Every group's landmarks (centred), padded: (groups x nm x D), and which are real (made once
        per device and set of groups)."""
        def make():
            uc = padded(xp, self, [g.uc for g in self.groups], d, dtype)
            has = xp.asarray(np.arange(self.nm)[None, :] < np.array([[g.uc.shape[0]] for g in self.groups]))
            return uc, has
        return self.kept(("landmarks",), make)

    def folded(self, xp, k: int, d: int):
        """``A [G | t]`` of every group at temperature ``k``, padded: (groups x nm x (D+1)), float64 (made
        once per device and set of groups)."""
        return self.kept(("folded", k), lambda: padded(xp, self, [g.folded[k] for g in self.groups], d + 1,
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


def landmark_terms(pf, xp, bt: "Batches", k: int):
    """``(Lu, half, e_u)`` at temperature ``k``: the query-landmark logits, half the log column sums
    over each group's queries, and ``e_u = Lu - half`` (``k_iu c_u^{-1/2} = exp(e_u)``)."""
    Lu = bt.du * -logit_coef(pf.kernel, pf.taus[k])  # -inf on padding
    half = half_column_sums(xp, Lu)
    return Lu, half, Lu - half[:, None, :]


def padded(xp, bt: "Batches", per_group, cols: int, dtype):
    """Per-group (landmarks x >= cols) arrays, their first ``cols`` columns stacked and zero-padded to
    (groups x nm x cols)."""
    out = xp.zeros((len(per_group), bt.nm, cols), dtype=dtype)
    for j, a in enumerate(per_group):
        out[j, :a.shape[0]] = a[:, :cols]
    return out


def masked_distances(xp, kernel: str, a, b, mask=None):
    """The kernel's distances of stacked sets (:func:`dxfield.kernels.sqdist_stacked`), ``inf`` off
    ``mask`` (padding, other shards; None: every pair)."""
    d2 = sqdist_stacked(a, b, mask)
    if kernel == "laplace":
        xp.sqrt(xp.maximum(d2, 0, out=d2), out=d2)
    if mask is not None:
        xp.copyto(d2, xp.asarray(float("inf"), dtype=d2.dtype), where=~mask)
    return d2


def half_column_sums(xp, logits):
    """``0.5 log sum_i exp(logits_gij)`` over each group's queries (axis 1); 0 for an empty column
    (padding, or a landmark no query of its group sees), whose terms are all 0 anyway."""
    with quiet(xp):
        lse = logsumexp(xp, logits, 1)
    return xp.where(xp.isfinite(lse), 0.5 * lse, 0.0)
