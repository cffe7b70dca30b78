"""The rows' Nystrom coefficients ``W^{-1} k(U, y)`` (``ProjectedField.sample_maps``) and the corrected field
that takes them (``field(pos_sample_maps=)``, docs/design.md section 8.18).

References are independent: ``W^{-1}`` by a dense float64 eigendecomposition of the landmarks' kernel
matrix, and Algorithm 2 over all the data (``reference.field``, ``dxfield.drift_field``).
"""

import numpy as np
import pytest

import dxfield
import reference as ref
from test_projected_bidirectional import dense_kernel, dense_winv, two_classes


def cache(pos, labels=None, *, landmarks=12, temps=(0.05, 0.2), kernel="laplace", scale=0.8):
    return dxfield.ProjectedField.build(pos, labels=labels, landmarks=landmarks, method="uniform",
                                        feature_scale=scale, temperatures=temps, kernel=kernel)


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_maps_are_the_inverse_gram_times_the_landmark_kernel(kernel):
    rng = np.random.default_rng(30)
    pos = rng.normal(size=(200, 5))
    pf = cache(pos, kernel=kernel)
    maps = pf.sample_maps(pos[:40])
    assert maps.shape == (40, 2, 12) and maps.dtype == np.float64
    u = pf.shards[0].landmarks
    for k, tau in enumerate(pf.taus):  # the kernel length in raw units (feature scale and sqrt(D) included)
        want = (dense_winv(u, tau, kernel, pf.ridge) @ dense_kernel(u, pos[:40], tau, kernel)).T
        np.testing.assert_allclose(maps[:, k], want, rtol=1e-7, atol=1e-9 * np.abs(want).max())


def two_shards(pos, plab, ms):
    """A class cache with ``ms[c]`` landmarks for class ``c`` (shards of different sizes)."""
    shards = []
    for c, m in ms.items():
        part = dxfield.ProjectedField.build(pos[plab == c], landmarks=m, method="uniform", feature_scale=0.8,
                                            temperatures=(0.05, 0.2), summarize=False)
        part.shards[0].label = c
        shards.append(part.shards[0])
    base = cache(pos, landmarks=2)
    pf = dxfield.ProjectedField(kernel=base.kernel, temperatures=base.temperatures, ridge=base.ridge,
                                eig_clamp=base.eig_clamp, feature_scale=base.feature_scale, dim=base.dim,
                                centre=np.mean(np.concatenate([s.landmarks for s in shards]), axis=0), shards=shards,
                                fingerprint=base.fingerprint, dtype=base.dtype, den_floor=base.den_floor,
                                memory_budget=base.memory_budget)
    pf.add_summaries(pos, plab)
    return pf


def test_class_maps_use_their_own_shard_and_are_zero_beyond_it():
    pos, plab, x, qlab = two_classes(31, (60, 9), (4, 7), 10)  # class 7 has 9 rows: all of them its landmarks
    pf = two_shards(pos, plab, {4: 12, 7: 9})
    maps = pf.sample_maps(pos, plab)
    assert maps.shape == (69, 2, 12)
    small = plab == 7
    assert (maps[small][:, :, 9:] == 0).all()
    for k, tau in enumerate(pf.taus):
        for label, rows in ((4, ~small), (7, small)):
            u = pf.shards[[s.label for s in pf.shards].index(label)].landmarks
            want = (dense_winv(u, tau, "laplace", pf.ridge) @ dense_kernel(u, pos[rows], tau, "laplace")).T
            np.testing.assert_allclose(maps[rows, k, :len(u)], want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
    # the whole data with its maps as the sample: Algorithm 2 per class
    V = pf.field(x, labels=qlab, normalization="bidirectional", pos_sample=pos, pos_sample_labels=plab,
                 pos_sample_maps=maps)
    Vx = dxfield.drift_field(x, pos, labels=qlab, pos_labels=plab, normalization="bidirectional",
                             feature_scale=pf.feature_scale, temperatures=pf.temperatures)
    np.testing.assert_allclose(V, Vx, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dim", [4, 24])  # 18 queries: more than D + 1 columns, then fewer (both product orders)
@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_the_whole_data_as_sample_with_its_maps_gives_algorithm_2(dim, kernel):
    rng = np.random.default_rng(32)
    pos = rng.normal(size=(120, dim)) / np.sqrt(dim / 4) + 0.4
    x = rng.normal(size=(18, dim)) / np.sqrt(dim / 4)
    pf = cache(pos, kernel=kernel, temps=(0.02, 0.05, 0.2))
    V = pf.field(x, normalization="bidirectional", pos_sample=pos, pos_sample_maps=pf.sample_maps(pos))
    Vref, _ = ref.field(x, pos, normalization="bidirectional", kernel=kernel, feature_scale=0.8,
                        temperatures=(0.02, 0.05, 0.2))
    np.testing.assert_allclose(V, Vref, atol=1e-9 * max(1.0, np.abs(Vref).max()), rtol=0)


@pytest.mark.filterwarnings("ignore::dxfield.ClassesCombinedWarning")  # unlabelled on purpose
def test_maps_give_the_same_corrected_field_as_without_them():
    pos, plab, x, qlab = two_classes(33, (80, 70), (2, 5), 20, d=6)
    pf = cache(pos, plab, landmarks=10)
    maps = pf.sample_maps(pos, plab)
    rng = np.random.default_rng(33)
    rows = rng.choice(150, size=40, replace=False)
    for labels in (qlab, None):  # per class, and every shard for unconditional queries
        kw = dict(labels=labels, normalization="bidirectional", pos_sample=pos[rows], pos_sample_labels=plab[rows])
        V = pf.field(x, **kw)
        np.testing.assert_allclose(pf.field(x, pos_sample_maps=maps[rows], **kw), V, rtol=0, atol=1e-12)
        # the maps are used: another row's maps give another field
        assert np.abs(pf.field(x, pos_sample_maps=maps[rows][::-1].copy(), **kw) - V).max() > 1e-3


def test_float32_maps_agree_with_the_float32_field_without_them():
    rng = np.random.default_rng(34)
    pos = rng.normal(size=(3000, 16)).astype(np.float32)
    x = (pos[:200] + 0.3 * rng.normal(size=(200, 16))).astype(np.float32)
    pf = dxfield.ProjectedField.build(pos, landmarks=64, method="kmeans", temperatures=(0.02, 0.05, 0.2))
    maps = pf.sample_maps(pos)
    assert maps.dtype == np.float32
    rows = rng.choice(3000, size=256, replace=False)
    kw = dict(normalization="bidirectional", pos_sample=pos[rows])
    V = pf.field(x, **kw)
    np.testing.assert_allclose(pf.field(x, pos_sample_maps=maps[rows], **kw), V, rtol=0,
                               atol=1e-4 * np.abs(V).max())


def test_rows_left_out_as_non_finite_take_their_maps_with_them():
    rng = np.random.default_rng(35)
    pos = rng.normal(size=(100, 3))
    x = rng.normal(size=(9, 3))
    pf = cache(pos)
    maps = pf.sample_maps(pos[:30])
    bad = pos[:30].copy()
    bad[4, 0] = np.nan
    keep = np.arange(30) != 4
    V = pf.field(x, normalization="bidirectional", pos_sample=bad, pos_sample_maps=maps, check_finite=False)
    Vk = pf.field(x, normalization="bidirectional", pos_sample=pos[:30][keep], pos_sample_maps=maps[keep])
    np.testing.assert_allclose(V, Vk, rtol=0, atol=1e-12)


def test_sample_maps_errors():
    rng = np.random.default_rng(36)
    pos = rng.normal(size=(50, 3))
    x = rng.normal(size=(8, 3))
    pf = cache(pos, landmarks=10)
    maps = pf.sample_maps(pos[:10])
    with pytest.raises(ValueError, match="pos_sample_maps.*pass pos_sample"):
        pf.field(x, normalization="bidirectional", pos_sample_maps=maps)
    with pytest.raises(ValueError, match=r"pos_sample_maps must be .* shape \(10, 2, 10\)"):
        pf.field(x, normalization="bidirectional", pos_sample=pos[:10], pos_sample_maps=maps[:, :1])
    with pytest.raises(ValueError, match="pos_sample_maps must be"):
        pf.field(x, normalization="bidirectional", pos_sample=pos[:10], pos_sample_maps=maps[:9])
    with pytest.raises(ValueError, match="y"):
        pf.sample_maps(pos[:, :2])
    lab = np.repeat([0, 1], 25)
    pc = cache(pos, lab, landmarks=5)
    with pytest.raises(ValueError, match="labels are needed"):
        pc.sample_maps(pos)
    with pytest.raises(ValueError, match=r"no shard for: \[3\]"):
        pc.sample_maps(pos[:4], np.array([0, 1, 3, 0]))
