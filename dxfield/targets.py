"""Targets of the exact sweep: runs of positives or negatives, and the tiles they are cut into.

A run is one kind of target (the positives, the queries as negatives, explicit
negatives, each with optional log-weights and class labels); the sweep cuts
each run into tiles of the memory plan's width (docs/design.md section 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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

