"""The rows a field is computed from: non-finite rows left out, extreme magnitudes brought into range.

Guards between the caller's arrays and the sweeps (docs/design.md section 3.7):

* **Non-finite rows.** ``check_finite=True`` rejects NaN/Inf with an error
  saying where.  With ``check_finite=False`` a row holding NaN or Inf is left
  out of every sum, as if it had not been passed: the other rows get the field
  computed without it, and a query row left out gets NaN.  Either way the scan
  is one min and one max per array; only when they are not finite are the rows
  tested one by one and the finite ones copied.
* **Magnitude.** :func:`dxfield.drift_field` divides every coordinate by a
  power of two (a *frame*) when the largest ``|value|`` lies outside
  ``[smallest_magnitude, largest_magnitude]`` (:mod:`dxfield.checks`): exact,
  so no ratio changes; the temperatures' unit is divided alike.  Values above
  ``max / 16`` of the dtype are refused.  :class:`dxfield.ProjectedField`
  keeps its cache in the caller's units and refuses values beyond
  ``largest_magnitude`` instead.
* **Classes** that would give rows a silent ``V = 0``: a query class
  without positives (an error); a query alone in its class with no other
  negatives (a :class:`LoneQueryWarning`: Algorithm 2 scales its attraction by
  the negatives' mass, which is then 0, so its drift is exactly 0).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import checks
from .backend import array_namespace, to_host
from .targets import check_weight_shape

_SCAN_ENTRIES = 1 << 18  # entries tested at a time when looking for the non-finite rows


def finite_rows(a) -> np.ndarray:
    """Host indices of the rows of ``a`` without NaN/Inf, tested a block of rows at a time."""
    xp = array_namespace(a)
    step = max(1, _SCAN_ENTRIES // max(1, a.shape[1]))
    good = [to_host(xp.isfinite(a[i:i + step]).all(axis=1)) for i in range(0, a.shape[0], step)]
    return np.flatnonzero(np.concatenate(good)) if good else np.zeros(0, np.int64)


def finite_part(a, name: str, check_finite: bool):
    """``(rows, keep, top)``: the finite rows of ``a``, their host indices (None: every row) and
    their largest ``|value|``.  With ``check_finite`` a NaN/Inf is an error instead."""
    with np.errstate(invalid="ignore"):
        lo, hi = checks.extent(a)
    if math.isfinite(lo) and math.isfinite(hi):
        return a, None, max(-lo, hi, 0.0)
    if check_finite:
        checks.finite(a, name)  # raises, saying how many and where
    keep = finite_rows(a)
    a = a[array_namespace(a).asarray(keep)]
    lo, hi = checks.extent(a)
    return a, keep, max(-lo, hi, 0.0)


def rows_of(a, keep):
    """``a[keep]`` for a per-row array on any device; ``a`` itself when it is None or nothing was left out."""
    if a is None or keep is None:
        return a
    return a[array_namespace(a).asarray(keep)]


def some_rows(a, name: str) -> None:
    """A target set needs at least one finite row."""
    if a.shape[0] == 0:
        raise ValueError(f"{name} has no row without NaN/Inf; check_finite=False leaves such rows out, "
                         f"and {name} needs at least one")


def expand(xp, v, n: int, keep, axis: int = 0):
    """``v`` computed for the rows ``keep`` of ``n``, put back in place: NaN on the rows left out."""
    if keep is None:
        return v
    shape = list(v.shape)
    shape[axis] = n
    out = xp.full(tuple(shape), xp.nan, dtype=v.dtype)
    index = (slice(None),) * axis + (xp.asarray(keep),)
    out[index] = v
    return out


def frame(dtype, d: int, tops: dict) -> float:
    """The power of two :func:`dxfield.drift_field` divides coordinates by: 1 when the largest
    magnitude in ``tops`` (argument name -> largest ``|value|``) is in the safe range."""
    name = max(tops, key=tops.get)
    top = tops[name]
    limit = 2.0 ** (np.finfo(dtype).maxexp - 4)  # max / 16: sums and differences stay finite
    if top > limit:
        raise checks.magnitude_error(name, top, limit, f"by drift_field in {np.dtype(dtype).name}", dtype)
    if top == 0.0 or checks.smallest_magnitude(dtype) <= top <= checks.largest_magnitude(dtype, d):
        return 1.0
    return 2.0 ** math.ceil(math.log2(top))


def divide(a, power: float):
    """``a / power`` for a power of two, exactly (``ldexp``: no factor is rounded to 0 or inf in
    the array's dtype); multiplies for ``power < 1``."""
    return array_namespace(a).ldexp(a, -round(math.log2(power)))


@dataclass
class FieldInputs:
    """The arrays of one :func:`dxfield.drift_field` call: checked, finite rows, working dtype, in the frame."""

    x: Any
    pos: Any
    neg: Any
    neg_weight: Any  # None, a float or an (M,) array
    labels: Any
    pos_labels: Any
    neg_labels: Any
    n: int  # rows of x as given
    keep: Any = None  # host indices of x's finite rows (None: all)
    frame: float = 1.0  # the coordinates here are the caller's divided by this power of two


def field_inputs(a: dict, dtype, neg_weight, check_finite: bool) -> FieldInputs:
    """Check the placed arrays ``a`` of a :func:`dxfield.drift_field` call, leave out their
    non-finite rows (``check_finite=False``) and divide them by their frame."""
    xa = checks.float_matrix(a["x"], "x", dtype, check_finite=False)
    d = xa.shape[1]
    pa = checks.float_matrix(a["pos"], "pos", dtype, dim=d, check_finite=False)
    na = None if a["neg"] is None else checks.float_matrix(a["neg"], "neg", dtype, dim=d, check_finite=False)
    qlab = checks.class_labels(a["labels"], xa.shape[0], "labels")
    plab = checks.class_labels(a["pos_labels"], pa.shape[0], "pos_labels")
    nlab = None if na is None else checks.class_labels(a["neg_labels"], na.shape[0], "neg_labels")
    weighted = neg_weight is not None and not isinstance(neg_weight, float)
    if weighted:
        check_weight_shape(neg_weight, na.shape[0])
    n = xa.shape[0]
    xa, keep, top_x = finite_part(xa, "x", check_finite)
    pa, pkeep, top_p = finite_part(pa, "pos", check_finite)
    some_rows(pa, "pos")
    tops = {"x": top_x, "pos": top_p}
    if na is not None:
        na, nkeep, tops["neg"] = finite_part(na, "neg", check_finite)
        some_rows(na, "neg")
        nlab = rows_of(nlab, nkeep)
        neg_weight = rows_of(neg_weight, nkeep) if weighted else neg_weight
    scale = frame(dtype, d, tops)
    if scale != 1.0:
        xa, pa, na = (None if v is None else divide(v, scale) for v in (xa, pa, na))
    return FieldInputs(xa, pa, na, neg_weight, rows_of(qlab, keep), rows_of(plab, pkeep), nlab, n, keep, scale)


def class_counts(xp, labels):
    """Host ``(classes, counts)`` of a labels array (None without labels): one pass, shared by the checks."""
    if labels is None:
        return None
    return tuple(to_host(a) for a in xp.unique(labels, return_counts=True))


def check_classes(xp, inp: FieldInputs, counts) -> None:
    """Refuse a :func:`dxfield.drift_field` call with a query class that has no positive: those rows
    would get no attraction (a silent ``V = 0`` under Algorithm 2).  ``counts``: :func:`class_counts`
    of the queries' labels."""
    if counts is None:
        return
    missing = np.setdiff1d(counts[0], to_host(xp.unique(inp.pos_labels)))
    if missing.size:
        raise ValueError(f"labels has queries of class(es) {missing[:10].tolist()} but pos_labels has no positive "
                         "of them, so those queries would get no attraction; pass positives of every query class")


class LoneQueryWarning(UserWarning):
    """A query has no negative at all (alone in its class, the queries its own negatives): its drift is 0."""


def warn_zero_drift(xp, n: int, counts, neg_weight, *, bidirectional: bool, self_only: bool, include_self: bool,
                    stacklevel: int = 2) -> None:
    """Warn (:class:`LoneQueryWarning`) where the bidirectional field gives an exact ``V = 0`` because a
    query has no negative mass (docs/design.md 2.1): with the queries as their only negatives
    (``self_only``), a query alone in its class (``counts``: :func:`class_counts` of the labels, or
    None) or ``n == 1``; or explicit negatives (``neg_weight``: their weights, None without explicit
    negatives) that all weigh 0 while the queries are not negatives.  ``stacklevel`` as the caller's
    own ``warnings.warn`` would give it."""
    if not bidirectional:
        return
    if self_only:
        lone = ([] if n != 1 else ["all"]) if counts is None else counts[0][counts[1] == 1].tolist()
        if lone:
            where = "x has a single row" if lone == ["all"] else f"labels has one query of class(es) {lone[:10]}"
            warnings.warn(f"{where} and no other negative, so its drift is exactly 0 (Algorithm 2 scales the "
                          "attraction by the negatives' mass); pass at least 2 queries per class, or explicit neg",
                          LoneQueryWarning, stacklevel=stacklevel + 1)
    if include_self or neg_weight is None:
        return
    total = float(neg_weight) if isinstance(neg_weight, float) else float(to_host(xp.abs(neg_weight).sum()))
    if total == 0.0:
        warnings.warn("neg_weight is 0 for every negative and the queries are not negatives (include_self=False), "
                      "so no query has any negative mass and the drift is exactly 0 everywhere (Algorithm 2 scales "
                      "the attraction by it); give some negative a weight, or include_self=True",
                      LoneQueryWarning, stacklevel=stacklevel + 1)


def check_queries(xp, inp: FieldInputs, *, bidirectional: bool, include_self: bool) -> None:
    """:func:`check_classes` and :func:`warn_zero_drift` for a :func:`dxfield.drift_field` call (the labels
    counted once)."""
    counts = class_counts(xp, inp.labels)
    check_classes(xp, inp, counts)
    warn_zero_drift(xp, inp.x.shape[0], counts, None if inp.neg is None else inp.neg_weight,
                    bidirectional=bidirectional, self_only=inp.neg is None, include_self=include_self, stacklevel=3)
