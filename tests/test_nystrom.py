"""Nystrom feature maps: exactness at full rank, error falling with m, spectrum diagnostics, errors."""

import warnings

import numpy as np
import pytest

import dxfield
from reference import distances


def dense_kernel(x, y, tau, kernel):
    d = distances(x, y)
    return np.exp(-d / tau) if kernel == "laplace" else np.exp(-(d ** 2) / (2 * tau ** 2))


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_all_points_as_landmarks_reproduce_the_kernel(xp, kernel):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5))
    ny = dxfield.Nystrom(kernel=kernel, tau=1.5, ridge=1e-12).fit(xp.asarray(x))
    phi = ny.transform(xp.asarray(x))
    assert type(phi).__module__.split(".")[0] == xp.__name__
    phi = phi.get() if hasattr(phi, "get") else phi
    assert phi.shape == (80, 80)
    np.testing.assert_allclose(phi @ phi.T, dense_kernel(x, x, 1.5, kernel), atol=1e-7)


def test_out_of_sample_kernel_is_projection_onto_landmarks():
    # phi(x).phi(y) = k(x,U) (K_UU + ridge I)^-1 k(U,y): compare with the formula in float64
    rng = np.random.default_rng(1)
    u, x, y = rng.normal(size=(30, 4)), rng.normal(size=(20, 4)), rng.normal(size=(25, 4))
    ridge = 1e-3
    ny = dxfield.Nystrom(tau=2.0, ridge=ridge).fit(u)
    approx = ny.approximate_kernel(x, y)
    expected = dense_kernel(x, u, 2.0, "laplace") @ np.linalg.solve(
        dense_kernel(u, u, 2.0, "laplace") + ridge * np.eye(30), dense_kernel(u, y, 2.0, "laplace"))
    np.testing.assert_allclose(approx, expected, atol=1e-10)


def test_error_falls_as_landmarks_grow():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 3))
    K = dense_kernel(x, x, 3.0, "gaussian")
    errs = []
    for m in (10, 40, 160):
        idx = dxfield.landmarks.select(x, m, method="uniform", seed=0)
        phi = dxfield.Nystrom(kernel="gaussian", tau=3.0, ridge=1e-8).fit(x[idx]).transform(x)
        errs.append(np.linalg.norm(phi @ phi.T - K) / np.linalg.norm(K))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.05 * errs[0]


def test_float32_is_default_and_float64_follows_input():
    x = np.random.default_rng(3).normal(size=(50, 3))
    assert dxfield.Nystrom().fit(x[:10]).transform(x).dtype == np.float64
    ny = dxfield.Nystrom().fit(x[:10].astype(np.float32))
    assert ny.transform(x.astype(np.float32)).dtype == np.float32
    assert ny.factor_.dtype == np.float32


def test_spectrum_diagnostics():
    x = np.random.default_rng(4).normal(size=(40, 3))
    ridge = 1e-3
    ny = dxfield.Nystrom(tau=1.0, ridge=ridge).fit(x)
    lam = np.linalg.eigvalsh(dense_kernel(x, x, 1.0, "laplace"))
    np.testing.assert_allclose(ny.eigenvalues_, lam + ridge, rtol=1e-9, atol=1e-12)
    assert ny.condition_number_ == pytest.approx((lam.max() + ridge) / (lam.min() + ridge), rel=1e-6)
    assert ny.effective_rank_ == pytest.approx((lam / (lam + ridge)).sum(), rel=1e-6)
    assert 0 < ny.effective_rank_ <= 40
    assert ny.n_clamped_ == 0


def test_ill_conditioned_gram_warns_and_clamps():
    # near-duplicate landmarks with a wide Gaussian: K_UU is numerically singular
    rng = np.random.default_rng(5)
    u = np.repeat(rng.normal(size=(5, 2)), 4, axis=0) + 1e-6 * rng.normal(size=(20, 2))
    with pytest.warns(dxfield.NystromConditioningWarning, match="condition number"):
        ny = dxfield.Nystrom(kernel="gaussian", tau=10.0, ridge=0.0, eig_clamp=1e-8).fit(u.astype(np.float32))
    assert ny.n_clamped_ > 0
    assert np.isfinite(ny.transform(u.astype(np.float32))).all()


def test_well_conditioned_fit_does_not_warn():
    x = np.random.default_rng(6).normal(size=(30, 3)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dxfield.NystromConditioningWarning)
        dxfield.Nystrom(tau=0.5, ridge=1e-4).fit(x)


def test_transform_in_blocks_matches_one_block():
    rng = np.random.default_rng(7)
    x, u = rng.normal(size=(3000, 16)).astype(np.float32), rng.normal(size=(64, 16)).astype(np.float32)
    full = dxfield.Nystrom(tau=4.0).fit(u).transform(x)
    small = dxfield.Nystrom(tau=4.0, memory_budget="300KiB").fit(u).transform(x)
    np.testing.assert_allclose(small, full, rtol=1e-5, atol=1e-6)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="tau"):
        dxfield.Nystrom(tau=0)
    with pytest.raises(ValueError, match="ridge"):
        dxfield.Nystrom(ridge=-1)
    with pytest.raises(ValueError, match="kernel"):
        dxfield.Nystrom(kernel="cosine")
    with pytest.raises(RuntimeError, match="fit"):
        dxfield.Nystrom().transform(np.zeros((2, 2)))
    ny = dxfield.Nystrom().fit(np.random.default_rng(0).normal(size=(5, 3)))
    with pytest.raises(ValueError, match="features"):
        ny.transform(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="landmarks"):
        dxfield.Nystrom().fit(np.array([[0.0, np.nan]]))
