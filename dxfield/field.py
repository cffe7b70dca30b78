"""The exact drifting field, evaluated in tiles with bounded memory.

Math (design.md 2.1-2.3).  Queries ``x`` (N x D), positives ``y+`` (P x D),
negatives ``y-`` (M x D, by default the queries with self pairs masked), logits
``l_ij = log k(x_i, y_j)`` over the concatenated targets.

*Bidirectional* (Algorithm 2 of the drifting paper)::

    A_ij = sqrt(softmax_j(l)_ij * softmax_i(l)_ij) = exp(l_ij - LR_i/2 - LC_j/2)
    W+ = A+ * rowsum(A-),  W- = A- * rowsum(A+),  V = W+ y+ - W- y-

with ``LR_i`` the log-sum-exp of row ``i`` and ``LC_j`` that of column ``j``.
Because ``exp(-LR_i/2)`` is one factor per row it comes out of every row sum::

    V_i = exp(-LR_i) * (S-_i N+_i - S+_i N-_i),
    S±_i = sum_j exp(l_ij - LC_j/2),  N±_i = sum_j exp(l_ij - LC_j/2) y_j.

So one sweep over target tiles suffices when a tile spans all queries (its
column sums are then complete); otherwise each target tile is swept twice, once
for its column sums and once for the row sums.  Row sums carry a running
maximum per row and side (as in streaming softmax), so nothing under- or
overflows at small temperatures; the final factor is applied in log space and
drift normalisation removes a common scale first.

*Row-normalised* (mean shift, what the projected field approximates)::

    b±(x_i) = sum_j k(x_i, y±_j) y±_j / sum_j k(x_i, y±_j),   V = b+ - b-,

with ``b- := x_i`` for a query without any negative (N = 1 with self negatives
only, or all weights zero), so its field is the plain mean shift toward the
positives.  Bidirectional gives V = 0 there (no negative mass to balance).

Weighted negatives: a negative of weight ``w`` counts as ``w`` copies of that
point (its kernel entries are multiplied by ``w`` in the row sums; its own
column normalisation is unchanged).  Integer weights therefore give exactly the
field of a duplicated negative.

Feature scale: with ``feature_scale="auto"`` the features are divided by
``S = mean distance / sqrt(D)`` (mean over every query-target pair except
masked self pairs) and the kernel uses ``tau * sqrt(D)``, i.e. logits are
``-(d / mean d) / tau``; the field is returned in these normalised units.  The
mean needs one extra sweep over the distances.

Memory: beyond its inputs the call holds O((N + tile) D) accumulators and a few
tiles of ``bq x bt`` entries chosen from ``memory_budget`` (default 64 MiB);
never an N x (P + M) array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

from . import _checks
from ._backend import device_context, floating_dtype, place
from ._memory import parse_budget, plan_blocks, tile_cap
from ._fused import resolve as resolve_engine
from .kernels import _set_diagonal, check_kernel, logit_coef, sq_norms, sqdist_tile

NORMALIZATIONS = ("bidirectional", "row")
DEFAULT_TEMPERATURES = (0.02, 0.05, 0.2)


@dataclass
class Targets:
    """A run of targets: positives, the queries as negatives, or explicit negatives."""

    y: Any  # (n, D) in the working dtype, uncentred
    negative: bool
    log_weight: Any = None  # (n,) or None
    is_queries: bool = False  # these targets are the queries: mask i == j
    labels: Any = None  # (n,) ints: pairs whose query label differs are masked (class-conditional)

    @property
    def n(self) -> int:
        return int(self.y.shape[0])


class RowSums:
    """Streaming sums over targets for one temperature and one side.

    Holds, per query row, a running maximum ``m`` of the log-weights seen so
    far, ``s = sum_j exp(e_ij - m)`` and ``acc = sum_j exp(e_ij - m) y_j`` (y
    centred).  Feeding tiles in any order gives the same result up to rounding.
    """

    def __init__(self, xp, n: int, d: int, dtype):
        self.xp = xp
        self.m = xp.full(n, -xp.inf, dtype=dtype)
        self.s = xp.zeros(n, dtype=dtype)
        self.acc = xp.zeros((n, d), dtype=dtype)

    def add(self, rows: slice, e, y, mm_out) -> None:
        """Add a tile of log-weights ``e`` (bq x bt, overwritten) for targets ``y`` (bt x D)."""
        xp = self.xp
        m_old = self.m[rows]
        m_new = xp.maximum(m_old, e.max(axis=1))
        shift = xp.where(xp.isfinite(m_new), m_new, 0.0).astype(e.dtype, copy=False)
        e -= shift[:, None]
        xp.exp(e, out=e)
        scale = xp.exp(m_old - shift)
        s = self.s[rows]
        s *= scale
        s += e.sum(axis=1)
        acc = self.acc[rows]
        acc *= scale[:, None]
        xp.matmul(e, y, out=mm_out)
        acc += mm_out
        self.m[rows] = m_new


class LogSumExp:
    """Streaming log-sum-exp along one axis of a sequence of tiles."""

    def __init__(self, xp, n: int, dtype):
        self.xp = xp
        self.m = xp.full(n, -xp.inf, dtype=dtype)
        self.s = xp.zeros(n, dtype=dtype)

    def add(self, idx, tile, axis: int, scratch) -> None:
        """Fold in ``tile`` (reduced over ``axis``); ``scratch`` is work space of its shape."""
        xp = self.xp
        m_old = self.m[idx]
        m_new = xp.maximum(m_old, tile.max(axis=axis))
        shift = xp.where(xp.isfinite(m_new), m_new, 0.0).astype(tile.dtype, copy=False)
        xp.subtract(tile, shift[:, None] if axis == 1 else shift[None, :], out=scratch)
        xp.exp(scratch, out=scratch)
        s = self.s[idx]
        s *= xp.exp(m_old - shift)
        s += scratch.sum(axis=axis)
        self.m[idx] = m_new

    def value(self):
        xp = self.xp
        with _quiet(xp):
            return self.m + xp.log(self.s)


def _quiet(xp):
    import numpy as np

    return np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore")


class ExactSums:
    """Tiled sweep over targets producing :class:`RowSums` per temperature and side.

    Shared by :func:`drift_field` and the projected field's exact repulsion.
    Coordinates are centred on the queries' mean; every field built from these
    sums is translation invariant, so the centre never needs adding back.
    """

    # The fused GPU engine (dxfield._fused) runs both sweeps when ``ops`` is set; ``precision``
    # is its GEMM precision ("float32" or "tf32").
    ops = None
    precision = "float32"

    def __init__(self, xp, x, targets: list[Targets], *, log_kernel_scales, kernel: str,
                 bidirectional: bool, budget: int, block_size=None, tile_cap: int, sides=(0, 1),
                 query_labels=None):
        self.xp = xp
        self.query_labels = query_labels  # (N,) ints, with Targets.labels: block-diagonal by class
        self.x = x
        self.targets = targets
        self.kernel = kernel
        self.coefs = tuple(log_kernel_scales)  # logits = -coef * (d or d^2); settable before sweep()
        self.bidirectional = bidirectional
        self.sides = tuple(sides)  # which RowSums to keep: 0 positives, 1 negatives
        n, d = x.shape
        self.n, self.d = n, d
        self.dtype = x.dtype
        it = self.dtype.itemsize
        nt = len(self.coefs)
        self.plan = plan_blocks(
            n, max(t.n for t in targets), budget=budget,
            # centred queries and norms, plus the accumulators of each side and temperature
            # (combined in place at the end)
            fixed=it * (n * d * (1 + len(self.sides) * nt) + n * (2 + 8 * nt) + 2 * d),
            # distance tile, logits tile, scratch, hit mask, and near-duplicate refinement
            per_tile_entry=5 * it + 1,
            per_query_row=it * (d + 10) + 16,
            per_target_row=it * (d + 2 * nt + 10),
            max_tile_entries=tile_cap,
            override=block_size,
            what=f"the exact field with N={n}, D={d} and {nt} temperature(s)",
        )
        self.mu = x.mean(axis=0)
        self.xc = x - self.mu
        self.xx = sq_norms(self.xc)

    # -- tiles -------------------------------------------------------------------------
    def _workspace(self):
        xp, plan = self.xp, self.plan
        size = plan.bq * plan.bt
        return dict(
            dist=xp.empty(size, dtype=self.dtype),
            logits=xp.empty(size, dtype=self.dtype),
            scratch=xp.empty(size, dtype=self.dtype),
            hits=xp.empty(size, dtype=bool),
            mm=xp.empty(plan.bq * self.d, dtype=self.dtype),
        )

    def _distance_tiles(self, ws, yc, yy, j0: int, is_queries: bool):
        """Yield ``(rows, i0, r)`` over query tiles; ``r`` is d (laplace) or d^2 (gaussian)."""
        xp, bq, n = self.xp, self.plan.bq, self.n
        bt = yc.shape[0]
        for i0 in range(0, n, bq):
            rows = slice(i0, min(n, i0 + bq))
            shape = (rows.stop - i0, bt)
            size = shape[0] * shape[1]
            r = ws["dist"][:size].reshape(shape)
            sqdist_tile(self.xc[rows], self.xx[rows], yc, yy, r,
                        ws["scratch"][:size].reshape(shape), ws["hits"][:size].reshape(shape),
                        self_offset=(j0 - i0) if is_queries else None)
            if self.kernel == "laplace":
                xp.sqrt(r, out=r)
            yield rows, i0, r

    def _logits(self, ws, r, k: int, mask_offset, rows=None, tlab=None):
        l = ws["logits"][: r.size].reshape(r.shape)
        self.xp.multiply(r, -self.coefs[k], out=l)
        if mask_offset is not None:
            _set_diagonal(l, mask_offset, -self.xp.inf)
        if tlab is not None:  # other-class pairs do not interact
            other = ws["hits"][: r.size].reshape(r.shape)
            self.xp.not_equal(self.query_labels[rows][:, None], tlab[None, :], out=other)
            l[other] = -self.xp.inf
        return l

    def _target_tiles(self):
        for t in self.targets:
            for j0 in range(0, t.n, self.plan.bt):
                yc = t.y[j0:j0 + self.plan.bt] - self.mu
                yy = sq_norms(yc)
                logw = None if t.log_weight is None else t.log_weight[j0:j0 + self.plan.bt]
                tlab = None if t.labels is None else t.labels[j0:j0 + self.plan.bt]
                yield t, j0, yc, yy, logw, tlab

    # -- sweeps ------------------------------------------------------------------------
    def mean_distance(self) -> float:
        """Mean ``||x_i - y_j||`` over every pair except masked self pairs (float64 sum)."""
        if self.ops is not None:
            from ._fused import mean_distance
            return mean_distance(self)
        xp = self.xp
        ws = self._workspace()
        total, count = 0.0, 0
        for t, j0, yc, yy, _, tlab in self._target_tiles():
            for rows, i0, r in self._distance_tiles(ws, yc, yy, j0, t.is_queries):
                d = r if self.kernel == "laplace" else xp.sqrt(r, out=r)
                if tlab is not None:  # only same-class pairs interact, so only they set the scale
                    same = ws["hits"][: d.size].reshape(d.shape)
                    xp.equal(self.query_labels[rows][:, None], tlab[None, :], out=same)
                    d *= same
                    count += int(same.sum()) - d.size
                total += float(d.sum(dtype=xp.float64))
                count += d.size
                if t.is_queries:
                    bq = rows.stop - i0
                    count -= max(0, min(yc.shape[0], bq - (j0 - i0)) - max(0, -(j0 - i0)))
        return total / count if count > 0 else 0.0

    def sweep(self):
        """Return ``(sums, row_lse)``: ``sums[k][side]`` are :class:`RowSums`; ``row_lse[k]``
        the row log-sum-exp over all (weighted) targets, or None for row normalisation."""
        if self.ops is not None:
            from ._fused import exact_sweep
            return exact_sweep(self)
        xp, n, d, dt = self.xp, self.n, self.d, self.dtype
        nt = len(self.coefs)
        sums = [[RowSums(xp, n, d, dt) if side in self.sides else None for side in (0, 1)] for _ in range(nt)]
        row_lse = [LogSumExp(xp, n, dt) for _ in range(nt)] if self.bidirectional else None
        ws = self._workspace()
        whole_columns = self.plan.bq >= n
        for t, j0, yc, yy, logw, tlab in self._target_tiles():
            side = 1 if t.negative else 0
            if side not in self.sides:
                raise ValueError("ExactSums: targets on a side that was not requested")
            bt = yc.shape[0]
            col_lse = None
            if self.bidirectional and not whole_columns:
                # First sweep over query tiles: complete the column sums of this target tile.
                col_lse = [LogSumExp(xp, bt, dt) for _ in range(nt)]
                for rows, i0, r in self._distance_tiles(ws, yc, yy, j0, t.is_queries):
                    for k in range(nt):
                        l = self._logits(ws, r, k, (j0 - i0) if t.is_queries else None, rows, tlab)
                        col_lse[k].add(slice(None), l, 0, ws["scratch"][: l.size].reshape(l.shape))
                col_lse = [c.value() for c in col_lse]
            for rows, i0, r in self._distance_tiles(ws, yc, yy, j0, t.is_queries):
                mm = ws["mm"][: (rows.stop - i0) * d].reshape(rows.stop - i0, d)
                for k in range(nt):
                    l = self._logits(ws, r, k, (j0 - i0) if t.is_queries else None, rows, tlab)
                    scratch = ws["scratch"][: l.size].reshape(l.shape)
                    if self.bidirectional:
                        if whole_columns:
                            c = LogSumExp(xp, bt, dt)
                            c.add(slice(None), l, 0, scratch)
                            lc = c.value()
                        else:
                            lc = col_lse[k]
                        # A fully masked column (no query but itself) contributes nothing.
                        half_lc = xp.where(xp.isfinite(lc), 0.5 * lc, 0.0).astype(dt, copy=False)
                        if logw is not None:
                            l += logw[None, :]
                        row_lse[k].add(rows, l, 1, scratch)
                        l -= half_lc[None, :]
                    elif logw is not None:
                        l += logw[None, :]
                    sums[k][side].add(rows, l, yc, mm)
        return sums, row_lse


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
            with _quiet(xp):
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


def _weights(xp, neg_weight, m: int, dtype, check_finite: bool):
    """Log of per-negative weights: scalar or (M,), each finite and >= 0."""
    import numpy as np

    if isinstance(neg_weight, float):
        w = xp.full(m, neg_weight, dtype=dtype)
    else:
        w = neg_weight
        if w.ndim != 1 or w.shape[0] != m:
            raise ValueError(f"neg_weight must be a number or an array of shape ({m},) (one per negative), got shape {tuple(w.shape)}")
        if w.dtype.kind not in "fiub":
            raise TypeError(f"neg_weight must hold real numbers, got dtype {w.dtype}")
        w = w.astype(dtype, copy=False)
    # Checked even with check_finite=False: a negative weight would break the row sums.
    bad = ~xp.isfinite(w) | (w < 0)
    if bool(bad.any()):
        first = int(np.argmax(bad.get() if hasattr(bad, "get") else bad))
        raise ValueError(f"neg_weight must be finite and >= 0; neg_weight[{first}] = {float(w[first])!r}")
    with _quiet(xp):
        return xp.log(w)


def resolve_negatives(neg, neg_weight, include_self):
    """Check the negatives' options; return ``include_self`` (resolved) and ``neg_weight``
    (None, a float for any scalar, or the array as given)."""
    if include_self is None:
        include_self = neg is None
    if neg is None and not include_self:
        raise ValueError("include_self=False needs explicit negatives: pass neg, or keep include_self")
    if neg_weight is not None and neg is None:
        raise ValueError("neg_weight weights the explicit negatives: pass neg as well")
    if neg_weight is not None and (isinstance(neg_weight, Real) or getattr(neg_weight, "ndim", None) == 0):
        neg_weight = float(neg_weight)  # Python, NumPy or 0-d array scalar: one weight for all
    return include_self, neg_weight


def drift_field(x, pos, neg=None, *, temperatures=DEFAULT_TEMPERATURES, normalization: str = "bidirectional",
                kernel: str = "laplace", feature_scale="auto", drift_norm: bool = True, neg_weight=None,
                include_self: bool | None = None, return_scale: bool = False, memory_budget=None,
                block_size=None, backend=None, check_finite: bool = True, labels=None, pos_labels=None,
                neg_labels=None, engine=None, precision: str = "float32"):
    """Exact drifting field ``V`` (N x D) at the queries ``x``.

    Parameters
    ----------
    x : array (N, D)
        Queries: generated samples (or their features). NumPy, CuPy, or any
        DLPack-capable array such as a torch tensor (taken zero-copy).
    pos : array (P, D)
        Positives (real samples): attraction.
    neg : array (M, D), optional
        Explicit negatives: repulsion.  Default: the queries themselves, each
        query's own pair masked.
    temperatures : float or sequence of float, default (0.02, 0.05, 0.2)
        One field per temperature; with ``drift_norm`` each is normalised, then
        they are summed.
    normalization : {"bidirectional", "row"}
        ``"bidirectional"``: Algorithm 2 of the drifting paper (row and column
        softmax).  ``"row"``: mean shift ``b+(x) - b-(x)``.
    kernel : {"laplace", "gaussian"}
        ``exp(-d / tau)`` (default) or ``exp(-d^2 / (2 tau^2))``.
    feature_scale : "auto", float or None
        ``"auto"``: divide features by ``S = mean distance / sqrt(D)`` and use
        ``tau * sqrt(D)`` (logits ``-(d / mean d) / tau``).  A float: that ``S``.
        None: raw features and raw ``tau``.  The field is returned in the
        scaled units (``V_raw / S``).
    drift_norm : bool, default True
        Per temperature, ``V <- V / sqrt(mean_i ||V_i||^2 / D)``.
    neg_weight : float or array (M,), optional
        Weights of the explicit negatives (classifier-free guidance); a weight
        ``w`` counts a negative as ``w`` copies.  Needs ``neg``.
    include_self : bool, optional
        Also use the queries as negatives (self pairs masked).  Default: True
        when ``neg`` is None, else False; with ``neg`` and ``neg_weight`` this is
        the guidance setting (generated batch plus weighted real negatives).
    return_scale : bool
        Also return the feature scale ``S`` used (None when unscaled).
    memory_budget : int or str, optional
        Extra bytes this call may use (default ``$DXFIELD_MEMORY_BUDGET``, else
        64 MiB on the CPU and 512 MiB on a GPU).
    block_size : (int, int), optional
        Force the tile shape (query rows, target rows); for tests and tuning.
    backend : {"auto", "numpy", "cupy"}, optional
        Where to compute (default ``$DXFIELD_BACKEND`` or ``"auto"``: follow the input).
    check_finite : bool, default True
        Reject NaN/Inf inputs (one pass over the inputs).
    labels, pos_labels, neg_labels : int arrays (N,), (P,), (M,), optional
        Class-conditional field in one call: a query interacts only with
        targets of its own class (positives, other queries, and explicit
        negatives with ``neg_labels``; explicit negatives without labels
        interact with every query, e.g. guidance's unconditional negatives).
        Equivalent to one call per class, except that ``feature_scale="auto"``
        takes one mean over all same-class pairs.  Needs ``pos_labels``.
    engine : {"auto", "composed", "fused"}, optional
        How the sweeps run (default ``$DXFIELD_ENGINE`` or ``"auto"``).
        ``"composed"``: array operations (NumPy or CuPy), the reference.
        ``"fused"``: CUDA RawKernels around cuBLAS products (GPU, float32;
        see :mod:`dxfield._fused`).  ``"auto"``: fused on a GPU for float32
        inputs, composed otherwise.
    precision : {"float32", "tf32"}, default "float32"
        Precision of the fused engine's matrix products.  ``"tf32"`` uses the
        tensor cores (about 1e-3 relative error in the products); GPU only.

    Returns
    -------
    V : array (N, D), in the namespace and on the device of the inputs
        (NumPy for CPU inputs, CuPy for GPU inputs); float64 if any input is
        float64, else float32.  With ``return_scale``, ``(V, S)``.

    Notes
    -----
    Cost O(N (N + P + M) D) flops per call (shared by all temperatures) and
    memory bounded by ``memory_budget`` beyond the inputs; exact, not approximated.

    Examples
    --------
    >>> import numpy as np, dxfield
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(64, 2)), rng.normal(size=(256, 2)) + 3.0
    >>> V = dxfield.drift_field(x, y)
    >>> V.shape, bool((V.mean(0) > 0).all())  # generated points are pulled toward the data
    ((64, 2), True)
    """
    temps = _checks.temperatures(temperatures)
    normalization = _checks.choice(normalization, "normalization", NORMALIZATIONS)
    kernel = check_kernel(kernel)
    block = _checks.block_size(block_size)
    parse_budget(memory_budget)  # a bad budget fails before any work
    include_self, neg_weight = resolve_negatives(neg, neg_weight, include_self)
    scale_arg = feature_scale
    if not (feature_scale is None or (isinstance(feature_scale, str) and feature_scale == "auto")):
        if isinstance(feature_scale, str):
            raise ValueError(f"feature_scale={feature_scale!r} is not valid; use 'auto', a number > 0, or None")
        scale_arg = _checks.positive_float(feature_scale, "feature_scale")

    if labels is not None and pos_labels is None:
        raise ValueError("labels (of the queries) needs pos_labels (of the positives) too")
    if labels is None and (pos_labels is not None or neg_labels is not None):
        raise ValueError("pos_labels/neg_labels need labels (of the queries) too")
    if neg_labels is not None and neg is None:
        raise ValueError("neg_labels labels the explicit negatives: pass neg as well")
    arrays = {"x": x, "pos": pos, "neg": neg, "labels": labels, "pos_labels": pos_labels,
              "neg_labels": neg_labels}
    weights_is_array = neg_weight is not None and not isinstance(neg_weight, float)
    if weights_is_array:
        arrays["neg_weight"] = neg_weight
    placement, a = place(arrays, backend)
    xp = placement.xp
    budget = parse_budget(memory_budget, device=placement.device)
    with device_context(placement):
        dtype = floating_dtype(xp, a["x"], a["pos"], a["neg"])
        xa = _checks.float_matrix(a["x"], "x", dtype, check_finite=check_finite)
        n, d = xa.shape
        pa = _checks.float_matrix(a["pos"], "pos", dtype, dim=d, check_finite=check_finite)
        qlab = _checks.class_labels(a["labels"], n, "labels")
        plab = _checks.class_labels(a["pos_labels"], pa.shape[0], "pos_labels")
        targets = [Targets(pa, False, labels=plab)]
        if include_self:
            targets.append(Targets(xa, True, is_queries=True, labels=qlab))
        if neg is not None:
            na = _checks.float_matrix(a["neg"], "neg", dtype, dim=d, check_finite=check_finite)
            logw = None
            if neg_weight is not None:
                logw = _weights(xp, a["neg_weight"] if weights_is_array else neg_weight, na.shape[0], dtype, check_finite)
            targets.append(Targets(na, True, log_weight=logw,
                                   labels=_checks.class_labels(a["neg_labels"], na.shape[0], "neg_labels")))

        # One engine for both sweeps: its plan is checked against the budget before any work,
        # and the mean-distance sweep reuses its centred queries and tile shape.
        sweeper = ExactSums(xp, xa, targets, log_kernel_scales=[1.0] * len(temps), kernel=kernel,
                            bidirectional=normalization == "bidirectional", budget=budget,
                            block_size=block, tile_cap=tile_cap(placement.device), query_labels=qlab)
        sweeper.ops = resolve_engine(engine, precision, placement, dtype, len(temps))
        sweeper.precision = precision
        scale = None
        unit = 1.0  # distance unit the temperatures are measured in
        if scale_arg == "auto":
            mean_d = sweeper.mean_distance()
            scale = mean_d / math.sqrt(d) if mean_d > 0 and math.isfinite(mean_d) else 1.0
        elif scale_arg is not None:
            scale = float(scale_arg)
        if scale is not None:
            unit = scale * math.sqrt(d)
        sweeper.coefs = tuple(logit_coef(kernel, tau * unit) for tau in temps)
        sums, row_lse = sweeper.sweep()
        v = combine(xp, sums, row_lse, drift_norm=drift_norm, xc=sweeper.xc)
        del sweeper
        if scale is not None and not drift_norm:
            v /= scale
        v = placement.to_origin(v)
        return (v, scale) if return_scale else v

