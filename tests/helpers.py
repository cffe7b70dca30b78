"""Small helpers shared by the test modules (data makers, conversions, error measures)."""

import numpy as np


def to_numpy(a):
    """A NumPy copy/view of a NumPy or CuPy array."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


def namespace_of(a):
    """'numpy' or 'cupy', from the array's type."""
    return type(a).__module__.split(".")[0]


def rel_err(v, ref):
    """max |v - ref| / max |ref| (both taken to float64 NumPy)."""
    v = np.asarray(to_numpy(v), np.float64)
    ref = np.asarray(to_numpy(ref), np.float64)
    assert v.shape == ref.shape, (v.shape, ref.shape)
    scale = np.abs(ref).max()
    assert scale > 0, "reference is identically zero: the comparison would be meaningless"
    return float(np.abs(v - ref).max() / scale)


def make_points(rng, n, p, d, m=None, *, spread=1.0, shift=0.7):
    """Queries around 0, positives shifted by ``shift``, optional negatives shifted the other way."""
    x = rng.normal(size=(n, d)) * spread
    pos = rng.normal(size=(p, d)) * spread + shift
    if m is None:
        return x, pos
    neg = rng.normal(size=(m, d)) * spread - shift
    return x, pos, neg
