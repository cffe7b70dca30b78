"""``dxfield.drift_field`` against the dense float64 reference (tests/reference.py).

Checks docs/design.md section 2.1-2.3 value by value: both normalisations (bidirectional,
row), the paper's normalisations on and off (feature scale auto / None / a
number, drift normalisation on / off), one and several temperatures, Laplace
and Gaussian kernels, explicit, weighted (scalar and per-negative) negatives
and ``include_self``, the returned feature scale, the dtype rules, and the
small-temperature regime where a naive ``exp`` under- or overflows.  The core
comparisons run over the ``xp`` fixture (NumPy, and CuPy when a GPU is
usable) and check that the result comes back in the input's namespace.

Accuracy contract: float64 inputs agree with the reference to ~1e-10;
float32 inputs to a relative max error ``max|V - Vref| / max|Vref|`` of 1e-4.
"""

import itertools

import numpy as np
import pytest

import dxfield
import reference as ref
from helpers import make_points, namespace_of, rel_err, to_numpy

N, P, M, D = 24, 40, 16, 5
TEMPS = {"one": (0.05,), "three": (0.02, 0.05, 0.2)}
# With feature_scale=None the temperatures are in raw distance units; the data
# below has mean pairwise distance ~3.5, so scale them to keep logits moderate.
RAW_UNIT = 3.5
RTOL64 = 1e-10
RTOL32 = 1e-4

CONFIGS = list(itertools.product(
    ["bidirectional", "row"], ["laplace", "gaussian"], ["auto", None, 2.0], [True, False], sorted(TEMPS),
))


def _temps(name, feature_scale):
    temps = TEMPS[name]
    return tuple(t * RAW_UNIT for t in temps) if feature_scale is None else temps


def _ids(c):
    norm, kernel, fs, dn, temps = c
    return f"{norm}-{kernel}-fs={fs}-{'dn' if dn else 'raw'}-{temps}"


@pytest.fixture(scope="module")
def data():
    return make_points(np.random.default_rng(7), N, P, D, M)


def _run(xp, dtype, x, pos, neg=None, **kw):
    conv = lambda a: None if a is None else xp.asarray(np.asarray(a, dtype))  # noqa: E731
    out = dxfield.drift_field(conv(x), conv(pos), conv(neg), **kw)
    v = out[0] if isinstance(out, tuple) else out
    assert namespace_of(v) == xp.__name__, "the result must come back in the input's namespace"
    assert v.dtype == np.dtype(dtype if dtype == np.float64 else np.float32)
    assert v.shape == (len(x), x.shape[1])
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_default_negatives_match_reference(xp, data, config, dtype):
    norm, kernel, fs, dn, temps = config
    x, pos, _ = data
    kw = dict(temperatures=_temps(temps, fs), normalization=norm, kernel=kernel, feature_scale=fs, drift_norm=dn)
    v = _run(xp, dtype, x, pos, **kw)
    xr, pr = (np.asarray(a, dtype) for a in (x, pos))  # the reference sees the same (rounded) inputs
    vref, _ = ref.field(xr, pr, **kw)
    assert np.isfinite(to_numpy(v)).all()
    assert rel_err(v, vref) <= (RTOL64 if dtype == np.float64 else RTOL32)


NEG_CASES = {
    "explicit": dict(),
    "explicit+self": dict(include_self=True),
    "scalar-weight": dict(neg_weight=2.5),
    "array-weight": dict(neg_weight="array"),
    "array-weight+self": dict(neg_weight="array", include_self=True),
    "integer-weight+self": dict(neg_weight=3, include_self=True),
}


@pytest.mark.parametrize("case", sorted(NEG_CASES))
@pytest.mark.parametrize("norm", ["bidirectional", "row"])
@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_explicit_and_weighted_negatives_match_reference(xp, data, case, norm, kernel, dtype):
    x, pos, neg = data
    kw = dict(NEG_CASES[case])
    if isinstance(kw.get("neg_weight"), str):
        kw["neg_weight"] = np.random.default_rng(3).uniform(0.2, 4.0, size=M)
    kw.update(normalization=norm, kernel=kernel, temperatures=TEMPS["three"])
    call_kw = dict(kw)
    if isinstance(call_kw.get("neg_weight"), np.ndarray):
        call_kw["neg_weight"] = xp.asarray(call_kw["neg_weight"])
    v = _run(xp, dtype, x, pos, neg, **call_kw)
    xr, pr, nr = (np.asarray(a, dtype) for a in (x, pos, neg))
    vref, _ = ref.field(xr, pr, nr, **kw)
    assert rel_err(v, vref) <= (RTOL64 if dtype == np.float64 else RTOL32)


@pytest.mark.parametrize("norm", ["bidirectional", "row"])
def test_weights_change_the_field(data, norm):
    """Guards the weighted tests above: weights must actually matter."""
    x, pos, neg = data
    v1 = dxfield.drift_field(x, pos, neg, normalization=norm, include_self=True)
    v2 = dxfield.drift_field(x, pos, neg, normalization=norm, include_self=True, neg_weight=4.0)
    assert rel_err(v2, v1) > 1e-3


@pytest.mark.parametrize("fs", ["auto", None, 1.7])
@pytest.mark.parametrize("neg_case", ["self", "explicit", "explicit+self"])
def test_return_scale_equals_reference_scale(xp, data, fs, neg_case):
    x, pos, neg = data
    kw = dict(feature_scale=fs)
    if neg_case != "self":
        kw["neg"] = neg
        kw["include_self"] = neg_case == "explicit+self"
    conv = lambda a: xp.asarray(a)  # noqa: E731
    call = dict(kw, neg=conv(kw["neg"])) if "neg" in kw else kw
    v, s = dxfield.drift_field(conv(x), conv(pos), return_scale=True, **call)
    vref, sref = ref.field(x, pos, **kw)
    if fs is None:
        assert s is None and sref is None
    else:
        assert isinstance(s, float)
        assert s == pytest.approx(sref, rel=1e-12)
    assert rel_err(v, vref) <= RTOL64


def test_auto_scale_is_mean_distance_over_sqrt_d(data):
    """S = mean ||x_i - y_j|| / sqrt(D) over positives and non-self query pairs, computed directly."""
    x, pos, _ = data
    _, s = dxfield.drift_field(x, pos, return_scale=True)
    dp = ref.distances(x, pos)
    dq = ref.distances(x, x)[~np.eye(N, dtype=bool)]
    expected = np.concatenate([dp.ravel(), dq]).mean() / np.sqrt(D)
    assert s == pytest.approx(expected, rel=1e-12)


def test_defaults_are_the_papers_settings(data, monkeypatch):
    """drift_field(x, pos) = bidirectional, Laplace, taus (0.02, 0.05, 0.2), auto scale, drift-normalised."""
    monkeypatch.delenv("DXFIELD_MEMORY_BUDGET", raising=False)
    x, pos, _ = data
    v = dxfield.drift_field(x, pos)
    vref, _ = ref.field(x, pos, temperatures=(0.02, 0.05, 0.2), normalization="bidirectional",
                        kernel="laplace", feature_scale="auto", drift_norm=True)
    assert rel_err(v, vref) <= RTOL64
    assert dxfield.DEFAULT_TEMPERATURES == (0.02, 0.05, 0.2)


@pytest.mark.parametrize("tau, fs", [(0.2, "auto"), (0.5, None), (1.5, None)])
def test_bidirectional_matches_algorithm_2_as_printed(data, tau, fs):
    """A second, literal check: K / sqrt(rowsum colsum) exactly as the paper prints it (moderate tau)."""
    x, pos, _ = data
    v, s = dxfield.drift_field(x, pos, temperatures=tau, feature_scale=fs, drift_norm=False, return_scale=True)
    if s is None:
        literal = ref.field_paper_form(x, pos, tau)
    else:
        literal = ref.field_paper_form(x / s, pos / s, tau * np.sqrt(D))
    assert rel_err(v, literal) <= 1e-10


def test_drift_norm_gives_unit_rms_per_temperature(data):
    x, pos, _ = data
    for norm in ("bidirectional", "row"):
        v = dxfield.drift_field(x, pos, temperatures=0.05, normalization=norm)
        assert np.mean(np.sum(v ** 2, axis=1)) / D == pytest.approx(1.0, rel=1e-12)
        # several temperatures: a sum of unit-RMS fields
        parts = [dxfield.drift_field(x, pos, temperatures=t, normalization=norm) for t in TEMPS["three"]]
        total = dxfield.drift_field(x, pos, temperatures=TEMPS["three"], normalization=norm)
        np.testing.assert_allclose(total, sum(parts), rtol=1e-10, atol=1e-12)


def test_field_points_toward_the_data():
    """User-level sanity: generated points far from the data are pulled toward it."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 2)), rng.normal(size=(256, 2)) + 3.0
    for norm in ("bidirectional", "row"):
        v = dxfield.drift_field(x, y, normalization=norm)
        assert (v.mean(axis=0) > 0).all()


@pytest.mark.parametrize("norm", ["bidirectional", "row"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_small_temperature_with_outlier_queries_is_finite_and_exact(xp, norm, dtype):
    """tau=0.02 on normalised features with far-away queries: every kernel value of an
    outlier row underflows in a naive exp, yet the log-domain result is finite and right."""
    rng = np.random.default_rng(11)
    d = 16
    x = rng.normal(size=(40, d))
    pos = rng.normal(size=(60, d)) + 0.5
    x[:4] += 30.0 * rng.normal(size=(4, d))  # outliers
    xr, pr = np.asarray(x, dtype), np.asarray(pos, dtype)
    v, s = dxfield.drift_field(xp.asarray(xr), xp.asarray(pr), temperatures=0.02, normalization=norm,
                               return_scale=True)
    v = to_numpy(v)
    vref, sref = ref.field(xr, pr, temperatures=(0.02,), normalization=norm)
    assert np.isfinite(v).all()
    tol = RTOL64 if dtype == np.float64 else RTOL32
    assert rel_err(v, vref) <= tol
    if norm == "row":
        # each outlier row is an O(1) mean shift: check it row by row, not only against the max
        for i in range(4):
            assert rel_err(v[i], vref[i]) <= 10 * tol
    # The regime is genuinely hard: in float32 a naive exp of an outlier row's logits is all
    # zeros, so a direct softmax would be 0/0 (in float64 they are ~1e-110: tiny, not zero).
    dist = ref.distances(xr, pr) / sref
    with np.errstate(under="ignore"):
        naive = np.exp(-(dist / (0.02 * np.sqrt(d))).astype(np.float32))
    assert (naive[:4] == 0).all()


@pytest.mark.parametrize("in_dtypes, out_dtype", [
    ((np.float64, np.float64), np.float64),
    ((np.float32, np.float32), np.float32),
    ((np.float32, np.float64), np.float64),
    ((np.float16, np.float16), np.float32),
    ((np.int64, np.int64), np.float32),
    ((np.int32, np.float32), np.float32),
])
def test_dtype_rules(xp, in_dtypes, out_dtype):
    """float64 in -> float64 out, otherwise float32 (half and integers upcast)."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(10, 3)) * 4).astype(in_dtypes[0])
    pos = (rng.normal(size=(12, 3)) * 4 + 2).astype(in_dtypes[1])
    v = dxfield.drift_field(xp.asarray(x), xp.asarray(pos))
    assert namespace_of(v) == xp.__name__
    assert v.dtype == out_dtype
    vref, _ = ref.field(x, pos)
    assert rel_err(v, vref) <= (RTOL64 if out_dtype == np.float64 else RTOL32)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inputs_are_not_modified(data, dtype):
    x, pos, neg = (np.asarray(a, dtype) for a in data)
    copies = [a.copy() for a in (x, pos, neg)]
    w = np.linspace(0.5, 2.0, M)
    w_copy = w.copy()
    for norm in ("bidirectional", "row"):
        dxfield.drift_field(x, pos, neg, normalization=norm, neg_weight=w, include_self=True, block_size=(5, 7))
        dxfield.drift_field(x, pos, normalization=norm)
    for a, c in zip((x, pos, neg, w), copies + [w_copy]):
        np.testing.assert_array_equal(a, c)


def test_single_query_with_only_itself_as_negative_has_no_repulsion():
    """N = 1, default negatives: the self pair is masked, so there is nothing to repel from
    and the bidirectional field (which weights attraction by the repulsion mass) is zero."""
    rng = np.random.default_rng(2)
    x, pos = rng.normal(size=(1, 3)), rng.normal(size=(9, 3)) + 1
    with pytest.warns(dxfield.LoneQueryWarning, match="single row"):  # said, not silent
        v = dxfield.drift_field(x, pos)
    assert np.isfinite(v).all()
    np.testing.assert_array_equal(v, 0.0)


@pytest.mark.parametrize("norm", ["bidirectional", "row"])
@pytest.mark.parametrize("block_size", [None, (3, 5), (7, 11), (40, 4)], ids=str)
def test_float32_far_from_origin_with_near_duplicate_queries(xp, norm, block_size):
    """Queries in near-identical pairs ~1000 away from the origin (float32): the distances
    the kernel sees must be those of the points, not of the product form's cancellation."""
    rng = np.random.default_rng(21)
    base = (1000.0 + rng.normal(size=(20, 8))).astype(np.float32)
    x = np.concatenate([base, (base + 1e-3 * rng.normal(size=base.shape)).astype(np.float32)])
    pos = (1000.0 + rng.normal(size=(30, 8))).astype(np.float32)
    for fs, temps in [("auto", (0.02,)), (None, (0.3,)), ("auto", (0.02, 0.05, 0.2))]:
        v = dxfield.drift_field(xp.asarray(x), xp.asarray(pos), normalization=norm, temperatures=temps,
                                feature_scale=fs, block_size=block_size)
        vref, _ = ref.field(x, pos, normalization=norm, temperatures=temps, feature_scale=fs)
        assert rel_err(v, vref) <= RTOL32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hard_regimes_emit_no_runtime_warnings(dtype):
    """Outlier queries, zero-weight negatives, a lone query: no overflow/divide/invalid warnings."""
    import warnings

    rng = np.random.default_rng(17)
    x = rng.normal(size=(20, 16))
    x[:3] += 40 * rng.normal(size=(3, 16))
    pos, neg = rng.normal(size=(30, 16)) + 0.5, rng.normal(size=(10, 16)) - 0.5
    x, pos, neg = (a.astype(dtype) for a in (x, pos, neg))
    partly_zero = np.r_[np.zeros(5), np.ones(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", dxfield.LoneQueryWarning)  # the lone query's own, deliberate warning
        for norm, kernel, fs, dn in itertools.product(["bidirectional", "row"], ["laplace", "gaussian"],
                                                      ["auto", None], [True, False]):
            kw = dict(normalization=norm, kernel=kernel, feature_scale=fs, drift_norm=dn)
            outs = [
                dxfield.drift_field(x, pos, **kw),
                dxfield.drift_field(x, pos, neg, neg_weight=0.0, **kw),
                dxfield.drift_field(x, pos, neg, neg_weight=partly_zero, include_self=True, **kw),
                dxfield.drift_field(x[:1], pos, **kw),
            ]
            assert all(np.isfinite(v).all() for v in outs)


def test_all_zero_negative_weights_leave_a_pure_attraction_bidirectional_field_of_zero(data):
    """Bidirectional: with every negative weighted 0 there is no repulsion mass, so V = 0
    (attraction is weighted by the row's negative mass); matches the reference."""
    x, pos, neg = data
    with pytest.warns(dxfield.LoneQueryWarning, match="neg_weight is 0 for every negative"):  # said, not silent
        v = dxfield.drift_field(x, pos, neg, neg_weight=0.0)
    np.testing.assert_array_equal(v, 0.0)


def test_row_field_of_a_query_without_negatives_does_not_depend_on_other_queries(data):
    """No negative mass: b- := x_i, so V_i = b+(x_i) - x_i whatever the other queries are."""
    x, pos, neg = data
    kw = dict(normalization="row", neg_weight=0.0, feature_scale=1.0, drift_norm=False)
    together = dxfield.drift_field(x, pos, neg, **kw)
    alone = dxfield.drift_field(x[:1], pos, neg, **kw)
    np.testing.assert_allclose(together[:1], alone, rtol=1e-10, atol=1e-12)


def test_row_field_is_local_to_each_query(data):
    """Row normalisation without drift normalisation: V_i depends on x_i and the targets only
    (explicit negatives; the counterpart of the xfail above when every row has negatives)."""
    x, pos, neg = data
    kw = dict(normalization="row", feature_scale=1.0, drift_norm=False)
    together = dxfield.drift_field(x, pos, neg, **kw)
    for i in (0, 5, N - 1):
        np.testing.assert_allclose(together[i:i + 1], dxfield.drift_field(x[i:i + 1], pos, neg, **kw),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("factor", [
    1e-6, 1.0, 1e6, 1e12,
    1e18,  # sum of squares would overflow float32 without rescaling first
])
def test_float32_drift_normalised_field_is_scale_free(factor):
    """feature_scale='auto' + drift_norm: the float32 field has unit RMS and matches the reference
    whatever the units of the features (within float32's range: distances stay representable)."""
    rng = np.random.default_rng(31)
    x = (rng.normal(size=(20, 4)) * factor).astype(np.float32)
    pos = ((rng.normal(size=(30, 4)) + 0.5) * factor).astype(np.float32)
    v = dxfield.drift_field(x, pos, temperatures=0.2)
    assert np.isfinite(v).all()
    assert np.mean(np.sum(v.astype(np.float64) ** 2, axis=1)) / 4 == pytest.approx(1.0, rel=1e-4)
    vref, _ = ref.field(x, pos, temperatures=(0.2,))
    assert rel_err(v, vref) <= RTOL32


@pytest.mark.parametrize("layout", ["strided", "fortran"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_non_contiguous_inputs(layout, dtype):
    rng = np.random.default_rng(41)
    big_x, big_p = rng.normal(size=(40, 10)).astype(dtype), (rng.normal(size=(60, 10)) + 0.5).astype(dtype)
    if layout == "strided":
        x, pos = big_x[::2, ::2], big_p[::3, 1::2]
    else:
        x, pos = np.asfortranarray(big_x[:, :5]), np.asfortranarray(big_p[:, :5])
    neg = x[::3]
    for kw in [{}, dict(normalization="row"), dict(neg=neg, include_self=True, neg_weight=1.5)]:
        v = dxfield.drift_field(x, pos, block_size=(3, 4), **kw)
        vref, _ = ref.field(x, pos, **kw)
        assert rel_err(v, vref) <= (RTOL64 if dtype == np.float64 else RTOL32)


def test_feature_scale_does_not_depend_on_tiling(data):
    x, pos, neg = data
    _, sref = ref.field(x, pos, neg, include_self=True)
    for block in [None, (1, 1), (3, 5), (N - 1, 4), (4, 1000)]:
        _, s = dxfield.drift_field(x, pos, neg, include_self=True, block_size=block, return_scale=True)
        assert s == pytest.approx(sref, rel=1e-12)


# ---------------------------------------------------------------------------------------
# class-conditional field in one call (labels): equals one call per class


@pytest.mark.parametrize("normalization", ["bidirectional", "row"])
@pytest.mark.parametrize("feature_scale", [None, 1.3])
def test_labelled_field_equals_one_call_per_class(normalization, feature_scale):
    rng = np.random.default_rng(7)
    x, pos, neg = rng.normal(size=(45, 4)), rng.normal(size=(120, 4)) + 0.5, rng.normal(size=(30, 4))
    ql, pl, nl = rng.integers(0, 3, 45), rng.integers(0, 3, 120), rng.integers(0, 3, 30)
    kw = dict(normalization=normalization, feature_scale=feature_scale, drift_norm=False,
              temperatures=(0.5, 2.0) if feature_scale is None else (0.02, 0.2))
    together = dxfield.drift_field(x, pos, neg, labels=ql, pos_labels=pl, neg_labels=nl, include_self=True, **kw)
    for c in range(3):
        alone, _ = ref.field(x[ql == c], pos[pl == c], neg[nl == c], include_self=True, **kw)
        np.testing.assert_allclose(together[ql == c], alone, rtol=1e-9, atol=1e-12)


def test_labelled_auto_scale_is_the_mean_over_same_class_pairs():
    rng = np.random.default_rng(8)
    x, pos = rng.normal(size=(30, 3)), rng.normal(size=(90, 3)) * 2
    ql, pl = np.repeat(np.arange(3), 10), np.repeat(np.arange(3), 30)
    _, s = dxfield.drift_field(x, pos, labels=ql, pos_labels=pl, return_scale=True)
    pairs = []
    for c in range(3):
        xc = x[ql == c]
        pairs.append(ref.distances(xc, pos[pl == c]).ravel())
        dq = ref.distances(xc, xc)
        pairs.append(dq[~np.eye(len(xc), dtype=bool)])
    assert s == pytest.approx(np.concatenate(pairs).mean() / np.sqrt(3), rel=1e-12)


def test_unlabelled_negatives_interact_with_every_class():
    rng = np.random.default_rng(9)
    x, pos, neg = rng.normal(size=(20, 2)), rng.normal(size=(40, 2)), rng.normal(size=(10, 2))
    ql, pl = np.repeat([0, 1], 10), np.repeat([0, 1], 20)
    kw = dict(normalization="row", feature_scale=None, drift_norm=False, temperatures=1.0)
    v = dxfield.drift_field(x, pos, neg, labels=ql, pos_labels=pl, include_self=False, **kw)
    for c in (0, 1):
        alone, _ = ref.field(x[ql == c], pos[pl == c], neg, include_self=False, **kw)
        np.testing.assert_allclose(v[ql == c], alone, rtol=1e-9, atol=1e-12)


def test_label_arguments_are_checked():
    x, pos = np.zeros((4, 2)), np.ones((6, 2))
    with pytest.raises(ValueError, match="pos_labels"):
        dxfield.drift_field(x, pos, labels=np.zeros(4, int))
    with pytest.raises(ValueError, match="labels"):
        dxfield.drift_field(x, pos, pos_labels=np.zeros(6, int))
    with pytest.raises(ValueError, match=r"pos_labels must have shape \(6,\)"):
        dxfield.drift_field(x, pos, labels=np.zeros(4, int), pos_labels=np.zeros(5, int))
    with pytest.raises(TypeError, match="labels must hold integer"):
        dxfield.drift_field(x, pos, labels=np.zeros(4), pos_labels=np.zeros(6, int))
    with pytest.raises(ValueError, match="neg_labels"):
        dxfield.drift_field(x, pos, labels=np.zeros(4, int), pos_labels=np.zeros(6, int), neg_labels=np.zeros(2, int))


def test_labels_equal_per_class_calls_only_without_drift_norm():
    # the docstring's claim: one labelled call is the per-class calls when nothing is shared across
    # classes (fixed scale, no drift normalisation); drift_norm normalises over the whole batch
    rng = np.random.default_rng(40)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(90, 3)) + 0.5
    lab, plab = rng.integers(0, 3, 40), rng.integers(0, 3, 90)
    for drift_norm in (False, True):
        v = dxfield.drift_field(x, y, labels=lab, pos_labels=plab, drift_norm=drift_norm, feature_scale=1.0)
        w = np.zeros_like(v)
        for c in range(3):
            w[lab == c] = dxfield.drift_field(x[lab == c], y[plab == c], drift_norm=drift_norm, feature_scale=1.0)
        gap = np.abs(v - w).max() / np.abs(w).max()
        assert (gap < 1e-10) if not drift_norm else (gap > 1e-3)
