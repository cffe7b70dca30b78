"""Argument checks shared by the public functions.

Every error names the argument, the offending value and what would be valid,
so a user can fix the call without reading our source.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Iterable

import numpy as np

from .backend import array_namespace, to_host


def _describe_dtype(a: Any) -> str:
    return str(getattr(a, "dtype", type(a).__name__))


def matrix(a: Any, name: str, *, dim: int | None = None, check_finite: bool = True, min_rows: int = 1,
           dim_of: str = "x has {dim}"):
    """Check that ``a`` is a 2-D real numeric array with at least ``min_rows`` rows.

    ``dim``: the number of features per row expected; ``dim_of`` says where it
    comes from in the error (``{dim}`` is filled in), e.g. ``"x has {dim}"``.
    """
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n x D), got shape {tuple(a.shape)}")
    kind = np.dtype(a.dtype).kind if not hasattr(a.dtype, "kind") else a.dtype.kind
    if kind not in "fiub":
        raise TypeError(f"{name} must hold real numbers (float or integer), got dtype {_describe_dtype(a)}")
    n, d = a.shape
    if n < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} row(s), got shape {tuple(a.shape)}")
    if d < 1:
        raise ValueError(f"{name} must have at least one feature column, got shape {tuple(a.shape)}")
    if dim is not None and d != dim:
        raise ValueError(f"{name} has {d} features per row, but {dim_of.format(dim=dim)}; "
                         f"pass {dim} features per row")
    if check_finite and kind == "f":
        finite(a, name)
    return a


def float_matrix(a: Any, name: str, dtype, *, dim: int | None = None, check_finite: bool = True, min_rows: int = 1,
                 dim_of: str = "x has {dim}"):
    """:func:`matrix` checks, then ``a`` cast to the working ``dtype`` (no copy when it already is)."""
    return matrix(a, name, dim=dim, check_finite=check_finite, min_rows=min_rows,
                  dim_of=dim_of).astype(dtype, copy=False)


def finite(a: Any, name: str) -> None:
    """Raise ValueError when ``a`` holds NaN or Inf, saying how many and where the first is.

    The common (clean) case costs two reductions and no temporary: min and max
    are finite exactly when every entry is.
    """
    if a.dtype.kind != "f" or a.size == 0:
        return
    if math.isfinite(float(a.min())) and math.isfinite(float(a.max())):
        return
    bad = ~array_namespace(a).isfinite(a)
    count = int(bad.sum())
    first = tuple(int(i) for i in np.argwhere(to_host(bad))[0])
    raise ValueError(f"{name} contains {count} NaN/Inf value(s), first at index {first}; inputs must be finite")


def extent(a: Any) -> tuple[float, float]:
    """``(min, max)`` of a float array (NaN when it holds a NaN), with one device-to-host transfer."""
    if a.size == 0:
        return 0.0, 0.0
    xp = array_namespace(a)
    if xp is np:
        return float(a.min()), float(a.max())
    lo, hi = to_host(xp.stack([a.min(), a.max()])).tolist()
    return float(lo), float(hi)


def largest_magnitude(dtype, d: int) -> float:
    """The largest ``|value|`` whose squared distances stay far from overflow in ``dtype``.

    Centred on a mean or a cache centre, coordinates are at most twice this,
    so ``|x|^2 + |y|^2 - 2 x.y`` over ``d`` features stays below ``max / 4``:
    the power of two at most ``sqrt(max / (64 d))`` (about 1e17 in float32
    and 1e152 in float64 at D = 64).
    """
    fmax = float(np.finfo(dtype).max)
    return 2.0 ** math.floor(math.log2(math.sqrt(fmax / (64.0 * max(int(d), 1)))))


def smallest_magnitude(dtype) -> float:
    """Below this ``|value|`` (about 1e-12 in float32, 1e-138 in float64) the squared distance of
    two neighbouring values, ``(eps |x|)^2``, is no longer a normal number."""
    fi = np.finfo(dtype)
    return 2.0 ** math.ceil(math.log2(math.sqrt(float(fi.tiny)) / float(fi.eps)))


def magnitude_error(name: str, top: float, limit: float, where: str, dtype) -> ValueError:
    """The error for values beyond what is supported ``where``: names ``name``, its largest magnitude
    and the limit."""
    more = "" if np.dtype(dtype) == np.float64 else ", or pass float64 features"
    return ValueError(f"{name} holds values up to {top:.3g} in magnitude, but the largest magnitude supported "
                      f"{where} is {limit:.3g}: divide the features by a constant{more}")


def non_negative(value: Any, name: str) -> float:
    """A finite float >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def feature_scale(value: Any):
    """``"auto"``, None, or a float > 0."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, str):
        raise ValueError(f"feature_scale={value!r} is not valid; use 'auto', a number > 0, or None")
    return positive_float(value, "feature_scale")


def positive_float(value: Any, name: str) -> float:
    """A finite float > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def temperatures(value: Any, name: str = "temperatures") -> tuple[float, ...]:
    """One temperature or a non-empty sequence of them, each finite and > 0."""
    if isinstance(value, Real):
        items: Iterable[Any] = (value,)
    else:
        try:
            items = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be a number or a sequence of numbers, got {value!r}") from None
    out = []
    for i, t in enumerate(items):
        out.append(positive_float(t, f"{name}[{i}]" if len(tuple(items)) > 1 else name))
    if not out:
        raise ValueError(f"{name} must hold at least one temperature, got {value!r}")
    return tuple(out)


def choice(value: Any, name: str, valid: Iterable[str]) -> str:
    valid = tuple(valid)
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")
    return value


def class_labels(lab: Any, n: int, name: str = "labels", what: str = "one per row"):
    """Integer class labels of shape ``(n,)`` as int64 (same namespace), or None when ``lab`` is None."""
    if lab is None:
        return None
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), {what}, got {tuple(lab.shape)}")
    if lab.dtype.kind not in "iub":
        raise TypeError(f"{name} must hold integer class labels, got dtype {lab.dtype}")
    return lab.astype("int64", copy=False)


def block_size(value: Any) -> tuple[int, int] | None:
    """``None`` or a pair (query rows, target rows) of positive ints."""
    if value is None:
        return None
    try:
        bq, bt = value
        bq, bt = int(bq), int(bt)
    except (TypeError, ValueError):
        raise TypeError(f"block_size must be None or a pair of ints (query rows, target rows), got {value!r}") from None
    if bq < 1 or bt < 1:
        raise ValueError(f"block_size entries must be >= 1, got {value!r}")
    return bq, bt
