"""The projected field's repulsion: the negatives' side, exact or through the landmarks.

* :func:`exact_repulsion` -- the exact tiled sweep over the negatives (the
  other queries, self pairs masked, and/or explicit weighted negatives),
  row-normalised; :func:`sweep_negatives` gives its raw sums to the
  bidirectional field.
* :func:`nystrom_repulsion` -- the row-normalised barycentre of the batch from
  its own Nystrom summaries, self terms removed (docs/design.md section 2.8).
* :func:`bidirectional_nystrom` -- both sides of Algorithm 2 through the same
  Nystrom kernel, the batch summarised on the data's landmarks every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .stacking import query_groups
from .backend import device_of, placement_of
from .kernels import logit_coef, sq_norms, sqdist
from .memory import tile_cap
from .nystrom import kernel_products
from .sums import logsumexp
from .sweep import ExactSums
from .targets import Targets, negative_runs


@dataclass(frozen=True)
class Negatives:
    """The negatives of one field call: the queries themselves (self pairs masked) and/or explicit ones."""

    include_self: bool
    neg: Any = None  # explicit negatives (M, D) on the call's device, or None
    neg_weight: Any = None  # a float, an (M,) array, or None
    check_finite: bool = True
    neg_labels: Any = None  # (M,) host ints: a labelled negative repels only the queries of its class


QUERIES = Negatives(include_self=True, check_finite=False)  # the batch itself, as Nystrom fallbacks use it


def sweep_negatives(pf, xp, xa, negs: Negatives, query_labels=None, bidirectional=False, ops=None,
                    precision="float32"):
    """The exact sweep over the negatives: ``(sweeper, sums, row_lse)`` at the cache's temperatures."""
    targets = negative_runs(xp, xa, negs.neg, negs.neg_weight, include_self=negs.include_self, dtype=pf.dtype,
                            check_finite=negs.check_finite, query_labels=query_labels,
                            neg_labels=None if negs.neg_labels is None else xp.asarray(negs.neg_labels))
    sweeper = ExactSums(xp, xa, targets, n_temperatures=len(pf.taus), kernel=pf.kernel,
                        bidirectional=bidirectional, budget=pf.memory_budget,
                        tile_cap=tile_cap(device_of(xa)), sides=(1,), query_labels=query_labels,
                        ops=ops, precision=precision)
    sums, row_lse = sweeper.sweep([logit_coef(pf.kernel, t) for t in pf.taus])
    return sweeper, sums, row_lse


def exact_repulsion(pf, xp, xa, negs: Negatives, centre, query_labels=None, ops=None, precision="float32"):
    """Row-normalised barycentre of the negatives per temperature, centred on ``centre``.

    With ``query_labels``, a query is repelled only by the queries of its own class
    (explicit negatives, if any, by all)."""
    sweeper, sums, _ = sweep_negatives(pf, xp, xa, negs, query_labels, ops=ops, precision=precision)
    shift = sweeper.mu - centre  # sums are centred on the queries' mean
    out = []
    for k in range(len(pf.temperatures)):
        neg = sums[k][1]
        has = neg.s > 0
        b = neg.acc
        b /= xp.where(has, neg.s, 1.0)[:, None]
        if not bool(has.all()):  # no negative mass: b- := x_i (pure mean shift)
            b[~has] = sweeper.xc[~has]
        b += shift
        out.append(b)
    return out


def nystrom_repulsion(pf, xp, xa, centre):
    """Barycentre of the other queries from their own Nystrom summaries (float64), self removed."""
    dev = pf.on_device(placement_of(xp, xa))
    x64 = xa.astype(xp.float64)
    xc64 = x64 - centre.astype(xp.float64)
    uc64 = dev["uc_all"].astype(xp.float64)
    uu64 = sq_norms(uc64)
    out, bad_total = [], 0
    shards = list(range(len(pf.shards)))
    factors = [pf.block_factors(dev, xp, shards, k) for k in range(len(pf.temperatures))]
    phis, _ = kernel_products(xp, x64, uc64, uu64, centre.astype(xp.float64), factors, pf.taus, pf.kernel,
                              budget=pf.memory_budget, tile_entries=tile_cap(device_of(xa)))
    need_exact = []
    for k, phi in enumerate(phis):
        t = phi.sum(axis=0)
        g = phi.T @ xc64
        self_k = (phi * phi).sum(axis=1)
        num = phi @ g - self_k[:, None] * xc64
        den = phi @ t - self_k
        bad = ~(den > pf.den_floor * xp.maximum(self_k, 1e-300))
        nbad = int(bad.sum())
        b = (num / xp.where(bad, 1.0, den)[:, None]).astype(pf.dtype)
        if nbad:
            bad_total += nbad
            need_exact.append((k, bad))
        out.append(b)
    if need_exact:
        exact = exact_repulsion(pf, xp, xa, QUERIES, centre)
        for k, bad in need_exact:
            out[k][bad] = exact[k][bad]
    return out, bad_total


def exact_barycentres(xp, x, pos, coefs, kernel, budget):
    """Exact row-normalised barycentres of ``pos`` per temperature, centred on x's mean."""
    sweeper = ExactSums(xp, x, [Targets(pos, False)], n_temperatures=len(coefs), kernel=kernel,
                        bidirectional=False, budget=budget, tile_cap=tile_cap(device_of(x)), sides=(0,))
    sums, _ = sweeper.sweep(coefs)
    return [s[0].acc / s[0].s[:, None] for s in sums]


def bidirectional_nystrom(pf, xp, xa, groups):
    """Both sides of Algorithm 2 through the same Nystrom kernel, dense over N x m (float64).

    Positives: the cached summaries.  Negatives: the queries (of the same
    class), summarised on the same landmarks every call,
    ``W^{-1} k(U, X) [X, 1]``, with each query's self term
    ``k(x_i, U) diag(c^{-1/2}) W^{-1} k(U, x_i)`` removed.  Column sums are
    taken at the landmarks for both sides.  Attraction and repulsion are
    then one functional of the data and of the generated samples, so where
    the two distributions agree the field vanishes (with exact repulsion
    the Nystrom error of the attraction alone does not cancel).

    Returns per temperature ``(b, log_w, log_r)`` for each side (cache-centred,
    as in :func:`dxfield.attraction.bidirectional_attraction`), the attraction
    fallback counts and per temperature the rows (or None) whose negative sums
    failed.
    """
    dev = pf.on_device(placement_of(xp, xa))
    n, d = xa.shape
    nt = len(pf.temperatures)
    f64 = xp.float64
    new = lambda: (xp.empty((n, d), dtype=f64), xp.empty(n, dtype=f64), xp.empty(n, dtype=f64))  # noqa: E731
    pos_out, neg_out = [new() for _ in range(nt)], [new() for _ in range(nt)]
    fallback, bad_rows = [0] * nt, [[] for _ in range(nt)]
    centre = dev["centre"].astype(f64)
    for g in query_groups(pf, xp, xa, groups):
        uc, mass = g.uc.astype(f64), g.mass.astype(f64)
        xc = g.xs.astype(f64) - centre
        dist = sqdist(xc, uc)
        if pf.kernel == "laplace":
            dist = xp.sqrt(dist, out=dist)
        for k in range(nt):
            pos, neg, nfall, nbad = _both_sides(pf, xp, g, k, xc, uc, mass, dist)
            fallback[k] += nfall
            for out, part in ((pos_out[k], pos), (neg_out[k], neg)):
                for o, p in zip(out, part):
                    o[g.idx] = p
            if bool(nbad.any()):
                rows = xp.nonzero(nbad)[0]
                bad_rows[k].append(rows if isinstance(g.idx, slice) else g.idx[rows])
    bad = [xp.concatenate(r) if r else None for r in bad_rows]
    return pos_out, neg_out, fallback, bad


def _both_sides(pf, xp, g, k: int, xc, uc, mass, dist):
    """One temperature of :func:`bidirectional_nystrom` for group ``g``:
    ``(positives' (b, log_w, log_r), negatives' (b, log_w, log_r), fallback rows, failed negative rows)``."""
    d = xc.shape[1]
    f64 = xp.float64
    dev = pf.on_device(placement_of(xp, g.xs))
    winv = pf.inverse_gram(dev, xp, g.shards, k)
    folded = pf.per_device(dev, ("folded64", tuple(g.shards), k), lambda: xp.asarray(
        np.concatenate([pf.shards[i].folded(k) for i in g.shards])))  # A [G | t | |At|], float64
    L = dist * -logit_coef(pf.kernel, pf.taus[k])
    top_row = L.max(axis=1)
    K = xp.exp(L - top_row[:, None])  # k(x_i, U) / exp(top_row_i)
    lc = logsumexp(xp, L, 0)  # log c_u
    e = L - 0.5 * lc[None, :]
    shift = e.max(axis=1)
    E = xp.exp(e - shift[:, None])  # k_iu c_u^{-1/2} / exp(shift_i)
    # positives: E [A G | A t], and plain row sums K A t
    num, den, den_abs = E @ folded[:, :d], E @ folded[:, d], E @ folded[:, d + 1]
    rsum, rsum_abs = K @ folded[:, d], K @ folded[:, d + 1]
    bad = ~(den > pf.den_floor * den_abs) | ~(rsum > pf.den_floor * rsum_abs)
    nfall = int(bad.sum())
    if nfall:  # the landmarks stand for the data, mass n / m each
        num[bad] = E[bad] @ (uc * mass[:, None])
        den[bad] = E[bad] @ mass
        rsum[bad] = K[bad] @ mass
    # negatives: W^{-1} k(U, X) [X, 1] (scaled by exp(-top)), self terms removed
    top = float(top_row.max())
    gs = xp.exp(top_row - top)  # exp(top_row_k - top)
    xc1 = xp.concatenate([xc, xp.ones((xc.shape[0], 1), dtype=f64)], axis=1)
    fneg = winv @ (K.T @ (xc1 * gs[:, None]))  # m x (D + 1)
    q = K @ winv  # row i: W^{-1} k(U, x_i) / exp(top_row_i)
    self_w = gs * (E * q).sum(axis=1)  # self term of the weighted sums, units exp(shift_i + top)
    self_k = gs * (K * q).sum(axis=1)  # k~(x_i, x_i), units exp(top_row_i + top)
    nnum = E @ fneg[:, :d] - self_w[:, None] * xc
    nden = E @ fneg[:, d] - self_w
    nden_abs = xp.abs(E) @ xp.abs(fneg[:, d]) + xp.abs(self_w)
    nr = K @ fneg[:, d] - self_k
    nr_abs = K @ xp.abs(fneg[:, d]) + xp.abs(self_k)
    nbad = ~(nden > pf.den_floor * nden_abs) | ~(nr > pf.den_floor * nr_abs)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = (num / den[:, None], shift + xp.log(den), top_row + xp.log(rsum))
        neg = (nnum / xp.where(nbad, 1.0, nden)[:, None], shift + top + xp.log(xp.where(nbad, 1.0, nden)),
               top_row + top + xp.log(xp.where(nbad, 1.0, nr)))
    return pos, neg, nfall, nbad
