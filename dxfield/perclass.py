"""The exact field of a class-conditional call, the classes stacked (docs/design.md section 2.10).

With class labels only same-class pairs interact.  The masked sweep
(:class:`dxfield.sweep.ExactSums` with ``query_labels``) computes all
``N x (P + M)`` distances and throws away the other classes' share: with ``C``
classes of equal size, ``(C - 1) / C`` of the work.  :class:`StackedSums`
instead pads every class's queries and targets to a ``(C x n_q x n_t)`` block
and works on it in a few stacked operations per temperature, as a batched
implementation of Algorithm 2 does.  It has the masked sweep's interface
(:meth:`StackedSums.mean_distance`, :meth:`StackedSums.sweep` giving
:class:`dxfield.sums.RowSums` per temperature and side, and ``xc``), so
:func:`dxfield.sums.combine` turns its sums into the same field, up to
rounding.  :func:`stack_plan` says when it applies: the negatives separate by
class, the composed engine runs, the block is smaller than the masked sweep's
and fits the memory budget.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import to_host
from .kernels import sqdist_stacked
from .sums import LogSumExp, RowSums, logsumexp, quiet

# Arrays of the block's size a call holds at once: the distances, the mask, a temperature's logits and
# terms, one side's weights and a temporary.
_BLOCK_ARRAYS = 6


class StackPlan(NamedTuple):
    """The stacked layout: per class, host indices of its queries, positives and explicit negatives
    (``neg`` None without explicit ones); the queries as negatives with ``include_self``."""

    rows: list
    pos: list
    neg: list | None
    include_self: bool

    @property
    def nq(self) -> int:
        return max(r.size for r in self.rows)

    @property
    def npos(self) -> int:
        return max(p.size for p in self.pos)

    @property
    def nneg(self) -> int:
        return 0 if self.neg is None else max(m.size for m in self.neg)

    @property
    def width(self) -> int:
        """Columns of a class's block: positives, explicit negatives, then its queries."""
        return self.npos + self.nneg + (self.nq if self.include_self else 0)


def stack_plan(inp, *, include_self: bool, ops, budget: int, n_temps: int):
    """The :class:`StackPlan` of a labelled call ``inp`` (:class:`dxfield.inputs.FieldInputs`), or None
    where the masked sweep runs: no labels, explicit negatives without labels
    (under Algorithm 2 their column sums run over every class's queries; the row form, which could
    separate them, takes the masked sweep too), the fused engine (``ops``), or a padded block larger than the masked sweep's or than
    ``budget`` (:func:`stacked_bytes` for ``n_temps`` temperatures)."""
    if inp.labels is None or ops is not None or (inp.neg is not None and inp.neg_labels is None):
        return None
    qlab, plab = to_host(inp.labels), to_host(inp.pos_labels)
    classes = np.unique(qlab)
    rows = [np.flatnonzero(qlab == c) for c in classes]
    pos = [np.flatnonzero(plab == c) for c in classes]
    neg = None
    if inp.neg is not None:
        nlab = to_host(inp.neg_labels)
        neg = [np.flatnonzero(nlab == c) for c in classes]
    plan = StackPlan(rows, pos, neg, include_self)
    entries = len(classes) * plan.nq * plan.width
    masked = inp.x.shape[0] * (inp.pos.shape[0] + (0 if inp.neg is None else inp.neg.shape[0])
                               + (inp.x.shape[0] if include_self else 0))
    if entries >= masked or stacked_bytes(entries, len(classes) * (plan.nq + plan.width), inp.x.shape, n_temps,
                                          inp.x.dtype.itemsize) > budget:
        return None
    return plan


def stacked_bytes(entries: int, stacked_rows: int, shape, n_temps: int, itemsize: int) -> int:
    """Peak bytes of a stacked call beyond its inputs: block arrays of ``entries``, the padded queries and
    targets (``stacked_rows`` of ``D``) three times (the copies, their recentred copies in
    :func:`dxfield.kernels.sqdist_stacked`, products), and each temperature's and side's row sums."""
    n, d = shape
    return itemsize * (_BLOCK_ARRAYS * entries + 3 * stacked_rows * d + 2 * n_temps * n * (d + 2))


class StackedSums:
    """Algorithm 2's (or the row form's) sums of a labelled call, its classes stacked and padded.

    Column ``j`` of class ``g``'s block is a positive, an explicit negative of the class or one of its
    queries (self pairs masked); padding is masked too.  Coordinates are centred on the queries' mean,
    as the masked sweep centres them."""

    def __init__(self, xp, inp, plan: StackPlan, *, kernel: str, bidirectional: bool, dtype):
        rows, pos, neg = plan.rows, plan.pos, plan.neg
        self.xp, self.kernel, self.bidirectional, self.dtype = xp, kernel, bidirectional, dtype
        self.n, self.d = inp.x.shape
        g, nq, self.npos = len(rows), plan.nq, plan.npos
        at = self.npos + plan.nneg  # the first column of the queries as negatives
        mu = inp.x.mean(axis=0)
        self.xc = inp.x - mu
        self.valid = np.zeros((g, nq), dtype=bool)
        self.order = np.concatenate(rows)  # the stacked rows' query indices, class by class
        xs = xp.zeros((g, nq, self.d), dtype=dtype)
        self.ys = ys = xp.zeros((g, plan.width, self.d), dtype=dtype)
        cols = np.zeros((g, plan.width), dtype=bool)
        weighted = neg is not None and inp.neg_weight is not None
        self.log_w = xp.zeros((g, plan.width), dtype=xp.float64) if weighted else None
        for j, r in enumerate(rows):
            q, p = r.size, pos[j].size
            self.valid[j, :q] = True
            xs[j, :q] = self.xc[xp.asarray(r)]
            ys[j, :p] = inp.pos[xp.asarray(pos[j])] - mu
            cols[j, :p] = True
            if neg is not None:
                m = neg[j].size
                ys[j, self.npos:self.npos + m] = inp.neg[xp.asarray(neg[j])] - mu
                cols[j, self.npos:self.npos + m] = True
                if weighted:
                    w = inp.neg_weight if isinstance(inp.neg_weight, float) else inp.neg_weight[xp.asarray(neg[j])]
                    with quiet(xp):
                        self.log_w[j, self.npos:self.npos + m] = xp.log(xp.asarray(w, dtype=xp.float64))
            if plan.include_self:
                ys[j, at:at + q] = xs[j, :q]
                cols[j, at:at + q] = True
        pairs = self.valid[:, :, None] & cols[:, None, :]
        if plan.include_self:
            pairs[:, np.arange(nq), at + np.arange(nq)] = False  # a query is not its own negative
        self.pairs = xp.asarray(pairs)
        r = sqdist_stacked(xs, ys, self.pairs)
        xp.maximum(r, 0, out=r)
        if kernel == "laplace":
            xp.sqrt(r, out=r)
        self.r = xp.where(self.pairs, r, xp.asarray(np.inf, dtype=dtype))  # d (laplace) or d^2 (gaussian)

    def mean_distance(self) -> float:
        """Mean ``||x_i - y_j||`` over the interacting pairs (same class, self pairs left out, weightless
        negatives counted), summed in float64 like the masked sweep's."""
        xp = self.xp
        count = int(self.pairs.sum())
        if count == 0:
            return 0.0
        dist = self.r if self.kernel == "laplace" else xp.sqrt(self.r)
        return float(xp.where(self.pairs, dist, 0).sum(dtype=xp.float64)) / count

    def sweep(self, coefs):
        """``(sums, row_lse)`` like :meth:`dxfield.sweep.ExactSums.sweep`, the sums settled."""
        xp = self.xp
        sums, row_lse = [], [] if self.bidirectional else None
        with quiet(xp):
            for coef in coefs:
                logits = self.r * -coef  # -inf off the pairs
                weighted = logits if self.log_w is None else logits + self.log_w[:, None, :].astype(self.dtype)
                if self.bidirectional:
                    col = logsumexp(xp, logits, 1)  # each target's sum over its class's queries
                    terms = weighted - 0.5 * xp.where(xp.isfinite(col), col, 0)[:, None, :]
                    row_lse.append(LogSumExp.settled(xp, self._rows(_row_exp_sums(xp, weighted)[2]), self.dtype))
                else:
                    terms = weighted
                sums.append([self._side(xp, terms[:, :, :self.npos], self.ys[:, :self.npos]),
                             self._side(xp, terms[:, :, self.npos:], self.ys[:, self.npos:])])
        return sums, row_lse

    def _side(self, xp, terms, ys) -> RowSums:
        """Settled :class:`RowSums` of one side: barycentres ``sum_j exp(t_ij) y_j / sum_j exp(t_ij)`` and
        their log weights, in the queries' order."""
        p, s, log_w = _row_exp_sums(xp, terms)
        b = (p @ ys) / xp.where(s > 0, s, 1)[:, :, None]
        return RowSums.settled(xp, self._rows(b), self._rows(log_w), self.dtype)

    def _rows(self, stacked):
        """A (classes x rows x ...) array back in the queries' order (n x ...)."""
        xp = self.xp
        out = xp.empty((self.n,) + stacked.shape[2:], dtype=stacked.dtype)
        out[xp.asarray(self.order)] = stacked[xp.asarray(self.valid)]
        return out


def _row_exp_sums(xp, terms):
    """``(p, s, log s)`` along the last axis of stacked log-terms: ``p = exp(terms - row max)``, its row sums
    ``s`` and their log-sum-exp in float64 (``-inf`` for a row without terms)."""
    shift = terms.max(axis=2)
    shift = xp.where(xp.isfinite(shift), shift, 0)
    p = xp.exp(terms - shift[:, :, None])
    s = p.sum(axis=2)
    return p, s, xp.where(s > 0, shift.astype(xp.float64) + xp.log(s.astype(xp.float64)), -np.inf)
