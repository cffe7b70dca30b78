"""Targets of the exact sweep: runs of positives or negatives, and the tiles they are cut into.

A run is one kind of target (the positives, the queries as negatives, explicit
negatives, each with optional log-weights and class labels); the sweep cuts
each run into tiles of the memory plan's width (docs/design.md section 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import checks
from .backend import to_host
from .sums import quiet

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


@dataclass
class TargetTile:
    """A tile of targets as the sweep uses it."""

    ya: Any  # (bt, D + 2) augmented, [-2 yc | 1 | yy] (:func:`augmented_targets`)
    yy: Any  # (bt,) squared norms of the centred targets yc
    j0: int  # index of its first target in its run
    run: Targets
    log_weight: Any  # (bt,) float64 or None
    labels: Any  # (bt,) or None
    y_unit: float  # the products take ym2 / y_unit (:func:`y_unit`)
    y_top: float  # max |yc_j| (an upper bound of the coordinates)
    weightless: Any = None  # indices of the targets of weight 0, or None

    @property
    def n(self) -> int:
        return int(self.ya.shape[0])

    @property
    def ym2(self):
        """``-2 yc`` (bt x D), a view of ``ya``."""
        return self.ya[:, :-2]

    @property
    def y_scale(self) -> float:
        """Sums over ``ym2 / y_unit`` times this are sums over ``yc``."""
        return -0.5 * self.y_unit


def part(a, cols):
    """``a[cols]``, or None for an absent per-target array."""
    return None if a is None else a[cols]


def side_of(t: Targets) -> int:
    """0 for positives, 1 for negatives."""
    return 1 if t.negative else 0


def y_unit(top: float) -> float:
    """A power of two >= ``top`` (at most 1): small targets are scaled up to it in the products."""
    return 2.0 ** min(0, math.ceil(math.log2(top))) if 0.0 < top < math.inf else 1.0


def check_weight_shape(w, m: int) -> None:
    """An array of negative weights has one entry per negative: shape ``(m,)``."""
    if w.ndim != 1 or w.shape[0] != m:
        raise ValueError(f"neg_weight must be a number or an array of shape ({m},) (one per negative), "
                         f"got shape {tuple(w.shape)}")


def log_weights(xp, neg_weight, m: int, dtype, check_finite: bool):
    """Log of per-negative weights: scalar or (M,), each finite and >= 0."""
    if isinstance(neg_weight, float):
        w = xp.full(m, neg_weight, dtype=dtype)
    else:
        w = neg_weight
        check_weight_shape(w, m)
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


def negative_runs(xp, xa, neg, neg_weight, *, include_self: bool, dtype, check_finite: bool, query_labels=None,
                  neg_labels=None) -> list:
    """The negatives' runs: the queries themselves (self pairs masked) and/or explicit negatives ``neg``
    (checked, in ``dtype``) with their weights (a float, an array or None) and labels."""
    runs = []
    if include_self:
        runs.append(Targets(xa, True, is_queries=True, labels=query_labels))
    if neg is not None:
        na = checks.float_matrix(neg, "neg", dtype, dim=xa.shape[1], check_finite=check_finite)
        logw = None if neg_weight is None else log_weights(xp, neg_weight, na.shape[0], dtype, check_finite)
        runs.append(Targets(na, True, log_weight=logw,
                            labels=checks.class_labels(neg_labels, na.shape[0], "neg_labels")))
    return runs
