"""Streaming sums: the running row sums, log-sum-exps and the field they combine into.

A leaf module (NumPy/CuPy only, no other dxfield import): every sweep, exact or
projected, composed or fused, hands its results over as :class:`RowSums` per
temperature and side plus a :class:`LogSumExp` of the rows, and :func:`combine`
turns them into the field.  The numerics (a log-scale per row that moves only
when new sums outweigh it) are in docs/design.md section 3.
"""

from __future__ import annotations

import math

import numpy as np

# A running log-scale moves up only when new sums would exceed its scale by more than
# exp(_LAG): most tiles then leave it (and the accumulators) as they are, and running sums
# stay below exp(_LAG) per tile, far from overflow.
_LAG = 8.0


def _fold(xp, m, idx, shift, sums):
    """Fold partial sums ``exp(shift) * sums`` into a running ``(m, s)``; return the factors.

    ``m`` (float64) at ``idx`` rises to ``shift + log(sums)`` where that exceeds
    it by more than ``_LAG`` (or it was -inf); the factors ``(old, new)``
    (float64) bring the running and the new sums to it: ``s <- old * s + new *
    sums``, so a running ``s`` that received anything is >= 1 and the new part
    at most ``exp(_LAG)``.  Both factors come from the stored ``m``, so no
    rounding falls between them.  ``shift = -inf`` or ``sums = 0`` adds nothing.
    """
    shift = shift.astype(xp.float64, copy=False)
    sums = sums.astype(xp.float64, copy=False)
    with quiet(xp):
        m_old = m[idx].copy()
        top = shift + xp.log(sums)
        m_new = xp.where(top > m_old + _LAG, top, m_old)
        m[idx] = m_new
        live = xp.isfinite(m_new)
        old = xp.where(live, xp.exp(m_old - m_new), 1.0)
        new = xp.where(live & (sums > 0), xp.exp(shift - m_new), 0.0)
    return old, new


def _shifted_exp(xp, tile, axis: int):
    """``exp(tile - max)`` in place along ``axis``; return the shifts (the maxima, 0 for a
    line of -inf only)."""
    top = tile.max(axis=axis)
    safe = xp.where(xp.isfinite(top), top, 0.0).astype(tile.dtype, copy=False)
    tile -= safe[:, None] if axis == 1 else safe[None, :]
    xp.exp(tile, out=tile)
    return safe


class RowSums:
    """Streaming sums over targets for one temperature and one side.

    Holds, per query row, a log-scale ``m`` (float64), ``s = sum_j exp(e_ij -
    m)`` and ``acc = sum_j exp(e_ij - m) y_j`` (y centred) for the log-weights
    ``e`` seen so far.  ``m`` either runs along (:meth:`fold`, :meth:`add`:
    ``s >= 1`` once a row received anything) or is fixed for a whole sweep:
    the sums are added directly, then :meth:`settle` moves ``s`` into ``m``.
    Feeding tiles in any order gives the same result up to rounding.
    """

    def __init__(self, xp, n: int, d: int, dtype):
        self.xp = xp
        self.m = xp.full(n, -xp.inf)
        self.s = xp.zeros(n, dtype=dtype)
        self.acc = xp.zeros((n, d), dtype=dtype)

    @classmethod
    def of(cls, xp, m, s, acc) -> "RowSums":
        """Sums already accumulated elsewhere (the fused engine's row states), taken as they are."""
        out = cls.__new__(cls)
        out.xp, out.m, out.s, out.acc = xp, m, s, acc
        return out

    @classmethod
    def settled(cls, xp, b, log_w, dtype) -> "RowSums":
        """Settled sums (``s = 1``) from a barycentre ``b`` (n x D) and its log weight ``log_w``
        (``-inf``: a row without any mass)."""
        return cls.of(xp, log_w, xp.isfinite(log_w).astype(dtype), b.astype(dtype, copy=False))

    def fold(self, rows: slice, shift, s_t):
        """Take in a tile's row sums ``exp(shift_i) * s_t_i``: update ``m`` and ``s`` and rescale
        ``acc``; return the factor (per row) the tile's weighted sums need before being added
        to ``acc[rows]``."""
        xp = self.xp
        dt = self.s.dtype
        started = xp.isfinite(self.m[rows])  # rows that received something (elsewhere acc is 0)
        old, new = _fold(xp, self.m, rows, shift, s_t)
        s = self.s[rows]
        s *= old.astype(dt)
        s += new.astype(dt) * s_t
        moved = xp.nonzero(started & (old != 1.0))[0]  # rows whose scale went up: rare
        if moved.shape[0]:
            acc = self.acc[rows]
            acc[moved] *= old[moved].astype(dt)[:, None]
        return new.astype(dt)

    def settle(self, y_scale: float = 1.0) -> None:
        """Move ``s`` into ``m`` (``s = 1`` where it is positive), scaling ``acc`` by ``y_scale / s``
        (``acc`` summed targets ``y / y_scale``)."""
        xp = self.xp
        has = self.s > 0
        safe = xp.where(has, self.s, 1.0).astype(xp.float64)
        self.m = xp.where(has, self.m + xp.log(safe), self.m)
        self.acc *= (y_scale / safe).astype(self.acc.dtype)[:, None]
        self.s = has.astype(self.s.dtype)

    def add(self, rows: slice, e, y, mm_out, y_scale: float = 1.0) -> None:
        """Add a tile of log-weights ``e`` (bq x bt, overwritten) for targets ``y_scale * y``
        (``y`` bt x D)."""
        shift = _shifted_exp(self.xp, e, 1)
        e *= (self.fold(rows, shift, e.sum(axis=1)) * y_scale)[:, None]
        self.xp.matmul(e, y, out=mm_out)
        self.acc[rows] += mm_out


class LogSumExp:
    """Streaming log-sum-exp: per entry a running log-scale ``m`` (float64) and ``s``."""

    def __init__(self, xp, n: int, dtype):
        self.xp = xp
        self.m = xp.full(n, -xp.inf)
        self.s = xp.zeros(n, dtype=dtype)

    @classmethod
    def of(cls, xp, m, s) -> "LogSumExp":
        """A log-sum-exp ``m + log s`` accumulated elsewhere, taken as it is."""
        out = cls.__new__(cls)
        out.xp, out.m, out.s = xp, m, s
        return out

    @classmethod
    def settled(cls, xp, value, dtype) -> "LogSumExp":
        """The log-sum-exp whose value is ``value`` (``s = 1``)."""
        return cls.of(xp, value, xp.ones(value.shape[0], dtype=dtype))

    def fold(self, idx, shift, sums) -> None:
        """Fold in ``log(exp(shift) * sums)`` entry by entry."""
        old, new = _fold(self.xp, self.m, idx, shift, sums)
        s = self.s[idx]
        s *= old.astype(s.dtype)
        s += new.astype(s.dtype) * sums

    def add(self, idx, tile, axis: int) -> None:
        """Fold in ``tile`` (overwritten), reduced over ``axis``."""
        shift = _shifted_exp(self.xp, tile, axis)
        self.fold(idx, shift, tile.sum(axis=axis))

    def value(self):
        xp = self.xp
        with quiet(xp):
            return self.m + xp.log(self.s)



def logsumexp(xp, a, axis: int):
    """``log(sum(exp(a), axis))`` of a dense block, shifted by its maxima; -inf where every entry is
    -inf (an empty, fully masked line), in ``a``'s dtype."""
    top = a.max(axis=axis, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0)
    return (top + xp.log(xp.exp(a - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def quiet(xp):
    """An ``errstate`` that silences the -inf/NaN warnings of log-space arithmetic."""
    return np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore")


def span_limit(dtype) -> float:
    """Largest spread (natural log) of the column factors a factored exponent may have.

    A term that matters (within ``eps^2`` of its row's largest) then has both
    factors and their product above the smallest normal number, with a margin.
    """
    fi = np.finfo(dtype)
    return -math.log(float(fi.tiny)) + 2.0 * math.log(float(fi.eps)) - 8.0


def finite_range(xp, vec):
    """``(min, max)`` over the finite entries of ``vec``; ``(inf, -inf)`` if there are none."""
    fin = xp.isfinite(vec)
    if not bool(fin.any()):
        return math.inf, -math.inf
    return float(xp.min(xp.where(fin, vec, xp.inf))), float(xp.max(xp.where(fin, vec, -xp.inf)))



def combine(xp, sums, row_lse, *, drift_norm: bool, xc=None):
    """Per-temperature fields from the streamed sums, drift-normalised if asked, summed.

    Works in place on the accumulators (they are consumed), so combining needs
    no memory beyond the sums themselves.  ``xc``: the centred queries, needed
    by row normalisation for rows without any negative (there ``b- := x_i``).
    """
    total = None
    for k, (pos, neg) in enumerate(sums):
        if row_lse is None:
            v = pos.acc
            has_pos = pos.s > 0
            v /= xp.where(has_pos, pos.s, 1.0)[:, None]
            if not bool(has_pos.all()):  # no positive of its class: no attraction (b+ := x_i)
                v[~has_pos] = xc[~has_pos]
            has_neg = neg.s > 0
            neg.acc /= xp.where(has_neg, neg.s, 1.0)[:, None]
            if not bool(has_neg.all()):
                # No negative mass (N = 1 self-only, or all weights 0): no repulsion, and the
                # field is the mean shift b+(x_i) - x_i, local to the query.
                neg.acc[~has_neg] = xc[~has_neg]
            v -= neg.acc
        else:
            # V_i = exp(m+_i + m-_i - LR_i) * (s-_i acc+_i - s+_i acc-_i)
            with quiet(xp):
                logf = pos.m + neg.m - row_lse[k].value()
            finite = xp.isfinite(logf)
            v = pos.acc
            v *= neg.s[:, None]
            neg.acc *= pos.s[:, None]
            v -= neg.acc
            if drift_norm:  # only the relative factor matters before normalising
                ref = xp.max(xp.where(finite, logf, -xp.inf)) if bool(finite.any()) else 0.0
                logf = logf - ref
            factor = xp.where(finite, xp.exp(xp.where(finite, logf, 0.0)), 0.0).astype(v.dtype, copy=False)
            v *= factor[:, None]
        del pos.acc, neg.acc
        if drift_norm:
            v = normalize_drift(xp, v)
        if total is None:
            total = v
        else:
            total += v
    return total


def normalize_drift(xp, v):
    """``v / sqrt(mean_i ||v_i||^2 / D)``; an all-zero field stays zero."""
    flat = v.reshape(-1)
    peak = float(xp.max(xp.abs(flat))) if flat.size else 0.0
    if not (peak > 0 and math.isfinite(peak)):
        return v
    v /= peak  # first to O(1), so the sum of squares cannot overflow in float32
    rms = math.sqrt(float(xp.vdot(flat, flat)) / flat.size)  # no N x D temporary
    v /= rms
    return v

