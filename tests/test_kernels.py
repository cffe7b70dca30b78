"""Kernels and distances: ``pairwise_distances``, ``kernel_matrix``, ``kernel_matvec``.

* distances are accurate for near-duplicate points far from the origin in
  float32, where the textbook ``|x|^2 + |y|^2 - 2 x.y`` formula loses every
  digit (shown on the same data, so the test can fail); they are >= 0 and
  exactly 0 between identical points;
* ``kernel_matrix`` is the dense ``exp(-d/tau)`` / ``exp(-d^2/(2 tau^2))``,
  symmetric with a unit diagonal;
* ``kernel_matvec`` equals the dense float64 ``K @ w`` for vector and matrix
  ``w``, both kernels, default and tiny tiles, over the ``xp`` fixture.
"""

import numpy as np
import pytest

import dxfield
import reference as ref
from helpers import namespace_of, rel_err, to_numpy


def dense_kernel(x, y, tau, kernel):
    d = ref.distances(x, y)
    return np.exp(ref.log_kernel(d, tau, kernel))


@pytest.fixture(scope="module")
def far_near_duplicates():
    rng = np.random.default_rng(4)
    x = (1000.0 + rng.normal(size=(40, 16))).astype(np.float32)
    y = (x + 1e-3 * rng.normal(size=x.shape)).astype(np.float32)
    y = np.concatenate([y, (1000.0 + rng.normal(size=(25, 16))).astype(np.float32)])
    return x, y


def test_distances_of_near_duplicates_far_from_origin_are_accurate(xp, far_near_duplicates):
    x, y = far_near_duplicates
    d = dxfield.pairwise_distances(xp.asarray(x), xp.asarray(y))
    assert namespace_of(d) == xp.__name__ and d.dtype == np.float32
    exact = ref.distances(x, y)  # float64 distances of the very same float32 points
    relative = np.abs(to_numpy(d) - exact) / exact
    near = np.arange(len(x)), np.arange(len(x))  # the near-duplicate pairs, d ~ 4e-3
    assert exact[near].max() < 1e-2
    assert relative[near].max() < 1e-3
    assert relative.max() < 1e-3


def test_textbook_float32_formula_fails_on_the_same_data(far_near_duplicates):
    """Why the test above is meaningful: the naive product form is far off on these points."""
    x, y = far_near_duplicates
    with np.errstate(invalid="ignore"):
        naive = np.sqrt(np.maximum(
            (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T), np.float32(0)))
    exact = ref.distances(x, y)
    near = np.arange(len(x)), np.arange(len(x))
    assert (np.abs(naive[near] - exact[near]) / exact[near]).max() > 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distances_are_nonnegative_and_zero_on_identical_points(xp, dtype):
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(30, 7)) * 50 + 300).astype(dtype)
    x[5] = x[17]  # an exact duplicate inside x
    y = np.concatenate([x[:10], rng.normal(size=(5, 7)).astype(dtype)])
    d = to_numpy(dxfield.pairwise_distances(xp.asarray(x)))
    assert d.dtype == dtype and d.shape == (30, 30)
    assert (d >= 0).all()
    assert (np.diag(d) == 0).all()
    assert d[5, 17] == 0 and d[17, 5] == 0
    dxy = to_numpy(dxfield.pairwise_distances(xp.asarray(x), xp.asarray(y)))
    assert (dxy >= 0).all()
    assert (dxy[np.arange(10), np.arange(10)] == 0).all()
    assert rel_err(dxy, ref.distances(x, y)) < (1e-12 if dtype == np.float64 else 1e-5)


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_matrix_is_symmetric_with_unit_diagonal(xp, kernel, dtype):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(25, 4)).astype(dtype)
    k = to_numpy(dxfield.kernel_matrix(xp.asarray(x), kernel=kernel, tau=1.3))
    assert k.shape == (25, 25) and k.dtype == dtype
    assert (np.diag(k) == 1).all()
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(k, k.T, rtol=tol, atol=tol)
    assert ((k > 0) & (k <= 1)).all()
    np.testing.assert_allclose(k, dense_kernel(x, x, 1.3, kernel), rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_kernel_matrix_of_two_sets_matches_dense_formula(xp, kernel):
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(14, 3)) + 0.5
    k = dxfield.kernel_matrix(xp.asarray(x), xp.asarray(y), kernel=kernel, tau=0.7)
    assert k.shape == (9, 14)
    np.testing.assert_allclose(to_numpy(k), dense_kernel(x, y, 0.7, kernel), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("wshape", ["vector", "matrix"])
@pytest.mark.parametrize("block_size", [None, (1, 1), (3, 5), (40, 2), (7, 1000)], ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernel_matvec_equals_dense_product(xp, kernel, wshape, block_size, dtype):
    rng = np.random.default_rng(14)
    n, m, d = 23, 41, 5
    x = rng.normal(size=(n, d)).astype(dtype)
    y = (rng.normal(size=(m, d)) + 0.3).astype(dtype)
    w = rng.normal(size=(m,) if wshape == "vector" else (m, 3)).astype(dtype)
    s = dxfield.kernel_matvec(xp.asarray(x), xp.asarray(y), xp.asarray(w), kernel=kernel, tau=1.7,
                              block_size=block_size)
    assert namespace_of(s) == xp.__name__
    assert s.shape == ((n,) if wshape == "vector" else (n, 3)) and s.dtype == dtype
    dense = dense_kernel(x, y, 1.7, kernel) @ w.astype(np.float64)
    assert rel_err(s, dense) <= (1e-12 if dtype == np.float64 else 1e-5)


def test_kernel_matvec_under_a_budget_with_near_duplicates_far_away(far_near_duplicates):
    """The accurate-distance path inside tiles (many near-duplicates, several tiles)."""
    x, y = far_near_duplicates
    w = np.linspace(-1.0, 2.0, len(y))
    for block in [None, (6, 9)]:
        s = dxfield.kernel_matvec(x, y, w.astype(np.float32), tau=0.01, block_size=block)
        dense = dense_kernel(x, y, 0.01, "laplace") @ w
        assert rel_err(s, dense) <= 1e-3


def test_kernel_matvec_matches_kernel_matrix_product():
    rng = np.random.default_rng(15)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(30, 4))
    w = rng.normal(size=(30, 2))
    np.testing.assert_allclose(dxfield.kernel_matvec(x, y, w, tau=0.9, memory_budget="1MiB"),
                               dxfield.kernel_matrix(x, y, tau=0.9) @ w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stacked_distances_match_float64_per_set_near_duplicates_included(xp, dtype, far_near_duplicates):
    """``sqdist_stacked``: set g against set g, each entry as accurate as the refined 2-D distances."""
    from dxfield.kernels import sqdist_stacked

    x, y = far_near_duplicates
    rng = np.random.default_rng(12)
    xs = np.stack([x[:30], x[10:40], rng.normal(size=(30, 16)) * 3]).astype(dtype)
    ys = np.stack([y[:20], y[20:40], rng.normal(size=(20, 16))]).astype(dtype)
    d2 = to_numpy(sqdist_stacked(xp.asarray(xs), xp.asarray(ys)))
    assert d2.shape == (3, 30, 20) and d2.dtype == dtype
    for g in range(3):
        exact = ref.distances(xs[g], ys[g]) ** 2
        assert (np.abs(d2[g] - exact) <= 2e-3 * exact + 1e-30).all()
    # the near-duplicate pairs (set 0: x[i] against y[i] ~ 1e-3 apart, 1000 from the origin) were refined
    near = np.arange(20)
    assert d2[0][near, near].max() < 1e-3


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_stacked_distances_refine_a_few_near_duplicates_or_recentre_a_far_cluster(xp, offset):
    """Near the origin only the few near-duplicate pairs lose digits and are redone one by one; a cluster
    1e4 from the origin loses nearly all of them and is moved to its centre first: float32 distances
    accurate to float64's in both (product-form errors there would be ~1e-2 absolute at 1e4)."""
    from dxfield.kernels import sqdist_stacked

    rng = np.random.default_rng(21)
    xs = rng.normal(size=(4, 24, 40)) + offset
    ys = rng.normal(size=(4, 30, 40)) + offset
    ys[:, :3] = xs[:, :3] + 1e-4 * rng.normal(size=(4, 3, 40))  # three near-duplicate pairs per set
    xs, ys = xs.astype(np.float32), ys.astype(np.float32)
    d2 = to_numpy(sqdist_stacked(xp.asarray(xs), xp.asarray(ys)))
    for g in range(4):
        exact = ref.distances(xs[g], ys[g]) ** 2
        assert (np.abs(d2[g] - exact) <= 1e-3 * exact + 1e-30).all()
        assert d2[g][np.arange(3), np.arange(3)].max() < 1e-5  # the near-duplicates kept their ~6e-7


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stacked_distances_refine_only_inside_the_mask(xp, dtype, far_near_duplicates):
    """``sqdist_stacked(mask=)``: the masked-in near-duplicate pairs are refined as without a mask; the
    masked-out ones keep their cancelled value (the callers discard them)."""
    from dxfield.kernels import sqdist_stacked

    x, y = far_near_duplicates
    xs, ys = x[None, :20].astype(dtype), y[None, :20].astype(dtype)
    mask = np.ones((1, 20, 20), dtype=bool)
    mask[0, np.arange(10), np.arange(10)] = False  # the first ten near-duplicate pairs left out
    d2 = to_numpy(sqdist_stacked(xp.asarray(xs), xp.asarray(ys), xp.asarray(mask)))
    exact = ref.distances(xs[0], ys[0]) ** 2
    keep = mask[0]
    assert (np.abs(d2[0][keep] - exact[keep]) <= 2e-3 * exact[keep] + 1e-30).all()
    diag = np.arange(20)
    assert d2[0][diag[10:], diag[10:]].max() < 1e-3  # refined
    if dtype == np.float32:  # the product form loses these digits only in float32
        out = diag[:10], diag[:10]
        assert (np.abs(d2[0][out] - exact[out]) / exact[out]).max() > 2e-2  # not refined
