"""One side of Algorithm 2 over a stacked block of targets: one exponential per entry and temperature.

A side (the positives, or the negatives) is a (groups x queries x targets) block of kernel distances
``r`` (``inf`` off the pairs that interact). Per temperature, with ``log k = -c r``
(docs/design.md section 8.36):

* every row in units of its largest kernel value: ``P_ij = exp(-c (r_ij - f_i))``, ``f_i = min_j r_ij``;
* the column sums from the same exponentials, ``C_j = sum_i k_ij = exp(-c lo) sum_i P_ij rho_i`` with
  ``rho_i = exp(-c (f_i - lo))`` and ``lo = min_i f_i``, while every column's largest term stays within
  :func:`dxfield.sums.span_limit` of ``exp(-c lo)``; otherwise the column sums take a pass of their own,
  each column shifted by its minimum;
* the column factors ``C_j^{-1/2} = exp(b_j)`` of the bidirectional normalisation as
  ``F_j = exp(b_j - top)``, ``top = max_j b_j``, while their spread stays within the same limit
  (else :meth:`Side.exps` returns None and the caller forms the terms one by one).

The caller multiplies ``P`` by its targets' columns scaled by ``F``: a row sum is then in units of
``exp(-c f_i + top)`` (weighted by ``C_j^{-1/2}``) or ``exp(-c f_i)`` (plain).
"""

from __future__ import annotations

import numpy as np

from .backend import to_host
from .sums import quiet, span_limit


class Side:
    """One side's distance block, shifted by its row minima once for every temperature."""

    def __init__(self, xp, r, dtype):
        self.xp, self.dtype = xp, dtype
        self.limit = span_limit(dtype)
        with quiet(xp):
            rowmin, colmin = r.min(axis=2), r.min(axis=1)
        self.has_col = xp.isfinite(colmin)
        has_row = xp.isfinite(rowmin)
        lo = xp.where(has_row, rowmin, xp.inf).min(axis=1)
        self.lo = xp.where(xp.isfinite(lo), lo, 0).astype(dtype, copy=False)  # per group
        # a row without targets gets f = lo (rho = 1); its P are all 0
        self.f = xp.where(has_row, rowmin, self.lo[:, None]).astype(dtype, copy=False)
        self.v = r - self.f[:, :, None]  # >= 0, inf off the pairs
        self.colmin = xp.where(self.has_col, colmin, 0).astype(dtype, copy=False)
        self.span = float(xp.where(self.has_col, self.colmin - self.lo[:, None], 0).max()) if r.size else 0.0
        self.work = None  # P of every temperature, once needed
        self.log_factors = None  # the last exps() call's b_j

    def exps(self, coefs):
        """``(P, F, top, ok)`` at the logit coefficients ``coefs`` (one per temperature, stacked on a first
        axis): ``P`` (T x groups x queries x targets, in a buffer the next call overwrites), the column
        factors ``F`` (T x groups x targets, the working dtype, 0 for a column no query reaches), ``top``
        (T x groups, float64) and ``ok`` (host bools, T): whether that temperature's factors stay within
        range (where not, its ``P`` and ``F`` are not to be used).  Keeps the factors' logs
        ``b_j = -0.5 log C_j`` (T x groups x targets, float64, ``-inf`` for a column no query reaches) as
        :attr:`log_factors` until the next call."""
        xp, f64, nt = self.xp, self.xp.float64, len(coefs)
        c = xp.asarray(coefs, dtype=self.dtype).reshape(nt, 1, 1)
        if self.work is None or self.work.shape[0] != nt:
            self.work = xp.empty((nt,) + self.v.shape, dtype=self.dtype)
        P = xp.multiply(self.v[None], -c[:, :, :, None], out=self.work)
        xp.exp(P, out=P)
        with quiet(xp):
            rho = xp.exp((self.f - self.lo[:, None])[None] * -c)  # T x groups x queries
            sums = xp.matmul(rho[:, :, None, :], P)[:, :, 0, :]
            log_c = (-c * self.lo[None, :, None]).astype(f64) + xp.log(sums.astype(f64))
            for i, ci in enumerate(coefs):
                if ci * self.span > self.limit:  # a pass of their own, each column shifted by its largest term
                    q = xp.exp((self.v + self.f[:, :, None] - self.colmin[:, None, :]) * -ci)
                    log_c[i] = -ci * self.colmin.astype(f64) + xp.log(q.sum(axis=1, dtype=f64))
            b = xp.where(self.has_col[None], -0.5 * log_c, -xp.inf)
            fin = xp.isfinite(b)
            top = xp.where(fin, b, -xp.inf).max(axis=2)
            spread = xp.where(xp.isfinite(top), top - xp.where(fin, b, xp.inf).min(axis=2), 0).max(axis=1)
            top = xp.where(xp.isfinite(top), top, 0.0)
            F = xp.exp(b - top[:, :, None]).astype(self.dtype)
        self.log_factors = b
        ok = [bool(v) for v in to_host(spread <= self.limit)]
        return P, F, top, ok

    def units(self, coefs):
        """``-c f_i``: the log of each row's unit in ``P`` (T x groups x queries, float64)."""
        xp = self.xp
        return self.f.astype(xp.float64)[None] * -xp.asarray(coefs, dtype=xp.float64).reshape(-1, 1, 1)


def weighted(xp, P, F, cols):
    """``P diag(F) cols`` over the stacked axes: the column factors on ``P`` or on ``cols``, whichever is
    smaller."""
    if P.size <= cols.size:
        return (P * F[..., None, :]) @ cols
    return P @ (cols * F[..., None])


def settled(xp, acc, s_w, r, unit_w, unit_r):
    """``(b, log_w, log_r)`` of one side from its sums ``acc``, ``s_w`` (rows in units ``exp(unit_w)``) and
    ``r`` (units ``exp(unit_r)``), any leading axes: the barycentres and the logs of both row sums (``-inf``
    for a row without any target)."""
    has = (s_w > 0) & (r > 0)
    safe = xp.where(has, s_w, 1.0)
    return acc / safe[..., None], log_sums(xp, unit_w, safe, has), log_sums(xp, unit_r, r, has)


def log_sums(xp, shift, s, has, top=0.0):
    """``shift + top + log s`` in float64 where ``has``, else -inf."""
    with np.errstate(divide="ignore"):
        return xp.where(has, shift.astype(xp.float64) + top + xp.log(xp.where(has, s, 1.0).astype(xp.float64)),
                        -xp.inf)
