"""Small helpers shared by the test modules (data makers, conversions, error measures, peak memory,
the CLI's results)."""

import tracemalloc

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


def traced_peak(fn):
    """(result, peak bytes allocated during fn beyond what was live before it)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return out, peak - base


def describe(result):
    """A click ``CliRunner`` result as text: exit code, output and the traceback of its exception."""
    exc = result.exception
    tb = ""
    if exc is not None and not isinstance(exc, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"exit {result.exit_code}\n--- output ---\n{result.output}\n{tb}"


def assert_refused(result, *needles):
    """Exit 1 through a click error: one ``Error:`` line, no traceback, naming each needle."""
    assert result.exit_code == 1, describe(result)
    assert isinstance(result.exception, SystemExit), describe(result)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])
    return errors[0]


def spy_stacked(monkeypatch) -> list:
    """Count the labelled ``drift_field`` calls that stack their classes (docs/design.md 2.10): a list that
    gets one entry per :class:`dxfield.perclass.StackedSums` made."""
    import dxfield.field as field

    calls, real = [], field.StackedSums

    class Spy(real):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(field, "StackedSums", Spy)
    return calls
