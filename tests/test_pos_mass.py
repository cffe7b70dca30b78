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
    pf = dxfield.ProjectedField.build(pos, landmarks=8, method="uniform", ridge=1e-6, feature_scale=0.8,
                                      temperatures=(0.05, 0.2))
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
    pf = dxfield.ProjectedField.build(pos, landmarks=10, method="uniform", ridge=1e-4, feature_scale=0.8,
                                      temperatures=(0.05, 0.2))
    opts = dict(normalization="bidirectional", repulsion=repulsion, drift_norm=False)
    V = pf.field(x, **opts)
    np.testing.assert_allclose(pf.field(x, pos_mass=P, **opts), V, atol=1e-10, rtol=0)
    assert np.abs(pf.field(x, pos_mass=4, **opts) - V).max() > 1e-3 * np.abs(V).max()
    # the row-normalised field does not depend on it
    Vrow = pf.field(x, normalization="row", drift_norm=False)
    np.testing.assert_array_equal(pf.field(x, normalization="row", drift_norm=False, pos_mass=4), Vrow)


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-2.0, ValueError), (float("nan"), ValueError),
                                      (float("inf"), ValueError), ("many", TypeError)])
def test_bad_mass_is_refused_by_name(points, bad, err):
    x, pos = points
    pf = full_rank(pos, (0.2,), feature_scale=0.8)
    with pytest.raises(err, match="pos_mass"):
        pf.field(x, normalization="bidirectional", pos_mass=bad)


# -- dxtrain ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, want", [("positives", 300), ("all", None), (64, 64), ("64", 64)])
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


@pytest.mark.parametrize("pos_mass, want", [("positives", 96 // 3), (30, 10), ("all", None)])
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
                   pos_mass=None if want is None else float(want))
    torch.testing.assert_close(got, torch.from_numpy(expect), rtol=0, atol=0)
