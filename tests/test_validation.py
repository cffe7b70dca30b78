"""Argument validation: bad calls fail early with ValueError/TypeError naming the argument.

Covers non-finite inputs, shapes (1-D, 3-D, empty, mismatched feature
dimensions), dtypes (complex, strings), temperatures, ``normalization``,
``kernel``, ``feature_scale``, ``neg_weight``, ``include_self``,
``memory_budget`` (argument and ``$DXFIELD_MEMORY_BUDGET``), ``block_size``,
and the same checks on the kernel helpers.  Each case matches the message
against the argument's name so that a user can tell what to fix.
"""

import numpy as np
import pytest

import dxfield

N, P, M, D = 6, 7, 5, 3
_rng = np.random.default_rng(0)
X = _rng.normal(size=(N, D))
POS = _rng.normal(size=(P, D)) + 1
NEG = _rng.normal(size=(M, D)) - 1


def _with(a, index, value):
    a = a.copy()
    a[index] = value
    return a


def field(**overrides):
    """drift_field on valid data, with some arguments replaced."""
    args = dict(x=X, pos=POS, neg=None)
    kwargs = {k: v for k, v in overrides.items() if k not in args}
    args.update({k: v for k, v in overrides.items() if k in args})
    return lambda: dxfield.drift_field(args["x"], args["pos"], args["neg"], **kwargs)


DRIFT_FIELD_CASES = [
    # non-finite inputs
    ("nan-in-x", field(x=_with(X, (2, 1), np.nan)), ValueError, r"^x contains 1 NaN"),
    ("inf-in-x", field(x=_with(X, (0, 0), np.inf)), ValueError, r"^x contains"),
    ("nan-in-pos", field(pos=_with(POS, (3, 2), np.nan)), ValueError, r"^pos contains"),
    ("-inf-in-pos", field(pos=_with(POS, (0, 1), -np.inf)), ValueError, r"^pos contains"),
    ("nan-in-neg", field(neg=_with(NEG, (4, 0), np.nan)), ValueError, r"^neg contains"),
    ("inf-in-neg", field(neg=_with(NEG, (1, 1), np.inf)), ValueError, r"^neg contains"),
    ("nan-in-float32-x", field(x=_with(X, (2, 1), np.nan).astype(np.float32)), ValueError, r"^x contains"),
    # shapes
    ("pos-feature-dim", field(pos=POS[:, :2]), ValueError, r"^pos has 2 features"),
    ("neg-feature-dim", field(neg=np.ones((M, D + 1))), ValueError, r"^neg has 4 features"),
    ("1d-x", field(x=X[0]), ValueError, r"^x must be a 2-D"),
    ("1d-pos", field(pos=POS[:, 0]), ValueError, r"^pos must be a 2-D"),
    ("3d-x", field(x=X[None]), ValueError, r"^x must be a 2-D"),
    ("3d-neg", field(neg=NEG[None]), ValueError, r"^neg must be a 2-D"),
    ("scalar-pos", field(pos=1.0), ValueError, r"^pos must be a 2-D"),
    ("empty-x", field(x=np.empty((0, D))), ValueError, r"^x must have at least 1 row"),
    ("empty-pos", field(pos=np.empty((0, D))), ValueError, r"^pos must have at least 1 row"),
    ("empty-neg", field(neg=np.empty((0, D))), ValueError, r"^neg must have at least 1 row"),
    ("no-feature-columns", field(x=np.empty((N, 0)), pos=np.empty((P, 0))), ValueError, r"^x must have at least one"),
    # dtypes
    ("complex-x", field(x=X.astype(complex)), TypeError, r"^x must hold real numbers"),
    ("complex-pos", field(pos=POS.astype(np.complex64)), TypeError, r"^pos must hold real numbers"),
    ("string-pos", field(pos=[["a", "b", "c"]]), TypeError, r"^pos must hold real numbers"),
    ("object-neg", field(neg=np.array([[object()] * D])), TypeError, r"^neg must hold real numbers"),
    # temperatures
    ("zero-temperature", field(temperatures=0.0), ValueError, r"temperatures"),
    ("negative-temperature", field(temperatures=(0.05, -0.2)), ValueError, r"temperatures\[1\]"),
    ("nan-temperature", field(temperatures=float("nan")), ValueError, r"temperatures"),
    ("inf-temperature", field(temperatures=(float("inf"),)), ValueError, r"temperatures"),
    ("empty-temperatures", field(temperatures=()), ValueError, r"temperatures"),
    ("empty-temperature-array", field(temperatures=np.array([])), ValueError, r"temperatures"),
    ("text-temperature", field(temperatures=["warm"]), TypeError, r"temperatures"),
    ("none-temperature", field(temperatures=None), TypeError, r"temperatures"),
    # choices
    ("unknown-normalization", field(normalization="column"), ValueError, r"normalization='column'"),
    ("normalization-none", field(normalization=None), ValueError, r"normalization"),
    ("unknown-kernel", field(kernel="cauchy"), ValueError, r"kernel='cauchy'"),
    ("kernel-wrong-case", field(kernel="Laplace"), ValueError, r"kernel"),
    # feature scale
    ("zero-feature-scale", field(feature_scale=0.0), ValueError, r"feature_scale"),
    ("negative-feature-scale", field(feature_scale=-2), ValueError, r"feature_scale"),
    ("nan-feature-scale", field(feature_scale=float("nan")), ValueError, r"feature_scale"),
    ("inf-feature-scale", field(feature_scale=float("inf")), ValueError, r"feature_scale"),
    ("bad-feature-scale-string", field(feature_scale="mean"), ValueError, r"feature_scale='mean'"),
    ("feature-scale-list", field(feature_scale=[1.0]), TypeError, r"feature_scale"),
    # negatives and weights
    ("weight-without-neg", field(neg_weight=2.0), ValueError, r"neg_weight"),
    ("weight-array-without-neg", field(neg_weight=np.ones(M)), ValueError, r"neg_weight"),
    ("weight-too-short", field(neg=NEG, neg_weight=np.ones(M - 1)), ValueError, r"neg_weight"),
    ("weight-too-long", field(neg=NEG, neg_weight=np.ones(M + 1)), ValueError, r"neg_weight"),
    ("weight-2d", field(neg=NEG, neg_weight=np.ones((M, 1))), ValueError, r"neg_weight"),
    ("negative-scalar-weight", field(neg=NEG, neg_weight=-1.0), ValueError, r"neg_weight"),
    ("negative-array-weight", field(neg=NEG, neg_weight=_with(np.ones(M), 3, -0.5)), ValueError,
     r"neg_weight\[3\]"),
    ("nan-weight", field(neg=NEG, neg_weight=_with(np.ones(M), 1, np.nan)), ValueError, r"neg_weight"),
    ("inf-scalar-weight", field(neg=NEG, neg_weight=float("inf")), ValueError, r"neg_weight"),
    ("complex-weight", field(neg=NEG, neg_weight=np.ones(M, complex)), TypeError, r"neg_weight"),
    ("no-self-and-no-neg", field(include_self=False), ValueError, r"include_self"),
    # memory budget and tiles
    ("budget-word", field(memory_budget="lots"), ValueError, r"memory_budget='lots'"),
    ("budget-unit", field(memory_budget="64 parsecs"), ValueError, r"memory_budget"),
    ("budget-negative-string", field(memory_budget="-5MiB"), ValueError, r"memory_budget"),
    ("budget-zero-string", field(memory_budget="0"), ValueError, r"memory_budget"),
    ("budget-empty-string", field(memory_budget=""), ValueError, r"memory_budget"),
    ("budget-zero", field(memory_budget=0), ValueError, r"memory_budget"),
    ("budget-negative", field(memory_budget=-1), ValueError, r"memory_budget"),
    ("budget-nan", field(memory_budget=float("nan")), ValueError, r"memory_budget"),
    ("budget-bool", field(memory_budget=True), TypeError, r"memory_budget"),
    ("budget-list", field(memory_budget=[64]), TypeError, r"memory_budget"),
    ("block-zero", field(block_size=(0, 5)), ValueError, r"block_size"),
    ("block-one-number", field(block_size=(3,)), TypeError, r"block_size"),
    ("block-word", field(block_size="big"), TypeError, r"block_size"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in DRIFT_FIELD_CASES],
                         ids=[c[0] for c in DRIFT_FIELD_CASES])
def test_drift_field_rejects_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_valid_baseline_call_succeeds():
    """The cases above each change one argument of this call, which must itself work."""
    v = field()()
    assert v.shape == (N, D) and np.isfinite(v).all()
    assert np.isfinite(field(neg=NEG, neg_weight=np.ones(M), include_self=True)()).all()


def test_memory_budget_strings_are_accepted():
    for budget in ["64MiB", "512MB", "1.5GB", "2GiB", "1000000", " 8 mib ", 10**7, 10**7 + 0.5]:
        assert field(memory_budget=budget)().shape == (N, D)


def test_memory_budget_units_up_to_pebibytes():
    from dxfield.memory import parse_budget

    assert parse_budget("1000TiB") == 1000 * 2**40 and parse_budget("2 TB") == 2 * 10**12
    assert parse_budget("1PiB") == 2**50 and parse_budget("3pb") == 3 * 10**15
    assert field(memory_budget="1000TiB")().shape == (N, D)
    with pytest.raises(ValueError, match=r"memory_budget='3 EiB' is not a size.*TiB"):
        parse_budget("3 EiB")


def test_bad_budget_in_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("DXFIELD_MEMORY_BUDGET", "plenty")
    with pytest.raises(ValueError, match="DXFIELD_MEMORY_BUDGET"):
        field()()
    with pytest.raises(ValueError, match="DXFIELD_MEMORY_BUDGET"):
        dxfield.kernel_matvec(X, POS, np.ones(P))


def test_check_finite_false_skips_the_scan():
    """With check_finite=False a NaN is the caller's business: no exception."""
    v = dxfield.drift_field(_with(X, (0, 0), np.nan), POS, check_finite=False)
    assert v.shape == (N, D)


@pytest.mark.parametrize("weight", [np.float32(2.0), np.int64(2), np.array(2.0), 2, 2.0])
def test_numpy_scalar_weight_is_a_scalar_weight(weight):
    """NumPy scalars and 0-d arrays are numbers too (regression: once rejected with 'got shape ()')."""
    v = dxfield.drift_field(X, POS, NEG, neg_weight=weight)
    np.testing.assert_allclose(v, dxfield.drift_field(X, POS, NEG, neg_weight=2.0), rtol=1e-12)


KERNEL_CASES = [
    ("matvec-w-length", lambda: dxfield.kernel_matvec(X, POS, np.ones(P + 1)), ValueError, r"^w must have shape"),
    ("matvec-w-3d", lambda: dxfield.kernel_matvec(X, POS, np.ones((P, 2, 2))), ValueError, r"^w must have shape"),
    ("matvec-nan-w", lambda: dxfield.kernel_matvec(X, POS, _with(np.ones(P), 2, np.nan)), ValueError, r"^w contains"),
    ("matvec-nan-y", lambda: dxfield.kernel_matvec(X, _with(POS, (0, 0), np.nan), np.ones(P)), ValueError,
     r"^y contains"),
    ("matvec-y-dim", lambda: dxfield.kernel_matvec(X, POS[:, :2], np.ones(P)), ValueError, r"^y has 2 features"),
    ("matvec-tau-zero", lambda: dxfield.kernel_matvec(X, POS, np.ones(P), tau=0), ValueError, r"tau"),
    ("matvec-tau-nan", lambda: dxfield.kernel_matvec(X, POS, np.ones(P), tau=float("nan")), ValueError, r"tau"),
    ("matvec-kernel", lambda: dxfield.kernel_matvec(X, POS, np.ones(P), kernel="rbf"), ValueError, r"kernel='rbf'"),
    ("matvec-budget", lambda: dxfield.kernel_matvec(X, POS, np.ones(P), memory_budget="huge"), ValueError,
     r"memory_budget"),
    ("matvec-block", lambda: dxfield.kernel_matvec(X, POS, np.ones(P), block_size=(2, -1)), ValueError,
     r"block_size"),
    ("matrix-tau-negative", lambda: dxfield.kernel_matrix(X, tau=-1.0), ValueError, r"tau"),
    ("matrix-kernel", lambda: dxfield.kernel_matrix(X, kernel="linear"), ValueError, r"kernel"),
    ("matrix-y-dim", lambda: dxfield.kernel_matrix(X, POS[:, :1]), ValueError, r"^y has 1 features"),
    ("distances-1d", lambda: dxfield.pairwise_distances(X[0]), ValueError, r"^x must be a 2-D"),
    ("distances-y-dim", lambda: dxfield.pairwise_distances(X, np.ones((2, D + 2))), ValueError, r"^y has"),
    ("distances-inf", lambda: dxfield.pairwise_distances(_with(X, (1, 1), np.inf)), ValueError, r"^x contains"),
    ("distances-complex", lambda: dxfield.pairwise_distances(X, POS.astype(complex)), TypeError, r"^y must hold"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in KERNEL_CASES], ids=[c[0] for c in KERNEL_CASES])
def test_kernel_helpers_reject_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_a_kernel_too_short_for_the_dtype_fails_before_any_work_in_the_projected_field():
    """Temperatures whose logits overflow the working dtype: the projected field's build says so (as
    drift_field does), instead of a NaN field at the first call."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kernel length .* too short for float32"):
        dxfield.ProjectedField.build(rng.standard_normal((50, 3)).astype(np.float32), temperatures=1e-300,
                                     landmarks=8)
