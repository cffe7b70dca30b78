"""The exact drifting field, :func:`drift_field`: Algorithm 2 or the mean shift, in bounded memory.

Checks the call's arguments, builds the targets (positives, the queries as
negatives with self pairs masked, explicit weighted negatives), measures the
feature scale, and runs one :class:`dxfield.sweep.ExactSums` whose streamed
sums :func:`dxfield.sums.combine` turns into the field.  The math is in
docs/design.md sections 2.1-2.3 (the one-sweep factorisation of Algorithm 2,
the row-normalised field, feature scale and drift normalisation), the
numerics in section 3 and the memory bound in section 4: beyond its inputs a
call holds O((N + tile) D) accumulators and a few tiles chosen from
``memory_budget``, never an N x (P + M) array.
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
        Not the same as one call per class: ``feature_scale="auto"`` takes one
        mean over all same-class pairs, and ``drift_norm`` normalises each
        temperature's field over the whole batch, not per class (with
        ``drift_norm=False`` and a fixed ``feature_scale`` the rows equal the
        per-class calls').  Needs ``pos_labels``.
    engine : {"auto", "composed", "fused"}, optional
        How the sweeps run (default ``$DXFIELD_ENGINE`` or ``"auto"``).
        ``"composed"``: array operations (NumPy or CuPy), the reference.
        ``"fused"``: CUDA RawKernels around cuBLAS products (GPU, float32;
        see :mod:`dxfield.fused`).  ``"auto"``: fused on a GPU for float32
        inputs, composed otherwise.
    precision : {"float32", "tf32x3", "tf32"}, default "float32"
        Precision of the fused engine's matrix products (GPU only).
        ``"tf32x3"``: TF32 tensor cores with each operand split in two TF32
        parts (float32-level accuracy); ``"tf32"``: plain TF32 (about 1e-3
        relative error in the products).

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

