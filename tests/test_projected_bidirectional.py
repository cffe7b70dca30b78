"""``ProjectedField.field(normalization="bidirectional")``: Algorithm 2 against the whole summarised data.

Checked against dense float64 formulas written here or in tests/reference.py:

* exactness: with every positive a landmark and ridge -> 0 it is Algorithm 2
  (docs/design.md section 2.1) with all the data as positives -- both kernels, tiny
  temperatures, feature scale None or fixed, drift norm on or off, explicit
  weighted negatives, class shards;
* with m << P it is the landmark-column formula
  ``sum_j k(x, y_j) c_j^{-1/2} [y_j, 1] ~ k(x, U) diag(c_U^{-1/2}) W^{-1} K_UY [Y, 1]``,
  ``c_U = sum_i k(x_i, U)``, recomputed densely here;
* the fallback (landmarks standing for the data, mass n/m each) equals
  Algorithm 2 with each landmark repeated n/m times;
* what it is for: queries sitting on one mode are pulled toward a data mode
  none of them is near, which the row-normalised field does not do;
* float32 against float64, NumPy against CuPy, argument errors.
"""

import numpy as np
import pytest

import dxfield
from dxfield.correction import corrected_attraction
import reference as ref
from helpers import namespace_of, to_numpy

D, P, N = 4, 40, 15


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(5)
    return rng.normal(size=(N, D)), rng.normal(size=(P, D)) + 0.5


def full_rank(pos, temps, **kw):
    return dxfield.ProjectedField.build(pos, landmarks=pos, ridge=1e-12, temperatures=temps, **kw)


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("drift_norm", [False, True])
@pytest.mark.parametrize("scale,temps", [(None, (0.1, 0.5, 1.5)), (0.8, (0.02, 0.05, 0.2))])
def test_all_positives_as_landmarks_is_algorithm_2_over_all_the_data(points, kernel, drift_norm, scale, temps):
    x, pos = points
    pf = full_rank(pos, temps, kernel=kernel, feature_scale=scale)
    V = pf.field(x, normalization="bidirectional", drift_norm=drift_norm)
    Vref, _ = ref.field(x, pos, normalization="bidirectional", kernel=kernel, feature_scale=scale,
                        drift_norm=drift_norm, temperatures=temps)
    assert V.shape == (N, D) and V.dtype == np.float64
    np.testing.assert_allclose(V, Vref, atol=1e-8 * max(1.0, np.abs(Vref).max()), rtol=0)
    assert pf.last_stats["attraction_fallback_rows"] == [0] * len(temps)
    # and not the row field
    Vrow = pf.field(x, normalization="row", drift_norm=drift_norm)
    assert np.abs(Vrow - V).max() > 1e-3 * np.abs(V).max()


@pytest.mark.parametrize("include_self", [True, False])
def test_explicit_weighted_negatives(points, include_self):
    x, pos = points
    neg = np.random.default_rng(6).normal(size=(9, D)) - 0.3
    w = np.linspace(0.5, 2.0, 9)
    pf = full_rank(pos, (0.05, 0.2), feature_scale=0.9)
    V = pf.field(x, neg, neg_weight=w, include_self=include_self, normalization="bidirectional")
    Vref, _ = ref.field(x, pos, neg, neg_weight=w, include_self=include_self, normalization="bidirectional",
                        feature_scale=0.9, temperatures=(0.05, 0.2))
    np.testing.assert_allclose(V, Vref, atol=1e-8, rtol=0)


def test_class_shards_use_their_own_data_and_queries():
    pos, plab, x, qlab = two_classes(7, (20, 25), (3, 8), 14, d=D)
    # every point a landmark of every shard: each class's summaries are exact
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=pos, ridge=1e-12, feature_scale=0.7,
                                      temperatures=(0.05, 0.2))
    V = pf.field(x, labels=qlab, normalization="bidirectional", drift_norm=False)
    for c in (3, 8):
        q = qlab == c
        Vc, _ = ref.field(x[q], pos[plab == c], normalization="bidirectional", feature_scale=0.7,
                          drift_norm=False, temperatures=(0.05, 0.2))
        np.testing.assert_allclose(V[q], Vc, atol=1e-8, rtol=0)
    # the public exact field with labels agrees as well
    Vx = dxfield.drift_field(x, pos, labels=qlab, pos_labels=plab, normalization="bidirectional",
                             feature_scale=0.7, temperatures=(0.05, 0.2), drift_norm=False)
    np.testing.assert_allclose(V, Vx, atol=1e-8, rtol=0)


@pytest.mark.parametrize("corrected", [False, True])
def test_labelled_weighted_negatives_repel_their_own_class_only(corrected):
    # guidance's negatives split by class: each class's weight reaches only that class's queries. Exact summaries,
    # so per class it is Algorithm 2 with the generated batch and that class's weighted negatives (dense reference)
    pos, plab, x, qlab = two_classes(8, (20, 25), (3, 8), 14, d=D)
    rng = np.random.default_rng(9)
    neg, nlab = rng.normal(size=(10, D)) + 1.0, np.array([3, 8] * 5)
    w = np.where(nlab == 3, 0.7, 2.5)
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=pos, ridge=1e-12, feature_scale=0.7,
                                      temperatures=(0.05, 0.2))
    opts = dict(labels=qlab, normalization="bidirectional", drift_norm=False, neg_weight=w, include_self=True)
    sample = dict(pos_sample=pos, pos_sample_labels=plab) if corrected else {}
    V = pf.field(x, neg, neg_labels=nlab, **opts, **sample)
    for c in (3, 8):
        q, n = qlab == c, nlab == c
        Vc, _ = ref.field(x[q], pos[plab == c], neg[n], neg_weight=w[n], include_self=True,
                          normalization="bidirectional", feature_scale=0.7, drift_norm=False, temperatures=(0.05, 0.2))
        np.testing.assert_allclose(V[q], Vc, atol=1e-8, rtol=0)
    Vx = dxfield.drift_field(x, pos, neg, labels=qlab, pos_labels=plab, neg_labels=nlab, neg_weight=w,
                             include_self=True, normalization="bidirectional", feature_scale=0.7,
                             temperatures=(0.05, 0.2), drift_norm=False)
    np.testing.assert_allclose(V, Vx, atol=1e-8, rtol=0)
    assert np.abs(pf.field(x, neg, **opts, **sample) - V).max() > 1e-3  # unlabelled: every query sees all ten
    with pytest.raises(ValueError, match="neg_labels"):
        pf.field(x, neg_labels=nlab, labels=qlab, normalization="bidirectional")
    with pytest.raises(ValueError, match="neg_labels"):
        pf.field(x, neg, neg_labels=nlab[:4], labels=qlab, normalization="bidirectional")


def dense_kernel(a, b, tau, kernel):
    return np.exp(ref.log_kernel(ref.distances(a, b), tau, kernel))


def dense_winv(u, tau, kernel, ridge, eig_clamp=1e-8):
    """(K_UU + ridge I)^{-1} by eigh, eigenvalues clamped at eig_clamp * max."""
    lam, q = np.linalg.eigh(dense_kernel(u, u, tau, kernel) + ridge * np.eye(len(u)))
    lam = np.maximum(lam, eig_clamp * lam.max())
    return (q / lam) @ q.T


def few_landmarks(kernel):
    """30 of 300 positives as landmarks, two temperatures: (x, pos, u, temps, ridge, cache)."""
    rng = np.random.default_rng(8)
    pos = rng.normal(size=(300, 3))
    x = rng.normal(size=(25, 3)) * 0.8
    u = pos[rng.choice(300, size=30, replace=False)]
    temps, ridge = (0.7, 2.0), 1e-3
    pf = dxfield.ProjectedField.build(pos, landmarks=u, ridge=ridge, feature_scale=None, temperatures=temps,
                                      kernel=kernel)
    return x, pos, u, temps, ridge, pf


def dense_landmark_column_field(x, pos, u, tau, kernel, ridge, eig_clamp=1e-8):
    """Algorithm 2 with the positives' column sums taken at the landmarks, float64, dense."""
    K = lambda a, b: dense_kernel(a, b, tau, kernel)  # noqa: E731
    winv = dense_winv(u, tau, kernel, ridge, eig_clamp)
    kxu = K(x, u)
    beta = winv @ K(u, pos).sum(1)  # data mass seen through each landmark
    B = winv @ (K(u, pos) @ pos)
    c = kxu.sum(0)  # column sums over the queries, at the landmarks
    pos_w = kxu / np.sqrt(c)[None, :]
    s_pos = pos_w @ beta  # sum_j k_ij c_j^{-1/2}
    acc_pos = pos_w @ B  # sum_j k_ij c_j^{-1/2} y_j
    r_pos = kxu @ beta  # sum_j k_ij
    kxx = K(x, x)
    np.fill_diagonal(kxx, 0.0)
    neg_w = kxx / np.sqrt(kxx.sum(0))[None, :]
    r = r_pos + kxx.sum(1)
    s_neg, acc_neg = neg_w.sum(1), neg_w @ x
    # W+ = A+ rowsum(A-), W- = A- rowsum(A+), A = k / sqrt(r c)
    return (acc_pos * s_neg[:, None] - acc_neg * s_pos[:, None]) / r[:, None]


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_few_landmarks_give_the_landmark_column_formula(kernel):
    x, pos, u, temps, ridge, pf = few_landmarks(kernel)
    V = pf.field(x, normalization="bidirectional", drift_norm=False)
    Vref = sum(dense_landmark_column_field(x, pos, u, t, kernel, ridge) for t in temps)
    assert pf.last_stats["attraction_fallback_rows"] == [0, 0]
    np.testing.assert_allclose(V, Vref, atol=1e-9 * np.abs(Vref).max(), rtol=0)
    # an approximation: not Algorithm 2 itself
    Vexact, _ = ref.field(x, pos, normalization="bidirectional", feature_scale=None, drift_norm=False,
                          temperatures=temps, kernel=kernel)
    assert np.abs(V - Vexact).max() > 1e-6 * np.abs(Vexact).max()


def dense_nystrom_both_sides(x, pos, u, tau, kernel, ridge, eig_clamp=1e-8):
    """Both sides through the Nystrom kernel: the queries summarised on the landmarks like the data,
    column sums at the landmarks, each query's self term removed; float64, dense."""
    K = lambda a, b: dense_kernel(a, b, tau, kernel)  # noqa: E731
    winv = dense_winv(u, tau, kernel, ridge, eig_clamp)
    kxu = K(x, u)
    pw = kxu / np.sqrt(kxu.sum(0))[None, :]
    beta, B = winv @ K(u, pos).sum(1), winv @ (K(u, pos) @ pos)
    s_pos, acc_pos, r_pos = pw @ beta, pw @ B, kxu @ beta
    ktil = kxu @ winv @ kxu.T  # the Nystrom kernel between the queries
    beta_n, B_n = winv @ kxu.T.sum(1), winv @ (kxu.T @ x)
    self_w = np.einsum("iu,uv,iv->i", pw, winv, kxu)
    s_neg = pw @ beta_n - self_w
    acc_neg = pw @ B_n - self_w[:, None] * x
    r_neg = ktil.sum(1) - np.diag(ktil)
    return (acc_pos * s_neg[:, None] - acc_neg * s_pos[:, None]) / (r_pos + r_neg)[:, None]


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_nystrom_repulsion_puts_both_sides_through_one_kernel(kernel):
    x, pos, u, temps, ridge, pf = few_landmarks(kernel)
    V = pf.field(x, normalization="bidirectional", repulsion="nystrom", drift_norm=False)
    assert pf.last_stats["repulsion_fallback_rows"] == 0
    Vref = sum(dense_nystrom_both_sides(x, pos, u, t, kernel, ridge) for t in temps)
    np.testing.assert_allclose(V, Vref, atol=1e-9 * np.abs(Vref).max(), rtol=0)


def test_nystrom_repulsion_vanishes_where_data_and_queries_agree():
    # the queries ARE the data: attraction and repulsion are one functional of the same points,
    # so only the removed self terms are left (exact repulsion keeps the attraction's Nystrom error)
    rng = np.random.default_rng(16)
    pts = rng.normal(size=(400, 4))
    pf = dxfield.ProjectedField.build(pts, landmarks=60, method="uniform", ridge=1e-3, feature_scale=None,
                                      temperatures=(1.0,))
    nys = pf.field(pts, normalization="bidirectional", repulsion="nystrom", drift_norm=False)
    exact_rep = pf.field(pts, normalization="bidirectional", drift_norm=False)
    shifted = pf.field(pts + 0.5, normalization="bidirectional", repulsion="nystrom", drift_norm=False)
    rms = lambda v: np.sqrt((v ** 2).sum(1).mean())  # noqa: E731
    assert rms(nys) < 0.05 * rms(shifted)
    assert rms(nys) < 0.5 * rms(exact_rep)


def two_classes(seed, sizes, classes, n_queries, d=3):
    """Two classes of positives 2 apart, queries between them alternating classes."""
    rng = np.random.default_rng(seed)
    pos = np.concatenate([rng.normal(size=(sizes[0], d)), rng.normal(size=(sizes[1], d)) + 2.0])
    x = rng.normal(size=(n_queries, d)) + 1.0
    return pos, np.repeat(classes, sizes), x, np.array(list(classes) * (n_queries // 2))


def test_nystrom_repulsion_class_shards():
    pos, plab, x, qlab = two_classes(17, (150, 120), (0, 1), 20)
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=25, method="uniform", ridge=1e-3,
                                      feature_scale=None, temperatures=(0.8,))
    V = pf.field(x, labels=qlab, normalization="bidirectional", repulsion="nystrom", drift_norm=False)
    for c in (0, 1):
        u = pf.shards[c].landmarks
        q = qlab == c
        np.testing.assert_allclose(V[q], dense_nystrom_both_sides(x[q], pos[plab == c], u, 0.8, "laplace", 1e-3),
                                   atol=1e-9, rtol=0)


def test_fallback_rows_use_the_landmarks_with_the_data_mass():
    rng = np.random.default_rng(9)
    pos = rng.normal(size=(40, 3))
    u = pos[::4]  # 10 landmarks, 4 data points each
    x = rng.normal(size=(12, 3))
    x[:3] += 40.0  # far from everything
    pf = dxfield.ProjectedField.build(pos, landmarks=u, ridge=1e-6, feature_scale=None, temperatures=(0.3, 1.0))
    pf.den_floor = 1.0  # every Nystrom sum "lost its digits": all rows fall back
    V = pf.field(x, normalization="bidirectional", drift_norm=False)
    assert pf.last_stats["attraction_fallback_rows"] == [12, 12]
    Vref, _ = ref.field(x, np.repeat(u, 4, axis=0), normalization="bidirectional", feature_scale=None,
                        drift_norm=False, temperatures=(0.3, 1.0))
    np.testing.assert_allclose(V, Vref, atol=1e-9 * np.abs(Vref).max(), rtol=0)


def test_far_queries_stay_finite_at_small_temperature():
    rng = np.random.default_rng(10)
    pos = rng.normal(size=(500, 8)).astype(np.float32)
    pf = dxfield.ProjectedField.build(pos, landmarks=64, method="kmeans", temperatures=(0.02, 0.05, 0.2))
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x[:5] += 30.0
    V = pf.field(x, normalization="bidirectional")
    assert V.dtype == np.float32 and np.isfinite(V).all()
    assert len(pf.last_stats["attraction_fallback_rows"]) == 3


def mode_pull(V, x, toward):
    """Mean cosine between the field and the direction to ``toward``."""
    d = toward[None, :] - x
    return float(np.mean((V * d).sum(1) / (np.linalg.norm(V, axis=1) * np.linalg.norm(d, axis=1))))


def test_queries_on_one_mode_are_pulled_toward_the_mode_none_of_them_is_near():
    # the reason for the bidirectional normalisation: a heavy mode A and a light mode B;
    # generated samples that all sit on A feel B through the boosted columns of B's data
    rng = np.random.default_rng(12)
    d = 16
    a_c, b_c = np.zeros(d), np.ones(d)
    pos = np.concatenate([a_c + rng.normal(size=(3000, d)) * 0.3,
                          b_c + rng.normal(size=(600, d)) * 0.3]).astype(np.float32)
    x = (a_c + rng.normal(size=(128, d)) * 0.3).astype(np.float32)
    pf = dxfield.ProjectedField.build(pos, landmarks=128, method="kmeans", temperatures=(0.2,))
    bidir = mode_pull(pf.field(x, normalization="bidirectional"), x, b_c)
    row = mode_pull(pf.field(x, normalization="row"), x, b_c)
    assert bidir > 0.4 and bidir > 1.5 * row
    # the exact fields over all the data show the same difference
    exact = {nz: mode_pull(dxfield.drift_field(x, pos, temperatures=(0.2,), feature_scale=pf.feature_scale,
                                               normalization=nz), x, b_c) for nz in ("bidirectional", "row")}
    assert exact["bidirectional"] > 1.5 * exact["row"]


def test_float32_matches_float64():
    rng = np.random.default_rng(13)
    pos = rng.normal(size=(2000, 12))
    x = rng.normal(size=(200, 12)) * 1.2
    kw = dict(landmarks=256, method="uniform", temperatures=(0.02, 0.05, 0.2))  # k-means may differ by dtype
    p64 = dxfield.ProjectedField.build(pos, dtype=np.float64, **kw)
    p32 = dxfield.ProjectedField.build(pos.astype(np.float32), **kw)
    V64 = p64.field(x, normalization="bidirectional")
    V32 = p32.field(x.astype(np.float32), normalization="bidirectional")
    assert V32.dtype == np.float32
    err = np.linalg.norm(V32 - V64) / np.linalg.norm(V64)
    assert err < 1e-4, err


def test_memory_budget_row_blocks_change_nothing():
    # the column pass and the product pass over several row blocks (distances recomputed)
    rng = np.random.default_rng(14)
    pos = rng.normal(size=(800, 6))
    x = rng.normal(size=(300, 6))
    big = dxfield.ProjectedField.build(pos, landmarks=100, method="uniform", temperatures=(0.05, 0.2))
    small = dxfield.ProjectedField.build(pos, landmarks=100, method="uniform", temperatures=(0.05, 0.2),
                                         memory_budget=400_000)
    np.testing.assert_allclose(small.field(x, normalization="bidirectional"),
                               big.field(x, normalization="bidirectional"), atol=1e-10, rtol=0)


def test_backends_agree(xp):
    rng = np.random.default_rng(15)
    pos = rng.normal(size=(1000, 8)).astype(np.float32)
    x = rng.normal(size=(128, 8)).astype(np.float32)
    host = dxfield.ProjectedField.build(pos, landmarks=64, method="uniform")
    dev = dxfield.ProjectedField.build(xp.asarray(pos), landmarks=64, method="uniform")
    sample = pos[::8]
    for kw in ({}, {"repulsion": "nystrom"}, {"pos_sample": sample}):
        dkw = {k: xp.asarray(v) if k == "pos_sample" else v for k, v in kw.items()}
        V = dev.field(xp.asarray(x), normalization="bidirectional", **dkw)
        assert namespace_of(V) == xp.__name__
        Vh = host.field(x, normalization="bidirectional", **kw)
        np.testing.assert_allclose(to_numpy(V), Vh, atol=2e-5 * np.abs(Vh).max(), rtol=0)


def test_argument_errors(points):
    x, pos = points
    pf = full_rank(pos, (0.2,), feature_scale=None)
    with pytest.raises(ValueError, match="normalization"):
        pf.field(x, normalization="column")
    with pytest.raises(ValueError, match="repulsion='exact'"):
        pf.field(x, x[:3], normalization="bidirectional", repulsion="nystrom")


# ---------------------------------------------------------------------------------------
# pos_sample: the residual correction from a sample of the data


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("drift_norm", [False, True])
@pytest.mark.parametrize("scale,temps", [(None, (0.3, 1.0)), (0.8, (0.02, 0.05, 0.2))])
@pytest.mark.parametrize("dim", [4, 24])  # 18 queries: more than D + 1 columns, then fewer (the other product order)
def test_the_whole_data_as_sample_gives_algorithm_2_whatever_the_landmarks(kernel, drift_norm, scale, temps, dim):
    rng = np.random.default_rng(20)
    pos = rng.normal(size=(120, dim)) / np.sqrt(dim / 4) + 0.4
    x = rng.normal(size=(18, dim)) / np.sqrt(dim / 4)
    pf = dxfield.ProjectedField.build(pos, landmarks=12, method="uniform", feature_scale=scale, temperatures=temps,
                                      kernel=kernel)  # 12 landmarks: a poor Nystrom approximation
    V = pf.field(x, normalization="bidirectional", drift_norm=drift_norm, pos_sample=pos)
    Vref, _ = ref.field(x, pos, normalization="bidirectional", kernel=kernel, feature_scale=scale,
                        drift_norm=drift_norm, temperatures=temps)
    np.testing.assert_allclose(V, Vref, atol=1e-9 * max(1.0, np.abs(Vref).max()), rtol=0)
    assert np.abs(pf.field(x, normalization="bidirectional", drift_norm=drift_norm) - Vref).max() > 1e-3


@pytest.mark.filterwarnings("ignore::dxfield.ClassesCombinedWarning")  # unlabelled on purpose
def test_the_whole_data_as_sample_with_class_shards():
    pos, plab, x, qlab = two_classes(21, (60, 50), (4, 7), 16)
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=8, method="uniform", feature_scale=0.7,
                                      temperatures=(0.05, 0.2))
    V = pf.field(x, labels=qlab, normalization="bidirectional", drift_norm=False, pos_sample=pos,
                 pos_sample_labels=plab)
    Vx = dxfield.drift_field(x, pos, labels=qlab, pos_labels=plab, normalization="bidirectional",
                             feature_scale=0.7, temperatures=(0.05, 0.2), drift_norm=False)
    np.testing.assert_allclose(V, Vx, atol=1e-9, rtol=0)
    # unconditional queries on the class cache: all shards block-diagonally, each corrected by its rows
    Vu = pf.field(x, normalization="bidirectional", drift_norm=False, pos_sample=pos, pos_sample_labels=plab)
    Vux, _ = ref.field(x, pos, normalization="bidirectional", feature_scale=0.7, drift_norm=False,
                       temperatures=(0.05, 0.2))
    np.testing.assert_allclose(Vu, Vux, atol=1e-9, rtol=0)


def test_the_corrected_sums_are_unbiased_and_vary_less_than_a_plain_sample():
    # E[estimate] = the sums over ALL the data; the Nystrom part removes most of the variance
    rng = np.random.default_rng(22)
    pos = rng.normal(size=(2000, 3))
    x = rng.normal(size=(10, 3)) * 0.7
    tau = 1.0
    pf = dxfield.ProjectedField.build(pos, landmarks=60, method="kmeans", feature_scale=None, temperatures=(tau,),
                                      ridge=1e-6)
    K = np.exp(ref.log_kernel(ref.distances(x, pos), tau, "laplace"))
    truth = (K / np.sqrt(K.sum(0))[None, :]).sum(1)  # sum_j k_ij c_j^{-1/2} over all the data
    B, draws = 100, 300
    corrected, plain = [], []
    for _ in range(draws):
        idx = rng.choice(2000, size=B, replace=False)
        (b, log_w, _), = corrected_attraction(pf, np, x, None, pos[idx], {None: np.arange(B)})[0]
        corrected.append(np.exp(log_w))
        plain.append(2000 / B * (K[:, idx] / np.sqrt(K[:, idx].sum(0))[None, :]).sum(1))
    corrected, plain = np.array(corrected), np.array(plain)
    stderr = corrected.std(0) / np.sqrt(draws)
    assert (np.abs(corrected.mean(0) - truth) < 4 * stderr + 1e-9 * truth).all()
    ratio = corrected.std(0) / plain.std(0)
    assert ratio.max() < 0.5 and ratio.mean() < 0.3, ratio


def test_pos_sample_errors():
    rng = np.random.default_rng(23)
    pos = rng.normal(size=(50, 3))
    x = rng.normal(size=(8, 3))
    pf = dxfield.ProjectedField.build(pos, landmarks=10, method="uniform")
    with pytest.raises(ValueError, match="pos_sample"):
        pf.field(x, pos_sample=pos[:10])  # row normalisation
    with pytest.raises(ValueError, match="pos_sample"):
        pf.field(x, normalization="bidirectional", repulsion="nystrom", pos_sample=pos[:10])
    with pytest.raises(ValueError, match="pos_sample"):
        pf.field(x, normalization="bidirectional", pos_sample=pos[:10, :2])
    bad = pos[:10].copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="pos_sample"):
        pf.field(x, normalization="bidirectional", pos_sample=bad)
    lab = np.repeat([0, 1], 25)
    pc = dxfield.ProjectedField.build(pos, labels=lab, landmarks=5, method="uniform")
    with pytest.raises(ValueError, match="pos_sample_labels"):
        pc.field(x, labels=np.zeros(8, int), normalization="bidirectional", pos_sample=pos[:10])


def test_the_whole_data_as_sample_with_a_single_class_cache():
    # one class shard: its sample rows are found by class, not taken as "all rows"
    rng = np.random.default_rng(24)
    pos, x, lab = rng.normal(size=(60, 3)), rng.normal(size=(10, 3)), np.full(60, 5)
    pf = dxfield.ProjectedField.build(pos, labels=lab, landmarks=6, method="uniform", feature_scale=0.9,
                                      temperatures=(0.2,))
    V = pf.field(x, labels=np.full(10, 5), normalization="bidirectional", drift_norm=False, pos_sample=pos,
                 pos_sample_labels=lab)
    Vref, _ = ref.field(x, pos, normalization="bidirectional", feature_scale=0.9, drift_norm=False,
                        temperatures=(0.2,))
    np.testing.assert_allclose(V, Vref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("path", ["block", "terms"])
def test_batched_class_groups_equal_the_loop_over_classes_fallback_rows_included(monkeypatch, path):
    """Many small class groups go through one stacked computation (docs/design.md sections 8.15, 8.37):
    the block of one exponential per entry, or (where its factors spread beyond range) the terms one
    temperature at a time.  Either must give what the loop over the classes gives, where some rows fall
    back too."""
    from dxfield import attraction

    rng = np.random.default_rng(21)
    classes = 6
    plab = rng.integers(0, classes, 900)
    pos = rng.normal(size=(900, 5)) + plab[:, None] * 0.7
    qlab = np.repeat(np.arange(classes), [9, 4, 7, 2, 12, 5])  # unequal groups: padding
    x = rng.normal(size=(len(qlab), 5)) * 2 + qlab[:, None] * 0.7
    # landmarks in close pairs: W^{-1} K_UY 1 has both signs, so some rows' Nystrom sums cancel
    u0 = rng.normal(size=(20, 5)) * 1.5 + 1.5
    u = np.concatenate([u0, u0 + 0.05 * rng.normal(size=u0.shape)])
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=u, ridge=1e-3, temperatures=(0.1, 0.3, 1.0))
    pf.den_floor = 0.99  # rows whose sums cancel by more than 1% fall back: some rows, not all
    stacked, blocks = [], []
    monkeypatch.setattr(attraction, "_nystrom_sums", lambda *a, f=attraction._nystrom_sums: stacked.append(1) or f(*a))
    real = attraction._NystromBlock.sums
    refuse = path == "terms"  # as if every temperature's factors spread beyond range
    monkeypatch.setattr(attraction._NystromBlock, "sums", lambda self, ks: blocks.append(list(ks)) or (
        dict.fromkeys(ks, (None, None)) if refuse else real(self, ks)))
    V = pf.field(x, labels=qlab, normalization="bidirectional")
    assert blocks == [[0, 1, 2]]  # the temperatures stacked
    assert len(stacked) == (3 if refuse else 0)  # the terms one temperature at a time only where refused
    batched_fallback = pf.last_stats["attraction_fallback_rows"]
    monkeypatch.setattr(attraction, "_batchable", lambda *a: False)
    Vloop = pf.field(x, labels=qlab, normalization="bidirectional")
    assert pf.last_stats["attraction_fallback_rows"] == batched_fallback
    assert 0 < sum(batched_fallback) < 3 * len(qlab), batched_fallback
    np.testing.assert_allclose(V, Vloop, rtol=1e-9, atol=1e-12 * np.abs(Vloop).max())


def test_batched_fallback_of_every_row_is_each_class_with_its_landmarks_repeated():
    pos, plab, x, qlab = two_classes(19, (48, 36), (0, 1), 14)
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=12, method="uniform", ridge=1e-6,
                                      feature_scale=None, temperatures=(0.3, 1.0))
    pf.den_floor = 1.0  # every Nystrom sum "lost its digits": all rows fall back, class by class
    V = pf.field(x, labels=qlab, normalization="bidirectional", drift_norm=False)
    assert pf.last_stats["attraction_fallback_rows"] == [14, 14]
    for c, reps in ((0, 4), (1, 3)):
        q = qlab == c
        Vc, _ = ref.field(x[q], np.repeat(pf.shards[c].landmarks, reps, axis=0), normalization="bidirectional",
                          feature_scale=None, drift_norm=False, temperatures=(0.3, 1.0))
        np.testing.assert_allclose(V[q], Vc, atol=1e-9 * np.abs(Vc).max(), rtol=0)
