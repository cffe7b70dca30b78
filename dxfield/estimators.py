"""The projected field's estimators: attraction and repulsion combined into ``V``, one per setting.

:class:`dxfield.ProjectedField` picks an estimator from :data:`ESTIMATORS` by
``(normalization, repulsion)``, with ``"corrected"`` in place of the
repulsion when a real sample corrects the attraction.  Each takes the
summaries and one :class:`FieldCall` (the call's arguments, resolved and on
the call's device) and returns ``(V, attraction fallback rows, repulsion
fallback rows)``, ``V`` summed over temperatures (docs/design.md sections
2.4-2.8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .attraction import bidirectional_attraction, row_attraction
from .correction import corrected_attraction
from .repulsion import (QUERIES, Negatives, bidirectional_nystrom, exact_repulsion, nystrom_repulsion,
                        sweep_negatives)
from .sums import LogSumExp, RowSums, combine, normalize_drift, quiet


@dataclass(frozen=True)
class FieldCall:
    """One call of the projected field, its arguments resolved and on the call's device."""

    xp: Any
    xa: Any  # the queries (N, D), working dtype
    groups: Any  # [(shard index, host rows)] per class of the queries, or None
    labels: Any  # host labels of the queries, or None
    negatives: Negatives
    centre: Any  # the cache's centre on the device
    ops: Any  # the fused engine's ops, or None
    precision: str
    drift_norm: bool
    sample: Any = None  # (ys, rows per shard, their sample maps or None) of pos_sample, or None
    pos_mass: Any = None  # the positives' mass per class (or in all) in the row sums, or "balanced"; None: every
    #                       data point
    stats: dict = field(default_factory=dict)  # what the estimator measured (the balanced mass), for last_stats

    @property
    def query_labels(self):
        return None if self.groups is None else self.xp.asarray(self.labels)

    @property
    def sweep_options(self) -> dict:
        """Engine and precision of the exact negatives' sweeps (bf16 runs them in TF32)."""
        return dict(ops=self.ops, precision="tf32" if self.precision == "bf16" else self.precision)


def _row_field(pf, c: FieldCall, nystrom: bool):
    """Row normalisation: ``V = b+ - b-`` per temperature (docs/design.md section 2.2)."""
    xp, xa = c.xp, c.xa
    bplus, fallback = row_attraction(pf, xp, xa, c.groups, c.ops, c.precision)
    rep_fallback = 0
    if not nystrom:  # class-conditional: one sweep, pairs of different classes masked
        bminus = exact_repulsion(pf, xp, xa, c.negatives, c.centre, c.query_labels, **c.sweep_options)
    elif c.groups is None:
        bminus, rep_fallback = nystrom_repulsion(pf, xp, xa, c.centre)
    else:  # class-conditional: each query is repelled by the generated samples of its own class
        bminus = [xp.empty_like(xa) for _ in pf.temperatures]
        for _, rows in c.groups:
            idx = xp.asarray(rows)
            part, nf = nystrom_repulsion(pf, xp, xa[idx], c.centre)
            rep_fallback += nf
            for k, b in enumerate(part):
                bminus[k][idx] = b
    total = None
    for k in range(len(pf.temperatures)):
        v = bplus[k]
        v -= bminus[k]
        if c.drift_norm:
            v = normalize_drift(xp, v)
        total = v if total is None else total + v
    return total, fallback, rep_fallback


def _settled(pf, xp, side):
    """:class:`RowSums` and row log-sum-exp value of one side's ``(b, log_w, log_r)``."""
    b, log_w, log_r = side
    return RowSums.settled(xp, b, log_w, pf.dtype), log_r


def _bidirectional_field(pf, c: FieldCall, positives):
    """Algorithm 2 with the summarised data as positives and the negatives exact.

    ``positives``: the attraction estimator's ``(per temperature (b, log_w, log_r), fallback, negatives)``;
    ``negatives`` in the same form when the estimator formed them with its batched groups
    (:func:`dxfield.stacking.block_repulsion`), else None: the negatives are swept.
    """
    xp = c.xp
    pos_side, fallback, neg_side = positives
    if neg_side is not None:  # both sides centred on the cache's centre
        shift = 0
        sums = [[None, RowSums.settled(xp, b, log_w, pf.dtype)] for b, log_w, _ in neg_side]
        row_lse = [LogSumExp.settled(xp, log_r, pf.dtype) for _, _, log_r in neg_side]
    else:
        sweeper, sums, row_lse = sweep_negatives(pf, xp, c.xa, c.negatives, c.query_labels, bidirectional=True,
                                                 **c.sweep_options)
        shift = sweeper.mu - c.centre  # the sweep's sums are centred on the queries' mean
    _weigh_positives(pf, c, pos_side, [r.value() for r in row_lse])
    for k, (b, log_w, log_r) in enumerate(pos_side):
        b -= shift
        sums[k][0] = RowSums.settled(xp, b, log_w, pf.dtype)
        row_lse[k] = LogSumExp.settled(xp, xp.logaddexp(row_lse[k].value(), log_r), pf.dtype)
    return combine(xp, sums, row_lse, drift_norm=c.drift_norm), fallback, 0


def _weigh_positives(pf, c: FieldCall, pos_side, neg_lse) -> None:
    """With ``pos_mass``, add ``log(pos_mass / n)`` of each query's class shard (or of all the data) to the
    positives' ``log_w`` and ``log_r`` of every temperature, in place: the summaries hold sums over every data
    point, and ``pos_mass`` positives drawn from them weigh that share of it (docs/design.md section 8.24).
    ``pos_mass="balanced"``: measured per class by :func:`_weigh_balanced` from ``neg_lse``, the negatives' row
    log-sum-exp per temperature."""
    if c.pos_mass is None:
        return
    if c.pos_mass == "balanced":
        _weigh_balanced(pf, c, pos_side, neg_lse)
        return
    if c.groups is None:
        mass = float(np.log(c.pos_mass / max(pf.n_samples, 1)))
    else:
        per_row = np.zeros(c.xa.shape[0])
        for si, rows in c.groups:
            per_row[rows] = np.log(c.pos_mass / max(pf.shards[si].n, 1))
        mass = c.xp.asarray(per_row)
    for _, log_w, log_r in pos_side:
        log_w += mass
        log_r += mass


def _weigh_balanced(pf, c: FieldCall, pos_side, neg_lse) -> None:
    """``pos_mass="balanced"``: per class, ``log(mass / n) = min(0, mean_t median_i (LR-_ti - LR+_ti))``, the
    median over the class's queries ``i`` (both sides' row log-sum-exps finite) and the mean over temperatures
    ``t``: one mass for every temperature, at which the median query's row normaliser weighs its positives about
    as much as its negatives, and no data point weighs more than 1 (docs/design.md section 8.28).  Adds it in
    place like :func:`_weigh_positives`; leaves ``log(mass)`` per class (on the device) in
    ``c.stats["log_pos_mass"]``.  No host synchronisation."""
    xp = c.xp
    n_rows = c.xa.shape[0]
    group_of = np.zeros(n_rows, dtype=np.int64)
    if c.groups is None:
        sizes = [pf.n_samples]
    else:
        for g, (_, rows) in enumerate(c.groups):
            group_of[rows] = g
        sizes = [pf.shards[si].n for si, _ in c.groups]
    counts = np.bincount(group_of, minlength=len(sizes))
    width = int(counts.max())
    order = np.argsort(group_of, kind="stable")  # the rows class by class, each class's padded with +inf
    slot = np.arange(n_rows) - np.repeat(np.cumsum(counts) - counts, counts)
    layout = (xp.asarray(order), xp.asarray(group_of[order]), xp.asarray(group_of[order] * width + slot))
    medians = []
    for (_, _, log_r), neg in zip(pos_side, neg_lse):
        with quiet(xp):
            gap = xp.asarray(neg, dtype=xp.float64) - xp.asarray(log_r, dtype=xp.float64)
        medians.append(_class_medians(xp, gap, layout, len(sizes), width))
    offset = xp.minimum(xp.mean(xp.stack(medians), axis=0), 0.0)
    offset = xp.where(xp.isnan(offset), 0.0, offset)  # a class without a finite row: every point weighs 1
    shift = offset[xp.asarray(group_of)]
    for _, log_w, log_r in pos_side:
        log_w += shift.astype(log_w.dtype, copy=False)
        log_r += shift.astype(log_r.dtype, copy=False)
    c.stats["log_pos_mass"] = offset + xp.asarray(np.log(np.maximum(sizes, 1)))


def _class_medians(xp, values, layout, groups: int, width: int):
    """Median of the finite ``values`` of each class (nan for a class without one): the rows sorted into a
    padded classes x width block, non-finite entries as +inf.  ``layout``: the rows in class order, their
    classes, and their places in the block."""
    order, group, place = layout
    finite = xp.isfinite(values)
    block = xp.full(groups * width, xp.inf)
    block[place] = xp.where(finite, values, xp.inf)[order]
    block = xp.sort(block.reshape(groups, width), axis=1)
    k = xp.bincount(group[finite[order]], minlength=groups)  # finite rows per class
    lo = xp.take_along_axis(block, xp.maximum((k - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = xp.take_along_axis(block, xp.minimum(k // 2, width - 1)[:, None], axis=1)[:, 0]
    return xp.where(k > 0, 0.5 * (lo + hi), xp.nan)


def _bidirectional_nystrom_field(pf, c: FieldCall):
    """Algorithm 2 with both sides through the landmarks (docs/design.md section 2.8); rows whose
    negatives' Nystrom sums failed take the exact negatives."""
    xp = c.xp
    pos_side, neg_side, fallback, bad = bidirectional_nystrom(pf, xp, c.xa, c.groups)
    rep_fallback = 0
    if any(b is not None for b in bad):
        sweeper, exact, row_lse = sweep_negatives(pf, xp, c.xa, QUERIES, c.query_labels, bidirectional=True,
                                                  **c.sweep_options)
        shift = sweeper.mu - c.centre
        for k, rows in enumerate(bad):
            if rows is None:
                continue
            rep_fallback += int(rows.shape[0])
            ex = exact[k][1]
            has = ex.s[rows] > 0
            b, log_w, log_r = neg_side[k]
            b[rows] = ex.acc[rows] / xp.where(has, ex.s[rows], 1.0)[:, None] + shift
            with np.errstate(divide="ignore"):
                log_w[rows] = xp.where(has, ex.m[rows] + xp.log(xp.where(has, ex.s[rows], 1.0)), -xp.inf)
            log_r[rows] = row_lse[k].value()[rows]
    sums, lse = [], []
    _weigh_positives(pf, c, pos_side, [side[2] for side in neg_side])
    for k in range(len(pf.temperatures)):
        (pos, pos_r), (neg, neg_r) = _settled(pf, xp, pos_side[k]), _settled(pf, xp, neg_side[k])
        sums.append([pos, neg])
        lse.append(LogSumExp.settled(xp, xp.logaddexp(pos_r, neg_r), pf.dtype))
    return combine(xp, sums, lse, drift_norm=c.drift_norm), fallback, rep_fallback


def _row_exact(pf, c: FieldCall):
    return _row_field(pf, c, nystrom=False)


def _row_nystrom(pf, c: FieldCall):
    return _row_field(pf, c, nystrom=True)


def _batched_negatives(c: FieldCall) -> bool:
    """Whether the negatives' side may come with the attraction's batched groups: the queries are the only
    negatives, unweighted, on the composed engine (docs/design.md section 8.19)."""
    n = c.negatives
    return n.include_self and n.neg is None and n.neg_weight is None and c.ops is None


def _bidirectional_exact(pf, c: FieldCall):
    return _bidirectional_field(pf, c, bidirectional_attraction(pf, c.xp, c.xa, c.groups, _batched_negatives(c)))


def _bidirectional_corrected(pf, c: FieldCall):
    return _bidirectional_field(pf, c, corrected_attraction(pf, c.xp, c.xa, c.groups, *c.sample,
                                                            repel=_batched_negatives(c)))


ESTIMATORS = {
    ("row", "exact"): _row_exact,
    ("row", "nystrom"): _row_nystrom,
    ("bidirectional", "exact"): _bidirectional_exact,
    ("bidirectional", "corrected"): _bidirectional_corrected,
    ("bidirectional", "nystrom"): _bidirectional_nystrom_field,
}
