"""The exact drifting field, :func:`drift_field`: Algorithm 2 or the mean shift, in bounded memory.

Checks the call's arguments, builds the targets (positives, the queries as
negatives with self pairs masked, explicit weighted negatives), measures the
feature scale, and runs one :class:`dxfield.sweep.ExactSums` (or, for a
class-conditional call, :class:`dxfield.perclass.StackedSums` with its classes
stacked, section 2.10) whose sums :func:`dxfield.sums.combine` turns into the
field.  The math is in
docs/design.md sections 2.1-2.3 (the one-sweep factorisation of Algorithm 2,
the row-normalised field, feature scale and drift normalisation), the
numerics in section 3 and the memory bound in section 4: beyond its inputs a
call holds O((N + tile) D) accumulators and a few tiles chosen from
``memory_budget``, never an N x (P + M) array (the stacked classes: a block of
their own pairs, when it fits the budget).  :mod:`dxfield.inputs` leaves
non-finite rows out (``check_finite=False``) and brings extreme magnitudes
into range first (section 3.7).
"""

from __future__ import annotations

import math
from numbers import Real

from . import checks
from .backend import device_context, floating_dtype, place
from .engine import resolve as resolve_engine
from .inputs import check_queries, divide, expand, field_inputs
from .kernels import check_kernel, logit_coefs
from .memory import parse_budget, tile_cap
from .options import documented
from .perclass import StackedSums, stack_plan
from .sums import combine
from .sweep import ExactSums
from .targets import Targets, negative_runs

NORMALIZATIONS = ("bidirectional", "row")
# On the CPU the sweep's elementwise passes stream from memory whatever the tile size, while
# each tile costs a fixed update of the N x D accumulators: tiles larger than the generic
# cache-sized cap pay off (measured: 2^19 entries, 1024 x 512 at the benchmark's shape).
_CPU_TILE = 1 << 19
DEFAULT_TEMPERATURES = (0.02, 0.05, 0.2)
STACK_CLASSES = True  # labelled calls: the classes stacked where stack_plan allows (False: the masked sweep)


def exact_tile_cap(device) -> int:
    """Largest exact-sweep tile (entries) worth using on ``device``."""
    return max(tile_cap(device), _CPU_TILE) if device.kind == "cpu" else tile_cap(device)


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


def _check_labels(labels, pos_labels, neg_labels, neg) -> None:
    """The class-label arguments of :func:`drift_field` come in the combinations that mean something."""
    if labels is not None and pos_labels is None:
        raise ValueError("labels (of the queries) needs pos_labels (of the positives) too")
    if labels is None and (pos_labels is not None or neg_labels is not None):
        raise ValueError("pos_labels/neg_labels need labels (of the queries) too")
    if neg_labels is not None and neg is None:
        raise ValueError("neg_labels labels the explicit negatives: pass neg as well")


def _logit_coefs(sweeper: ExactSums, scale_arg, frame: float, kernel: str, temps):
    """``(S, coefs)``: the feature scale in the caller's units (None: unscaled) and the logit
    coefficient of each temperature for the coordinates the sweeper holds (the caller's / ``frame``).

    "auto": ``S = mean distance / sqrt(D)``; a number: as given; None: raw ``tau``.
    """
    root_d = math.sqrt(sweeper.d)
    if scale_arg == "auto":
        mean_d = sweeper.mean_distance()
        s = mean_d / root_d if mean_d > 0 and math.isfinite(mean_d) else 1.0
        scale, unit = s * frame, s * root_d
    else:
        scale = None if scale_arg is None else float(scale_arg)
        unit = (1.0 if scale is None else scale * root_d) / frame  # the temperatures' distance unit
    return scale, logit_coefs(kernel, [tau * unit for tau in temps], sweeper.dtype, min(temps) * unit * frame)


def _sweeper(xp, inp, *, temps, kernel, bidirectional, include_self, dtype, budget, block, device, ops, precision):
    """The engine of a call's sums: its classes stacked in one block where :func:`stack_plan` allows
    (docs/design.md 2.10), else one sweep over every pair (other classes' pairs masked)."""
    plan = stack_plan(inp, include_self=include_self, ops=ops, budget=budget,
                      n_temps=len(temps)) if STACK_CLASSES else None
    if plan is not None:
        return StackedSums(xp, inp, plan, kernel=kernel, bidirectional=bidirectional, dtype=dtype)
    targets = [Targets(inp.pos, False, labels=inp.pos_labels)] + negative_runs(
        xp, inp.x, inp.neg, inp.neg_weight, include_self=include_self, dtype=dtype, check_finite=False,
        query_labels=inp.labels, neg_labels=inp.neg_labels)
    # One engine for both sweeps: its plan is checked against the budget before any work,
    # and the mean-distance sweep reuses its centred queries and tile shape.
    return ExactSums(xp, inp.x, targets, n_temperatures=len(temps), kernel=kernel, bidirectional=bidirectional,
                     budget=budget, block_size=block, tile_cap=exact_tile_cap(device), query_labels=inp.labels,
                     ops=ops, precision=precision)


def _in_units(v, scale, frame: float, scale_arg):
    """The field without drift normalisation, computed in the frame, in units of ``S`` (raw when unscaled)."""
    if scale is None:
        return v if frame == 1.0 else divide(v, 1.0 / frame)
    v /= scale / frame
    if scale_arg != "auto" and not all(math.isfinite(e) for e in checks.extent(v)):
        raise ValueError(f"the field in units of feature_scale={scale:g} overflows {v.dtype}: pass a larger "
                         "feature_scale, drift_norm=True, or float64 inputs")
    return v


@documented("temperatures", "normalization", "kernel", "feature_scale", "drift_norm", "neg_weight", "include_self",
            "return_scale", "memory_budget", "block_size", "backend", "field.check_finite", "labels", "engine", "precision")
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
    {options}

    Returns
    -------
    V : array (N, D), in the namespace and on the device of the inputs
        (NumPy for CPU inputs, CuPy for GPU inputs); float64 if any input is
        float64, else float32.  With ``return_scale``, ``(V, S)``.  Exact, in
        O(N (N + P + M) D) flops shared by all temperatures, and memory
        bounded by ``memory_budget`` beyond the inputs.

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
    scale_arg = checks.feature_scale(feature_scale)
    _check_labels(labels, pos_labels, neg_labels, neg)
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
        inp = field_inputs(a, dtype, a["neg_weight"] if weights_is_array else neg_weight, check_finite)
        if inp.x.shape[0] == 0:  # no finite query (check_finite=False): every row is NaN
            v = placement.to_origin(expand(xp, xp.empty((0, inp.pos.shape[1]), dtype=dtype), inp.n, inp.keep))
            return (v, math.nan) if return_scale else v
        check_queries(xp, inp, bidirectional=normalization == "bidirectional", include_self=include_self)
        ops = resolve_engine(engine, precision, placement, dtype, len(temps))
        sweeper = _sweeper(xp, inp, temps=temps, kernel=kernel, bidirectional=normalization == "bidirectional",
                           include_self=include_self, dtype=dtype, budget=budget, block=block,
                           device=placement.device, ops=ops, precision=precision)
        scale, coefs = _logit_coefs(sweeper, scale_arg, inp.frame, kernel, temps)
        sums, row_lse = sweeper.sweep(coefs)
        v = combine(xp, sums, row_lse, drift_norm=drift_norm, xc=sweeper.xc)
        del sweeper
        if not drift_norm:
            v = _in_units(v, scale, inp.frame, scale_arg)
        v = placement.to_origin(expand(xp, v, inp.n, inp.keep))
        return (v, scale) if return_scale else v
