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
for its column sums and once for the row sums.  The final factor is applied in
log space and drift normalisation removes a common scale first.

Streaming without under- or overflow.  Logits are ``l_ij = -c r_ij`` with ``r``
the distance (Laplace) or its square (Gaussian), ``c > 0`` per temperature, and
``-inf`` for pairs that do not interact (self pairs, other classes, weight 0).
Every weighted sum is factored around a per-row floor ``f_i <= min_j r_ij``::

    sum_j exp(l_ij + b_j) [y_j, 1] = exp(-c f_i + B) * E_i. @ (exp(b - B) [y, 1]),
    E_ij = exp(-c (r_ij - f_i)) <= 1,

with the column log-factors ``b_j = log w_j - LC_j / 2`` (bidirectional; ``log
w_j`` for the row field) capped by ``B >= max b``.  ``E`` takes one ``exp`` per
entry and temperature, ``f`` is shared by all temperatures (one subtraction per
entry), and one matrix product per temperature gives all the sums (the column
factors go into the targets), with no per-entry shift.  This is exact as long
as the terms that matter (within ``eps^2`` of a row's largest) stay normal
numbers, which holds when the spread of ``b`` is at most :func:`_span_limit`
(about 47 in float32, 630 in float64):

* with ``feature_scale="auto"`` the mean-distance sweep also records each row's
  nearest interacting target per side and the range of the column minima,
  from which ``B`` (``-c cmin_j <= LC_j <= -c cmin_j + log N``) and fixed floors
  follow for the whole sweep (:class:`_Floors`): the accumulators then need no
  rescaling at all, and the same bound covers the spread;
* otherwise (or when that bound is too wide, e.g. outliers at small
  temperatures) each tile takes its own row minima and ``B = max b``, and folds
  its sums into running ones with a log-scale per row (:class:`RowSums`), which
  moves only when a tile outweighs it by ``exp(_LAG)``; a tile whose ``b``
  spread is too wide forms its log-weights entry by entry instead.

The column sums ``LC_j`` come from the same ``E``: ``sum_i exp(-c (r_ij -
lo)) = (rho @ E)_j`` with ``rho_i = exp(-c (f_i - lo))``, ``lo = min f``, when
the column minima and the floors lie within the same limit; otherwise from
``exp(-c (r_ij - cmin_j))``.

Distances come from one product of augmented matrices, ``[x | |x|^2 | 1] @
[-2 y | 1 | |y|^2]^T`` (:func:`dxfield.kernels.augmented_queries`), then the
near-duplicate refinement of :func:`dxfield.kernels.sqdist_tile`.

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
mean needs one extra sweep over the distances; it keeps as many distance tiles
as the unused part of the budget holds, so the field sweep skips their products.

Memory: beyond its inputs the call holds O((N + tile) D) accumulators and a few
tiles of ``bq x bt`` entries chosen from ``memory_budget`` (default 64 MiB),
plus the distance tiles kept in what the plan leaves of the budget; never an
N x (P + M) array.
"""

from __future__ import annotations

from __future__ import annotations

import math
from numbers import Real

from . import checks
from .backend import device_context, floating_dtype, place, to_host
from .engine import resolve as resolve_engine
from .kernels import check_kernel, logit_coef
from .memory import parse_budget, tile_cap
from .sums import combine, quiet
from .sweep import ExactSums
from .targets import Targets

NORMALIZATIONS = ("bidirectional", "row")
# On the CPU the sweep's elementwise passes stream from memory whatever the tile size, while
# each tile costs a fixed update of the N x D accumulators: tiles larger than the generic
# cache-sized cap pay off (measured: 2^19 entries, 1024 x 512 at the benchmark's shape).
_CPU_TILE = 1 << 19
DEFAULT_TEMPERATURES = (0.02, 0.05, 0.2)


def exact_tile_cap(device) -> int:
    """Largest exact-sweep tile (entries) worth using on ``device``."""
    return max(tile_cap(device), _CPU_TILE) if device.kind == "cpu" else tile_cap(device)


def log_weights(xp, neg_weight, m: int, dtype, check_finite: bool):
    """Log of per-negative weights: scalar or (M,), each finite and >= 0."""

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
        first = int(to_host(bad).argmax())
        raise ValueError(f"neg_weight must be finite and >= 0; neg_weight[{first}] = {float(w[first])!r}")
    with quiet(xp):
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
        see :mod:`dxfield.fused`).  ``"auto"``: fused on a GPU for float32
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
    temps = checks.temperatures(temperatures)
    normalization = checks.choice(normalization, "normalization", NORMALIZATIONS)
    kernel = check_kernel(kernel)
    block = checks.block_size(block_size)
    parse_budget(memory_budget)  # a bad budget fails before any work
    include_self, neg_weight = resolve_negatives(neg, neg_weight, include_self)
    scale_arg = feature_scale
    if not (feature_scale is None or (isinstance(feature_scale, str) and feature_scale == "auto")):
        if isinstance(feature_scale, str):
            raise ValueError(f"feature_scale={feature_scale!r} is not valid; use 'auto', a number > 0, or None")
        scale_arg = checks.positive_float(feature_scale, "feature_scale")

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
        xa = checks.float_matrix(a["x"], "x", dtype, check_finite=check_finite)
        n, d = xa.shape
        pa = checks.float_matrix(a["pos"], "pos", dtype, dim=d, check_finite=check_finite)
        qlab = checks.class_labels(a["labels"], n, "labels")
        plab = checks.class_labels(a["pos_labels"], pa.shape[0], "pos_labels")
        targets = [Targets(pa, False, labels=plab)]
        if include_self:
            targets.append(Targets(xa, True, is_queries=True, labels=qlab))
        if neg is not None:
            na = checks.float_matrix(a["neg"], "neg", dtype, dim=d, check_finite=check_finite)
            logw = None
            if neg_weight is not None:
                logw = log_weights(xp, a["neg_weight"] if weights_is_array else neg_weight, na.shape[0], dtype, check_finite)
            targets.append(Targets(na, True, log_weight=logw,
                                   labels=checks.class_labels(a["neg_labels"], na.shape[0], "neg_labels")))

        # One engine for both sweeps: its plan is checked against the budget before any work,
        # and the mean-distance sweep reuses its centred queries and tile shape.
        sweeper = ExactSums(xp, xa, targets, n_temperatures=len(temps), kernel=kernel,
                            bidirectional=normalization == "bidirectional", budget=budget,
                            block_size=block, tile_cap=exact_tile_cap(placement.device), query_labels=qlab,
                            ops=resolve_engine(engine, precision, placement, dtype, len(temps)),
                            precision=precision)
        scale = None
        unit = 1.0  # distance unit the temperatures are measured in
        if scale_arg == "auto":
            mean_d = sweeper.mean_distance()
            scale = mean_d / math.sqrt(d) if mean_d > 0 and math.isfinite(mean_d) else 1.0
        elif scale_arg is not None:
            scale = float(scale_arg)
        if scale is not None:
            unit = scale * math.sqrt(d)
        sums, row_lse = sweeper.sweep([logit_coef(kernel, tau * unit) for tau in temps])
        v = combine(xp, sums, row_lse, drift_norm=drift_norm, xc=sweeper.xc)
        del sweeper
        if scale is not None and not drift_norm:
            v /= scale
        v = placement.to_origin(v)
        return (v, scale) if return_scale else v

