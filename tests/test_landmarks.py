"""Landmark selection: distinct real samples, reproducible, per class, and better than uniform where it should be."""

import numpy as np
import pytest

import dxfield
from dxfield.landmarks import METHODS, select
from reference import distances


def clustered(seed=0, n_clusters=12, dim=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 6
    sizes = rng.integers(10, 600, n_clusters)
    return np.concatenate([c + 0.4 * rng.normal(size=(s, dim)) for c, s in zip(centres, sizes)])


@pytest.mark.parametrize("method", METHODS)
def test_indices_are_distinct_valid_and_reproducible(xp, method):
    y = clustered(1)
    a = select(xp.asarray(y), 37, method=method, seed=3, tau=2.0)
    b = select(xp.asarray(y), 37, method=method, seed=3, tau=2.0)
    assert type(a).__module__.split(".")[0] == xp.__name__
    a = a.get() if hasattr(a, "get") else a
    b = b.get() if hasattr(b, "get") else b
    assert a.shape == (37,) and a.dtype == np.int64
    assert len(np.unique(a)) == 37
    assert a.min() >= 0 and a.max() < len(y)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_per_class_selection_stays_in_class(method):
    y = clustered(2)
    labels = np.random.default_rng(0).integers(0, 4, len(y))
    idx = select(y, 9, method=method, labels=labels, seed=0, tau=2.0)
    assert idx.shape == (36,)
    assert len(np.unique(idx)) == 36
    for c in range(4):
        assert (labels[idx[9 * c:9 * (c + 1)]] == c).all()


def test_kcenter_is_a_farthest_point_traversal():
    y = np.random.default_rng(4).normal(size=(300, 3))
    idx = select(y, 10, method="kcenter", seed=0)
    d = distances(y, y)
    for k in range(1, 10):
        mind = d[:, idx[:k]].min(axis=1)
        assert mind[idx[k]] == pytest.approx(mind.max(), rel=1e-4)


def test_kmeans_landmarks_are_near_cluster_centres():
    # every well-separated cluster gets a landmark when m equals the cluster count
    y = clustered(5, n_clusters=8)
    idx = select(y, 8, method="kmeans", seed=0)
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(8, 6)) * 6
    owner = distances(y[idx], centres).argmin(axis=1)
    assert len(set(owner.tolist())) == 8


def nystrom_error(y, idx, tau):
    phi = dxfield.Nystrom(tau=tau, ridge=1e-6).fit(y[idx]).transform(y)
    K = np.exp(-distances(y, y) / tau)
    return np.linalg.norm(phi @ phi.T - K) / np.linalg.norm(K)


def test_kmeans_and_rls_beat_uniform_on_clustered_data():
    y = clustered(6)
    tau, m = 3.0, 30
    err = {meth: np.mean([nystrom_error(y, select(y, m, method=meth, seed=s, tau=tau), tau) for s in range(3)])
           for meth in ("uniform", "kmeans", "rls")}
    assert err["kmeans"] < err["uniform"]
    assert min(err["kmeans"], err["rls"]) < 0.9 * err["uniform"]


def test_too_many_landmarks_and_bad_arguments():
    y = np.zeros((10, 2))
    with pytest.raises(ValueError, match="m=11"):
        select(y, 11)
    labels = np.array([0] * 8 + [1] * 2)
    with pytest.raises(ValueError, match="class 1"):
        select(np.random.default_rng(0).normal(size=(10, 2)), 3, labels=labels)
    with pytest.raises(ValueError, match="method"):
        select(y, 2, method="random-walk")
    with pytest.raises(ValueError, match="m must be >= 1"):
        select(y, 0)
    with pytest.raises(ValueError, match="labels"):
        select(y, 2, labels=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="y"):
        select(np.full((4, 2), np.inf), 2)


@pytest.mark.parametrize("n, m", [(0, 4), (1, 4), (50, 7), (2000, 128)])
def test_scatter_add_sums_rows_by_index(xp, n, m):
    """k-means' centre sums: every row added to its index's sum (repeated indices accumulate, unused ones stay),
    against a dense float64 one-hot product."""
    from dxfield.landmarks import _scatter_add
    rng = np.random.default_rng(n)
    idx = rng.integers(0, max(m - 2, 1), n)  # the last indices never occur
    values = rng.normal(size=(n, 5)).astype(np.float32)
    start = rng.normal(size=(m, 5)).astype(np.float32)
    out = xp.asarray(start.copy())
    _scatter_add(xp, out, xp.asarray(idx), xp.asarray(values))
    out = out.get() if hasattr(out, "get") else out
    onehot = np.zeros((n, m))
    onehot[np.arange(n), idx] = 1.0
    want = start + onehot.T @ values.astype(np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
