"""The positives' mass of the bidirectional projected field (``pos_mass``; docs/design.md section 8.24).

Algorithm 2 against P positives drawn from the data estimates the field in
which every data point weighs P / n in the row sums (not in its own column
sum). With every positive a landmark and ridge -> 0, the projected field with
``pos_mass=P`` must be that field, checked against the dense float64 reference
with weighted positives; and dxtrain must pass --pos-mass split over the
classes.
"""

import numpy as np
import pytest
import torch

import dxfield
import reference as ref
from dxtrain.config import TrainConfig
from dxtrain.fields import ProjectedFieldSet
from test_projected_bidirectional import D, P, full_rank, points, two_classes  # noqa: F401 (points: a fixture)


def uniform_field(pos, landmarks=10, ridge=1e-4):
    """A projected field on ``landmarks`` uniform landmarks, feature scale 0.8, temperatures 0.05 and 0.2."""
    return dxfield.ProjectedField.build(pos, landmarks=landmarks, method="uniform", ridge=ridge, feature_scale=0.8,
                                        temperatures=(0.05, 0.2))


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("drift_norm", [False, True])
@pytest.mark.parametrize("mass", [3.0, 12.5, 400.0])
def test_mass_weighs_every_data_point_mass_over_n(points, kernel, drift_norm, mass):
    x, pos = points
    temps = (0.05, 0.2, 0.6)
    pf = full_rank(pos, temps, kernel=kernel, feature_scale=0.8)
    V = pf.field(x, normalization="bidirectional", drift_norm=drift_norm, pos_mass=mass)
    Vref, _ = ref.field(x, pos, normalization="bidirectional", kernel=kernel, feature_scale=0.8,
                        drift_norm=drift_norm, temperatures=temps, pos_weight=mass / P)
    np.testing.assert_allclose(V, Vref, atol=1e-8 * max(1.0, np.abs(Vref).max()), rtol=0)
    # the mass moves the field: it is not Algorithm 2 against all the data
    Vall, _ = ref.field(x, pos, normalization="bidirectional", kernel=kernel, feature_scale=0.8,
                        drift_norm=drift_norm, temperatures=temps)
    assert np.abs(Vall - Vref).max() > 1e-3 * np.abs(Vref).max()


def test_corrected_field_with_the_whole_data_as_sample_is_exact(points):
    # the residual correction by every data point leaves the exact sums: the mass scales them alike
    x, pos = points
    pf = uniform_field(pos, landmarks=8, ridge=1e-6)
    V = pf.field(x, normalization="bidirectional", pos_sample=pos, pos_mass=10.0, drift_norm=False)
    Vref, _ = ref.field(x, pos, normalization="bidirectional", feature_scale=0.8, drift_norm=False,
                        temperatures=(0.05, 0.2), pos_weight=10.0 / P)
    np.testing.assert_allclose(V, Vref, atol=1e-7 * max(1.0, np.abs(Vref).max()), rtol=0)


def test_each_class_weighs_mass_over_its_own_size():
    pos, plab, x, qlab = two_classes(27, (20, 32), (3, 8), 14, d=D)
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=pos, ridge=1e-12, feature_scale=0.7,
                                      temperatures=(0.05, 0.2))
    V = pf.field(x, labels=qlab, normalization="bidirectional", drift_norm=False, pos_mass=6)
    for c, n in ((3, 20), (8, 32)):
        q = qlab == c
        Vc, _ = ref.field(x[q], pos[plab == c], normalization="bidirectional", feature_scale=0.7, drift_norm=False,
                          temperatures=(0.05, 0.2), pos_weight=6 / n)
        np.testing.assert_allclose(V[q], Vc, atol=1e-8, rtol=0)


@pytest.mark.parametrize("repulsion", ["exact", "nystrom"])
def test_mass_n_is_the_default_and_other_masses_differ(points, repulsion):
    x, pos = points
    pf = uniform_field(pos)
    opts = dict(normalization="bidirectional", repulsion=repulsion, drift_norm=False)
    V = pf.field(x, **opts)
    np.testing.assert_allclose(pf.field(x, pos_mass=P, **opts), V, atol=1e-10, rtol=0)
    assert np.abs(pf.field(x, pos_mass=4, **opts) - V).max() > 1e-3 * np.abs(V).max()
    # the row-normalised field does not depend on it
    Vrow = pf.field(x, normalization="row", drift_norm=False)
    np.testing.assert_array_equal(pf.field(x, normalization="row", drift_norm=False, pos_mass=4), Vrow)


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-2.0, ValueError), (float("nan"), ValueError),
                                      (float("inf"), ValueError), ("many", ValueError), ([3], TypeError)])
def test_bad_mass_is_refused_by_name(points, bad, err):
    x, pos = points
    pf = full_rank(pos, (0.2,), feature_scale=0.8)
    with pytest.raises(err, match="pos_mass"):
        pf.field(x, normalization="bidirectional", pos_mass=bad)


# -- dxtrain ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, want", [("positives", 300), ("all", None), (64, 64), ("64", 64),
                                         ("balanced", "balanced")])
def test_config_mass_count(given, want):
    assert TrainConfig(positives=300, pos_mass=given).validate().pos_mass_count() == want


@pytest.mark.parametrize("bad", ["some", "0", 0, -5, "2.5", 2.5, None])
def test_config_refuses_a_bad_mass_by_its_option_name(bad):
    with pytest.raises(ValueError, match="--pos-mass"):
        TrainConfig(pos_mass=bad).validate()


def test_runs_saved_before_the_mass_resume_with_all_the_data():
    old = {k: v for k, v in TrainConfig().__dict__.items() if k != "pos_mass"}
    assert TrainConfig.from_dict(old).pos_mass == "all"
    assert TrainConfig.from_dict({**old, "pos_mass": 128}).pos_mass == 128
    assert TrainConfig().pos_mass == "all"  # the default (docs/design.md section 8.24)


@pytest.mark.parametrize("pos_mass, want", [("positives", 96 // 3), (30, 10), ("all", None), ("balanced", "balanced")])
def test_field_set_passes_the_mass_per_class(pos_mass, want):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 300)
    y = (rng.standard_normal((300, 5)) + 2 * labels[:, None]).astype(np.float32)
    fs = ProjectedFieldSet({"x": dxfield.ProjectedField.build(y, labels=labels, temperatures=(0.05, 0.2),
                                                              landmarks=16, method="uniform")})
    fs.configure(TrainConfig(positives=96, pos_mass=pos_mass, correction=False))
    seen = []
    pf = fs.fields["x"]
    field = pf.field

    def spy(x, **kw):
        seen.append(kw.get("pos_mass"))
        return field(x, **kw)

    pf.field = spy
    x = torch.from_numpy((rng.standard_normal((30, 5)) + 2).astype(np.float32))
    got = fs({"x": x}, labels=torch.from_numpy(np.arange(30) % 3))["x"].v
    assert seen == [want]
    expect = field(x.numpy(), labels=np.arange(30) % 3, normalization="bidirectional", repulsion="exact",
                   pos_mass=want if want in (None, "balanced") else float(want))
    torch.testing.assert_close(got, torch.from_numpy(expect), rtol=0, atol=0)


# -- the balanced mass (docs/design.md section 8.28) ---------------------------------------------------------

def balanced_weight(x, pos, temps, scale, kernel="laplace"):
    """Dense float64: every data point's weight ``min(1, exp(mean_t median_i (LR-_ti - LR+_ti)))``, where
    ``LR±_ti`` are query i's row log-sum-exps at temperature t over the positives (each weighing 1) and over
    the other queries."""
    medians = []
    for tau in temps:
        t = tau * np.sqrt(x.shape[1])
        lpos = ref.log_kernel(ref.distances(x, pos) / scale, t, kernel)
        lneg = ref.log_kernel(ref.distances(x, x) / scale, t, kernel)
        lneg[np.eye(len(x), dtype=bool)] = -np.inf
        medians.append(np.median(ref._logsumexp(lneg, 1) - ref._logsumexp(lpos, 1)))
    return float(np.exp(min(np.mean(medians), 0.0)))


def balanced_reference(x, pos, temps, scale, **kw):
    """Algorithm 2 with every positive at the balanced weight."""
    w = balanced_weight(x, pos, temps, scale, kw.get("kernel", "laplace"))
    return ref.field(x, pos, normalization="bidirectional", feature_scale=scale, temperatures=temps,
                     pos_weight=w, **kw)[0], w


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("drift_norm", [False, True])
def test_balanced_mass_is_algorithm_2_at_the_median_rows_balance(points, kernel, drift_norm):
    x, pos = points
    temps = (0.05, 0.2, 0.6)
    pf = full_rank(pos, temps, kernel=kernel, feature_scale=0.8)
    V = pf.field(x, normalization="bidirectional", drift_norm=drift_norm, pos_mass="balanced")
    Vref, w = balanced_reference(x, pos, temps, 0.8, kernel=kernel, drift_norm=drift_norm)
    assert w < 0.9  # 40 positives against 14 negatives: the mass comes down
    np.testing.assert_allclose(V, Vref, atol=1e-8 * max(1.0, np.abs(Vref).max()), rtol=0)
    np.testing.assert_allclose(np.exp(pf.last_stats["log_pos_mass"]), [w * P], rtol=1e-6)
    Vall = pf.field(x, normalization="bidirectional", drift_norm=drift_norm)
    assert np.abs(Vall - V).max() > 1e-3 * np.abs(V).max()


def test_balanced_mass_is_at_most_every_data_point(points):
    # queries far from the data: their negatives outweigh the positives at any mass up to n, which stays
    x, pos = points
    far = x + 6.0
    pf = full_rank(pos, (0.05, 0.2), feature_scale=0.8)
    assert balanced_weight(far, pos, (0.05, 0.2), 0.8) == 1.0
    V = pf.field(far, normalization="bidirectional", drift_norm=False, pos_mass="balanced")
    np.testing.assert_allclose(pf.last_stats["log_pos_mass"], [np.log(P)], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(V, pf.field(far, normalization="bidirectional", drift_norm=False))


def test_balanced_mass_per_class():
    # 8 queries per class: an even count, whose median is the mean of the middle two
    pos, plab, x, qlab = two_classes(27, (20, 32), (3, 8), 16, d=D)
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=pos, ridge=1e-12, feature_scale=0.7,
                                      temperatures=(0.05, 0.2))
    V = pf.field(x, labels=qlab, normalization="bidirectional", drift_norm=False, pos_mass="balanced")
    logs = pf.last_stats["log_pos_mass"]
    assert logs.shape == (2,)
    for g, (c, n) in enumerate(((3, 20), (8, 32))):
        q = qlab == c
        Vc, w = balanced_reference(x[q], pos[plab == c], (0.05, 0.2), 0.7, drift_norm=False)
        np.testing.assert_allclose(V[q], Vc, atol=1e-8, rtol=0)
        np.testing.assert_allclose(np.exp(logs[g]), w * n, rtol=1e-6)


def test_balanced_mass_with_the_whole_data_as_correction_sample(points):
    x, pos = points
    pf = uniform_field(pos, landmarks=8, ridge=1e-6)
    V = pf.field(x, normalization="bidirectional", pos_sample=pos, pos_mass="balanced", drift_norm=False)
    Vref, _ = balanced_reference(x, pos, (0.05, 0.2), 0.8, drift_norm=False)
    np.testing.assert_allclose(V, Vref, atol=1e-7 * max(1.0, np.abs(Vref).max()), rtol=0)


@pytest.mark.parametrize("repulsion", ["exact", "nystrom"])
def test_balanced_mass_is_the_field_at_the_mass_it_reports(points, repulsion):
    # "balanced" is the fixed-mass field at the mass left in last_stats, on every estimator
    x, pos = points
    pf = uniform_field(pos)
    opts = dict(normalization="bidirectional", repulsion=repulsion, drift_norm=False)
    near = pos[::3] + 0.1 * np.random.default_rng(1).normal(size=pos[::3].shape)  # queries on the data
    V = pf.field(near, pos_mass="balanced", **opts)
    mass = float(np.exp(pf.last_stats["log_pos_mass"][0]))
    assert 0 < mass < P  # not at the cap
    np.testing.assert_allclose(pf.field(near, pos_mass=mass, **opts), V, atol=1e-6 * np.abs(V).max(), rtol=0)


def test_a_bad_mass_name_is_refused_with_the_valid_ones(points):
    x, pos = points
    pf = full_rank(pos, (0.2,), feature_scale=0.8)
    with pytest.raises(ValueError, match="pos_mass='balance'.*'balanced'"):
        pf.field(x, normalization="bidirectional", pos_mass="balance")


@pytest.mark.gpu
@pytest.mark.parametrize("labelled", [False, True])
def test_balanced_mass_cupy_matches_numpy(labelled):
    import cupy

    pos, plab, x, qlab = two_classes(31, (60, 45), (0, 1), 24, d=D)
    kw = dict(labels=plab) if labelled else {}
    pf = dxfield.ProjectedField.build(pos, landmarks=12, method="uniform", feature_scale=0.7,
                                      temperatures=(0.05, 0.2), **kw)
    opts = dict(normalization="bidirectional", pos_mass="balanced", pos_sample=pos[::2],
                **(dict(labels=qlab, pos_sample_labels=plab[::2]) if labelled else {}))
    V = pf.field(x, **opts)
    logs = np.asarray(pf.last_stats["log_pos_mass"])
    Vg = pf.field(cupy.asarray(x), **{k: cupy.asarray(v) if isinstance(v, np.ndarray) else v
                                       for k, v in opts.items()})
    assert isinstance(Vg, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(Vg), V, atol=1e-4 * np.abs(V).max(), rtol=0)
    np.testing.assert_allclose(cupy.asnumpy(pf.last_stats["log_pos_mass"]), logs, rtol=0, atol=1e-4)
