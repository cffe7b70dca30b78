"""No silent failure, no traceback: inputs at the edges get the right field or a clear error.

* Magnitude (docs/design.md 3.7): ``drift_field`` at 1e30 in float32 (1e200 in
  float64, 1e-30 in float32) equals the dense float64 reference of the same data
  at 1, with no warning; explicit and raw units keep their physical meaning;
  beyond what the dtype holds, and for ``ProjectedField``/``landmarks.select``
  beyond the squared-distance range, an error names the argument and the limit.
* Non-finite rows with ``check_finite=False``: left out of every sum, NaN on
  their own output rows (``drift_field``, ``ProjectedField.field``/``attraction``).
* ``Nystrom.transform`` with the wrong D says what the map was fitted on.
* ``ProjectedField.build`` stays within ``memory_budget`` (tracemalloc, as in
  tests/test_memory.py).
* Classes: a query class without positives, or with an empty shard, is an
  error naming the classes; unlabelled queries on a class cache warn.
"""

import warnings

import numpy as np
import pytest

import dxfield
import reference as ref
from helpers import rel_err, to_numpy, traced_peak

RTOL32, RTOL64 = 1e-4, 1e-10


def _data(seed=0, n=24, p=60, m=None, d=5):
    rng = np.random.default_rng(seed)
    x, pos = rng.normal(size=(n, d)), rng.normal(size=(p, d)) + 0.7
    if m is None:
        return x, pos
    return x, pos, rng.normal(size=(m, d)) - 0.7, rng.uniform(0.5, 2.0, m)


def _quiet(fn):
    """``fn()`` with every warning an error: no overflow warning may slip through."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


# ---------------------------------------------------------------------------------------
# 1. magnitude


@pytest.mark.parametrize("dtype, s", [(np.float32, 1e30), (np.float32, 1e-30), (np.float64, 1e200),
                                      (np.float64, 1e-200)], ids=["f32-1e30", "f32-1e-30", "f64-1e200", "f64-1e-200"])
@pytest.mark.parametrize("norm", ["bidirectional", "row"])
def test_field_at_extreme_scale_equals_the_field_at_one(xp, dtype, s, norm):
    x, pos, neg, w = _data(1, m=9)
    vref, sref = ref.field(x, pos, neg, neg_weight=w, include_self=True, normalization=norm)
    args = [xp.asarray((a * s).astype(dtype)) for a in (x, pos, neg)]
    v, scale = _quiet(lambda: dxfield.drift_field(*args, neg_weight=xp.asarray(w.astype(dtype)), include_self=True,
                                                  normalization=norm, return_scale=True))
    assert np.isfinite(to_numpy(v)).all()
    assert rel_err(v, vref) <= (RTOL32 if dtype == np.float32 else RTOL64)
    assert scale == pytest.approx(sref * s, rel=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("s", [1e30, 1e-30])
def test_explicit_and_raw_units_keep_their_physical_meaning(s):
    """The frame divides the temperatures' unit too: an explicit S (or raw tau) scaled with the data
    gives the same field, in units of S (raw units scaled by s)."""
    x, pos = _data(2)
    x32, pos32 = (x * s).astype(np.float32), (pos * s).astype(np.float32)
    vref, _ = ref.field(x, pos, feature_scale=0.3, drift_norm=False)
    v = _quiet(lambda: dxfield.drift_field(x32, pos32, feature_scale=0.3 * s, drift_norm=False))
    assert rel_err(v, vref) <= RTOL32
    vref, _ = ref.field(x, pos, feature_scale=None, drift_norm=False, temperatures=(0.5, 2.0))
    v = _quiet(lambda: dxfield.drift_field(x32, pos32, feature_scale=None, drift_norm=False,
                                           temperatures=(0.5 * s, 2.0 * s)))
    assert rel_err(v / np.float32(s), vref) <= RTOL32


def test_in_range_inputs_are_untouched():
    """Inside the safe range there is no frame: bit for bit the field of data scaled by a power of two."""
    x, pos = _data(3)
    a = dxfield.drift_field(x.astype(np.float32), pos.astype(np.float32))
    b = dxfield.drift_field((x * 2.0**40).astype(np.float32), (pos * 2.0**40).astype(np.float32))
    np.testing.assert_array_equal(a, b)


def test_values_beyond_the_dtype_name_the_argument_and_the_limit():
    x, pos = _data(4)
    big = np.full((3, 5), 1e38, np.float32)
    with pytest.raises(ValueError, match=r"^pos holds values up to 1e\+38 .* largest magnitude supported .* 2\.13e\+37"):
        dxfield.drift_field(x.astype(np.float32), big)
    with pytest.raises(ValueError, match=r"^neg holds values up to"):
        dxfield.drift_field(x.astype(np.float32), pos.astype(np.float32), big)


def test_a_kernel_too_short_for_the_dtype_is_an_error():
    x, pos = _data(5)
    with pytest.raises(ValueError, match="kernel length .* too short for float32"):
        dxfield.drift_field(x.astype(np.float32), pos.astype(np.float32), temperatures=1e-40)
    with pytest.raises(ValueError, match="feature_scale"):
        dxfield.drift_field((x * 1e30).astype(np.float32), (pos * 1e30).astype(np.float32), feature_scale=1e-10,
                            drift_norm=False)


def test_projected_field_refuses_magnitudes_it_cannot_square():
    rng = np.random.default_rng(6)
    y = (rng.normal(size=(300, 4)) + 0.5).astype(np.float32)
    with pytest.raises(ValueError, match=r"^pos holds values up to .* largest magnitude supported by a float32 "
                                         r"ProjectedField of D=4 is 5\.76e\+17"):
        dxfield.ProjectedField.build(y * np.float32(1e30), landmarks=16, method="kmeans")
    with pytest.raises(ValueError, match=r"^pos holds values no larger than .* smallest magnitude"):
        dxfield.ProjectedField.build(y * np.float32(1e-30), landmarks=16, method="uniform")
    with pytest.raises(ValueError, match=r"^landmarks holds values up to"):
        dxfield.ProjectedField.build(y, landmarks=y[:8].astype(np.float64) * 1e30)
    with pytest.raises(ValueError, match=r"^y holds values up to .* largest magnitude"):
        dxfield.landmarks.select(y * np.float32(1e30), 8, method="kmeans")
    pf = dxfield.ProjectedField.build(y, landmarks=16, method="uniform", temperatures=(0.2,))
    x = rng.normal(size=(10, 4)).astype(np.float32)
    for kw, name in [(dict(x=x * np.float32(1e30)), "x"), (dict(x=x, neg=x * np.float32(1e30)), "neg"),
                     (dict(x=x, pos_sample=y * np.float32(1e30), normalization="bidirectional"), "pos_sample")]:
        with pytest.raises(ValueError, match=rf"^{name} holds values up to .* largest magnitude"):
            pf.field(**kw)
    with pytest.raises(ValueError, match=r"^x holds values up to"):
        pf.attraction(x * np.float32(1e30))


def test_projected_field_in_float64_at_1e30_equals_the_field_at_one():
    rng = np.random.default_rng(7)
    y, x = rng.normal(size=(400, 4)) + 0.5, rng.normal(size=(30, 4))
    kw = dict(landmarks=24, method="uniform", temperatures=(0.05, 0.2))
    one, far = dxfield.ProjectedField.build(y, **kw), _quiet(lambda: dxfield.ProjectedField.build(y * 1e30, **kw))
    assert far.feature_scale == pytest.approx(one.feature_scale * 1e30, rel=1e-12)
    for norm in ("row", "bidirectional"):
        v = _quiet(lambda: far.field(x * 1e30, normalization=norm))
        assert rel_err(v, one.field(x, normalization=norm)) <= 1e-9


# ---------------------------------------------------------------------------------------
# 2. non-finite rows with check_finite=False


@pytest.mark.parametrize("norm", ["bidirectional", "row"])
def test_a_nan_query_is_left_out_and_gets_nan(xp, norm):
    x, pos, neg, w = _data(8, m=7)
    bad = x.copy()
    bad[3, 1] = np.nan
    bad[10, 0] = -np.inf
    keep = np.setdiff1d(np.arange(len(x)), [3, 10])
    kw = dict(normalization=norm, neg_weight=w, include_self=True)
    v = to_numpy(dxfield.drift_field(xp.asarray(bad), xp.asarray(pos), xp.asarray(neg), check_finite=False,
                                     **{**kw, "neg_weight": xp.asarray(w)}))
    assert np.isnan(v[[3, 10]]).all() and np.isfinite(v[keep]).all()
    vref, _ = ref.field(x[keep], pos, neg, **kw)  # the bad rows are no negatives of the others either
    assert rel_err(v[keep], vref) <= RTOL64


def test_nan_targets_and_labels_are_left_out_with_their_rows():
    x, pos, neg, w = _data(9, m=8)
    rng = np.random.default_rng(9)
    ql, pl, nl = rng.integers(0, 2, len(x)), rng.integers(0, 2, len(pos)), rng.integers(0, 2, len(neg))
    bx, bp, bn = x.copy(), pos.copy(), neg.copy()
    bx[0] = np.nan
    bp[[4, 5], 2] = np.inf
    bn[1, 0] = np.nan
    kw = dict(include_self=True, feature_scale=0.8, drift_norm=False)
    v = dxfield.drift_field(bx, bp, bn, neg_weight=w, labels=ql, pos_labels=pl, neg_labels=nl, check_finite=False,
                            **kw)
    kx, kp, kn = np.arange(len(x)) != 0, ~np.isin(np.arange(len(pos)), [4, 5]), np.arange(len(neg)) != 1
    clean = dxfield.drift_field(x[kx], pos[kp], neg[kn], neg_weight=w[kn], labels=ql[kx], pos_labels=pl[kp],
                                neg_labels=nl[kn], **kw)
    assert np.isnan(v[0]).all()
    np.testing.assert_allclose(v[kx], clean, rtol=1e-12, atol=1e-12)


def test_rows_that_are_all_nan():
    x, pos = _data(10)
    v = dxfield.drift_field(np.full_like(x, np.nan), pos, check_finite=False)
    assert v.shape == x.shape and np.isnan(v).all()
    with pytest.raises(ValueError, match=r"^pos has no row without NaN/Inf"):
        dxfield.drift_field(x, np.full_like(pos, np.nan), check_finite=False)
    with pytest.raises(ValueError, match=r"^x contains 1 NaN"):  # the default still refuses
        dxfield.drift_field(np.where((np.arange(len(x)) == 2)[:, None] & (np.arange(5) == 1), np.nan, x), pos)


@pytest.fixture(scope="module")
def cache():
    rng = np.random.default_rng(11)
    y = rng.normal(size=(400, 4)) + 0.5
    return y, dxfield.ProjectedField.build(y, landmarks=30, method="uniform", temperatures=(0.05, 0.2))


@pytest.mark.parametrize("kw", [{}, {"normalization": "bidirectional"}, {"repulsion": "nystrom"},
                                {"normalization": "bidirectional", "pos_sample": "sample"}],
                         ids=["row", "bidirectional", "nystrom", "corrected"])
def test_projected_field_leaves_nan_rows_out(xp, cache, kw):
    y, pf = cache
    x = np.random.default_rng(12).normal(size=(20, 4))
    kw = {k: (xp.asarray(y[::7]) if v == "sample" else v) for k, v in kw.items()}
    bad = x.copy()
    bad[5, 3] = np.nan
    keep = np.arange(len(x)) != 5
    v = to_numpy(pf.field(xp.asarray(bad), check_finite=False, **kw))
    assert np.isnan(v[5]).all()
    np.testing.assert_allclose(v[keep], to_numpy(pf.field(xp.asarray(x[keep]), **kw)), rtol=1e-12, atol=1e-12)


def test_projected_nan_negatives_samples_and_attraction(cache):
    y, pf = cache
    rng = np.random.default_rng(13)
    x, neg, w = rng.normal(size=(12, 4)), rng.normal(size=(6, 4)) - 1, rng.uniform(0.5, 2.0, 6)
    bn, bs, bx = neg.copy(), y[::9].copy(), x.copy()
    bn[2] = np.inf
    bs[0, 0] = np.nan
    bx[7] = np.nan
    v = pf.field(x, bn, neg_weight=w, include_self=True, check_finite=False)
    keep = np.arange(6) != 2
    np.testing.assert_allclose(v, pf.field(x, neg[keep], neg_weight=w[keep], include_self=True), rtol=1e-12)
    v = pf.field(x, normalization="bidirectional", pos_sample=bs, check_finite=False)
    np.testing.assert_allclose(v, pf.field(x, normalization="bidirectional", pos_sample=y[::9][1:]), rtol=1e-12)
    b = pf.attraction(bx, check_finite=False)
    assert b.shape == (2, 12, 4) and np.isnan(b[:, 7]).all()
    np.testing.assert_allclose(np.delete(b, 7, axis=1), pf.attraction(np.delete(x, 7, axis=0)), rtol=1e-12)
    assert np.isnan(pf.field(np.full((3, 4), np.nan), check_finite=False)).all()
    with pytest.raises(ValueError, match=r"^x contains"):
        pf.field(bx)


# ---------------------------------------------------------------------------------------
# 3. Nystrom with the wrong D


def test_nystrom_transform_says_what_the_map_was_fitted_on():
    ny = dxfield.Nystrom(tau=1.0).fit(np.random.default_rng(14).normal(size=(10, 3)))
    with pytest.raises(ValueError, match=r"^x has 7 features per row, but this map was fitted on landmarks with 3"):
        ny.transform(np.ones((4, 7)))


# ---------------------------------------------------------------------------------------
# 4. ProjectedField.build within memory_budget




@pytest.mark.parametrize("d, temps", [(32, (0.02, 0.05, 0.2)), (512, (0.2,))])
def test_build_stays_within_memory_budget(d, temps):
    budget = 2 * 2**20
    y = np.random.default_rng(15).normal(size=({32: 20000, 512: 4000}[d], d)).astype(np.float32)
    kw = dict(landmarks=16, method="uniform", temperatures=temps)
    dxfield.ProjectedField.build(y[:200], memory_budget=budget, **kw)  # one-time Python allocations
    assert 2048 * 2048 * 9 > 8 * budget  # the old fixed feature-scale block (distances, scratch, mask) could not fit
    pf, peak = traced_peak(lambda: dxfield.ProjectedField.build(y, memory_budget=budget, **kw))
    assert peak <= budget, f"traced peak {peak} bytes > memory_budget {budget}"
    free = dxfield.ProjectedField.build(y, memory_budget="1GiB", **kw)
    if d == 32:  # the whole 2048-row sample fits half the budget: the same scale (its float64 sums in other
        # tiles: measured 4e-12 apart with NumPy 2.4) and summaries
        assert pf.feature_scale == pytest.approx(free.feature_scale, rel=1e-10)
        assert rel_err(pf.summary_vector(), free.summary_vector()) <= 1e-6
    else:  # fewer sampled rows: a scale of the same data, close
        assert pf.feature_scale == pytest.approx(free.feature_scale, rel=0.05)


# ---------------------------------------------------------------------------------------
# 5. classes


@pytest.mark.parametrize("norm", ["bidirectional", "row"])
def test_a_query_class_without_positives_is_named(norm):
    x, pos = _data(16)
    ql, pl = np.arange(len(x)) % 3, np.arange(len(pos)) % 2  # class 2 has queries, no positive
    with pytest.raises(ValueError, match=r"^labels has queries of class\(es\) \[2\] but pos_labels has no positive"):
        dxfield.drift_field(x, pos, labels=ql, pos_labels=pl, normalization=norm)


def test_projected_classes_without_summaries_are_named():
    rng = np.random.default_rng(17)
    y, lab = rng.normal(size=(300, 3)), np.arange(300) % 3
    pf = dxfield.ProjectedField.build(y, labels=lab, landmarks=10, method="uniform", summarize=False)
    x = rng.normal(size=(6, 3))
    for call in (pf.field, pf.attraction):
        with pytest.raises(ValueError, match=r"no summaries yet \(n = 0\)"):
            call(x)
    pf.add_summaries(y[lab != 1], lab[lab != 1])
    for norm in ("row", "bidirectional"):
        with pytest.raises(ValueError, match=r"^labels contains class\(es\) \[1\] whose summaries are empty"):
            pf.field(x, labels=np.array([0, 0, 1, 1, 2, 2]), normalization=norm)
    assert np.isfinite(pf.field(x, labels=np.array([0, 0, 2, 2, 2, 0]))).all()


def test_unlabelled_queries_on_a_class_cache_warn():
    rng = np.random.default_rng(18)
    y, lab = rng.normal(size=(200, 3)), np.arange(200) % 2
    pf = dxfield.ProjectedField.build(y, labels=lab, landmarks=10, method="uniform")
    x = rng.normal(size=(6, 3))
    with pytest.warns(dxfield.ClassesCombinedWarning, match=r"without labels .*\(2 classes\)"):
        pf.field(x)
    with pytest.warns(dxfield.ClassesCombinedWarning):
        pf.attraction(x)
    one = dxfield.ProjectedField.build(y, labels=np.zeros(200, int), landmarks=10, method="uniform")
    _quiet(lambda: one.field(x))  # a single class: the combination is that class
    _quiet(lambda: pf.field(x, labels=np.arange(6) % 2))


# --------------------------------------------------------------------------- a query with no negative


def test_lone_query_warns_and_its_drift_is_zero():
    """Algorithm 2 scales a query's attraction by its negatives' mass: alone in its class, with the
    queries as the only negatives, it has none, and V = 0 exactly -- said, not silent."""
    import warnings

    import dxfield

    rng = np.random.default_rng(5)
    pos = rng.standard_normal((40, 3)).astype(np.float32)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    labels, pos_labels = np.array([0, 0, 1, 1, 2]), np.arange(40) % 3
    with pytest.warns(dxfield.LoneQueryWarning, match=r"one query of class\(es\) \[2\]"):
        v = dxfield.drift_field(x, pos, labels=labels, pos_labels=pos_labels)
    assert np.all(v[4] == 0) and np.all(np.abs(v[:4]).sum(1) > 0)
    with pytest.warns(dxfield.LoneQueryWarning, match="x has a single row"):
        dxfield.drift_field(x[:1], pos)
    pf = dxfield.ProjectedField.build(pos, labels=pos_labels, landmarks=8)
    with pytest.warns(dxfield.LoneQueryWarning, match=r"class\(es\) \[2\]"):
        pf.field(x, labels=labels, normalization="bidirectional")
    with warnings.catch_warnings():
        warnings.simplefilter("error", dxfield.LoneQueryWarning)
        dxfield.drift_field(x[:1], pos, neg=x[1:])  # explicit negatives: no warning
        dxfield.drift_field(x[:1], pos, normalization="row")  # row normalisation does not scale by them
        dxfield.drift_field(x[:4], pos, labels=labels[:4], pos_labels=pos_labels)
        pf.field(x[:2], labels=labels[:2], normalization="row")


def test_negatives_without_any_weight_warn_in_both_fields():
    """Explicit negatives that all weigh 0, the queries not among them: no negative mass anywhere, so
    the bidirectional drift is exactly 0 -- said with a LoneQueryWarning, in both fields."""
    import warnings

    import dxfield

    rng = np.random.default_rng(8)
    x, pos, neg = (rng.standard_normal((n, 3)).astype(np.float32) for n in (6, 40, 5))
    with pytest.warns(dxfield.LoneQueryWarning, match="neg_weight is 0 for every negative"):
        v = dxfield.drift_field(x, pos, neg, neg_weight=np.zeros(5))
    assert np.all(v == 0)
    pf = dxfield.ProjectedField.build(pos, landmarks=8)
    with pytest.warns(dxfield.LoneQueryWarning, match="neg_weight is 0 for every negative"):
        pf.field(x, neg, neg_weight=0.0, normalization="bidirectional")
    with warnings.catch_warnings():
        warnings.simplefilter("error", dxfield.LoneQueryWarning)
        dxfield.drift_field(x, pos, neg, neg_weight=np.r_[np.zeros(4), 1.0])  # one weighs: fine
        dxfield.drift_field(x, pos, neg, neg_weight=0.0, include_self=True)  # the queries are negatives too
        pf.field(x, neg, neg_weight=0.0)  # row normalisation does not scale by the negatives' mass
