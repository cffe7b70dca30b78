"""dxtrain's sample-quality metrics (dxtrain/evaluate.py).

* two-sample distances (energy, MMD, sliced Wasserstein) are ~0 for two draws
  of one distribution and grow with a shift, in order, by clear margins;
  sliced Wasserstein is exact in 1-D, also for samples of different sizes;
* the Frechet distance equals the closed form for isotropic Gaussians
  (``||dmu||^2 + d (s1 - s2)^2``, exactly, with whitened samples) and the
  direct float64 formula ``Tr(Sa) + Tr(Sb) - 2 sum sqrt(eig(Sa Sb))``;
* precision/recall: real vs real high, mode collapse = high precision and low
  recall, noise = low precision;
* the digits classifier trains in seconds to > 90 % test accuracy, is cached
  (reused only for the same data and settings), leaves torch's RNG and thread
  settings alone; in its feature space real held-out digits are far closer
  to the training set than noise;
* ``evaluate_samples`` returns JSON-ready reports whose numbers sit near their
  floor for real data and far above it for bad samples; FID runs through
  torch-fidelity with weights from disk, and is skipped with a note otherwise.
"""

import json
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dxtrain.data import Dataset, load_dataset, train_test_split  # noqa: E402
from dxtrain.evaluate import (  # noqa: E402
    DigitsClassifier, energy_distance, evaluate_samples, frechet_distance, mmd_rbf, precision_recall,
    sliced_wasserstein, train_digits_classifier,
)

# --------------------------------------------------------------------------- two-sample distances

METRICS = [energy_distance, mmd_rbf, sliced_wasserstein]


@pytest.mark.parametrize("metric", METRICS, ids=lambda f: f.__name__)
def test_zero_for_same_distribution_and_ordered_by_shift(metric):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 3)), rng.normal(size=(600, 3))
    values = [metric(a, b + [shift, 0.0, 0.0]) for shift in (0.0, 0.5, 1.0, 2.0)]
    # same distribution: small next to the smallest shift; each larger shift clearly larger
    assert abs(values[0]) < 0.45 * values[1]
    assert values[1] * 1.5 < values[2] and values[2] * 1.2 < values[3]


def test_energy_and_mmd_accept_torch_and_images():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 1, 2, 2))
    assert energy_distance(torch.from_numpy(a), a.reshape(50, 4)) == pytest.approx(energy_distance(a, a))
    assert mmd_rbf(a, a + 3.0, bandwidths=[1.0]) > mmd_rbf(a, a + 1.0, bandwidths=[1.0]) > 0


def test_subsampling_is_seeded():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 0.3
    assert energy_distance(a, b, max_points=100, seed=5) == energy_distance(a, b, max_points=100, seed=5)
    assert energy_distance(a, b, max_points=100, seed=5) != energy_distance(a, b, max_points=100, seed=6)


def test_sliced_wasserstein_exact_in_1d():
    # quantile functions 0|1 at 1/2 vs 0|0.5|1 at 1/3, 2/3: W2^2 = 0.25/6 + 0.25/6 = 1/12
    assert sliced_wasserstein([[0.0], [1.0]], [[0.0], [0.5], [1.0]]) == pytest.approx(np.sqrt(1 / 12))
    x = np.random.default_rng(3).normal(size=(40, 1))
    assert sliced_wasserstein(x, x + 0.7) == pytest.approx(0.7)
    assert sliced_wasserstein(x, x[::-1]) == 0.0


def test_metric_errors_name_the_argument():
    with pytest.raises(ValueError, match="a has 3 features per sample but b has 2"):
        energy_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="b: contains 1 NaN"):
        mmd_rbf(np.zeros((4, 2)), np.array([[0.0, np.nan]] + [[0.0, 0.0]] * 3))
    with pytest.raises(ValueError, match="bandwidths"):
        mmd_rbf(np.zeros((4, 2)), np.ones((4, 2)), bandwidths=[-1.0])
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(np.zeros((4, 2)), np.ones((4, 2)), n_projections=0)


# --------------------------------------------------------------------------- Frechet distance


def _gaussian_sample(rng, n, mean, cov_root):
    """Samples whose sample mean is ``mean`` and sample covariance exactly ``cov_root @ cov_root.T``."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: cov(z) = I exactly
    return z @ cov_root.T + mean


def test_frechet_isotropic_closed_form():
    rng = np.random.default_rng(4)
    d = 5
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), 0.7, 1.9
    a = _gaussian_sample(rng, 200, mu1, s1 * np.eye(d))
    b = _gaussian_sample(rng, 300, mu2, s2 * np.eye(d))
    expected = np.sum((mu1 - mu2) ** 2) + d * (s1 - s2) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_direct_formula():
    rng = np.random.default_rng(5)
    d = 6
    a = rng.normal(size=(80, d)) @ rng.normal(size=(d, d)) + 1.0
    b = rng.normal(size=(120, d)) @ rng.normal(size=(d, d))
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # eig(Sa Sb) are real and >= 0 (similar to a PSD matrix); the trace of the root is sum sqrt(eig)
    tr_root = np.sum(np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)))
    mu = a.mean(0) - b.mean(0)
    expected = mu @ mu + np.trace(sa) + np.trace(sb) - 2 * tr_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------- precision / recall


def _ring(rng, n_per_mode, modes=range(8)):
    return np.concatenate([rng.normal(size=(n_per_mode, 2)) * 0.1 + [np.cos(t), np.sin(t)]
                           for t in np.asarray(list(modes)) * np.pi / 4])


def test_precision_recall_behaviour():
    rng = np.random.default_rng(6)
    real = _ring(rng, 150)
    good = precision_recall(real, _ring(rng, 150))
    collapsed = precision_recall(real, _ring(rng, 1200, modes=[0]))
    noise = precision_recall(real, rng.uniform(-3, 3, (1200, 2)))
    assert good["precision"] > 0.9 and good["recall"] > 0.9
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.25
    assert noise["precision"] < 0.25
    assert set(good) == {"precision", "recall", "k", "n_real", "n_fake"}


def test_precision_recall_exact_on_a_line():
    # 1-D points; k-th neighbour radii worked out by hand.
    real = np.array([0.0, 1.0, 3.0, 6.0, 10.0])[:, None]
    fake = np.array([13.5, 14.5, -2.5, -3.5])[:, None]
    # k=1: real radii 1,1,2,3,4 -> only 13.5 is inside; fake radii all 1 -> no real point inside
    assert precision_recall(real, fake, k=1)["precision"] == 0.25
    assert precision_recall(real, fake, k=1)["recall"] == 0.0
    # k=2: real radii 3,2,3,4,7 -> 13.5, 14.5, -2.5 inside; fake radii 16,17,16,17 cover all real
    assert precision_recall(real, fake, k=2)["precision"] == 0.75
    assert precision_recall(real, fake, k=2)["recall"] == 1.0


# --------------------------------------------------------------------------- digits classifier


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    train, test = train_test_split(load_dataset("digits"), test_fraction=0.2, seed=0)
    cache = str(tmp_path_factory.mktemp("classifier") / "digits.pt")
    model, accuracy = train_digits_classifier(train, test, seed=0, cache=cache)
    return types.SimpleNamespace(train=train, test=test, model=model, accuracy=accuracy, cache=cache)


def test_classifier_accuracy(digits):
    assert digits.accuracy > 0.9
    assert digits.model.accuracy(digits.test.x, digits.test.labels) == pytest.approx(digits.accuracy)
    feats = digits.model.features(torch.from_numpy(digits.test.x[:7]))
    assert feats.shape == (7, DigitsClassifier.FEATURES) and feats.dtype == np.float64


def test_classifier_feature_space_separates_real_from_noise(digits):
    rng = np.random.default_rng(7)
    f_train = digits.model.features(digits.train.x)
    f_test = digits.model.features(digits.test.x)
    f_noise = digits.model.features(rng.uniform(-1, 1, (len(digits.test), 1, 8, 8)))
    real_fd, noise_fd = frechet_distance(f_test, f_train), frechet_distance(f_noise, f_train)
    assert 20 * real_fd < noise_fd
    real_pr, noise_pr = precision_recall(f_train, f_test), precision_recall(f_train, f_noise)
    assert real_pr["precision"] > 0.8 and real_pr["recall"] > 0.8
    assert noise_pr["precision"] < 0.2 and noise_pr["recall"] < 0.2


def test_classifier_cache_reused_only_when_it_matches(digits, tmp_path):
    saved = torch.load(digits.cache, weights_only=True)
    assert saved["test_accuracy"] == digits.accuracy
    saved["test_accuracy"] = 0.123  # a marker only a load (not a retrain) can return
    marked = tmp_path / "c.pt"
    torch.save(saved, marked)
    again, accuracy = train_digits_classifier(digits.train, digits.test, seed=0, cache=str(marked))
    assert accuracy == 0.123
    for key, value in digits.model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)

    # other settings: retrain (1 epoch, quick) and overwrite the file
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    quick, quick_acc = train_digits_classifier(digits.train, digits.test, seed=0, epochs=1, cache=str(marked))
    assert quick_acc != 0.123 and not torch.equal(quick.head.weight, digits.model.head.weight)
    assert torch.load(marked, weights_only=True)["test_accuracy"] == quick_acc
    assert torch.equal(torch.get_rng_state(), rng_before) and torch.get_num_threads() == threads_before
    # a file that is not ours: retrain and replace it atomically
    (tmp_path / "junk.pt").write_bytes(b"junk")
    _, junk_acc = train_digits_classifier(digits.train, digits.test, epochs=1, cache=str(tmp_path / "junk.pt"))
    assert torch.load(tmp_path / "junk.pt", weights_only=True)["test_accuracy"] == junk_acc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "junk.pt"]  # no temporary files left


def test_classifier_rejects_unlabelled_or_wrong_shape():
    with pytest.raises(ValueError, match="labelled"):
        train_digits_classifier(Dataset("v", np.zeros((10, 2), np.float32), None, "vectors", 0))


# --------------------------------------------------------------------------- evaluate_samples


def test_evaluate_vectors_report():
    train, test = train_test_split(load_dataset("moons", n=3000, seed=0), seed=0)
    fresh = load_dataset("moons", n=600, seed=9).x  # new real samples
    good = evaluate_samples(fresh, train, test)
    bad = evaluate_samples(fresh + np.float32(0.5), train, test)
    json.dumps(good)
    assert (good["kind"], good["n_samples"], good["n_test"], good["n_nonfinite"]) == ("vectors", 600, 600, 0)
    for name in ("energy_distance", "mmd_rbf", "sliced_wasserstein"):
        floor = good["floor"][name]
        assert abs(good[name] - floor) < 0.3 * (bad[name] - floor), name
    assert "FD_digits" not in good and good["notes"] == []


def test_evaluate_counts_nonfinite_and_checks_shape():
    train, test = train_test_split(load_dataset("gaussians8", n=1000))
    samples = test.x.copy()
    samples[:3, 0] = np.nan
    report = evaluate_samples(torch.from_numpy(samples), train, test)
    assert report["n_nonfinite"] == 3 and report["n_samples"] == len(test)
    assert np.isfinite(report["energy_distance"])
    with pytest.raises(ValueError, match=r"samples shape \(5, 3\)"):
        evaluate_samples(np.zeros((5, 3)), train, test)
    with pytest.raises(ValueError, match="sample_labels has 2 entries for 4 samples"):
        evaluate_samples(np.zeros((4, 2)), train, test, sample_labels=[0, 1])
    empty = evaluate_samples(np.full((4, 2), np.nan), train, test)
    assert "energy_distance" not in empty and "metrics skipped" in empty["notes"][0]


def test_evaluate_digits_report(digits):
    rng = np.random.default_rng(8)
    real = evaluate_samples(digits.test.x, digits.train, digits.test, classifier_cache=digits.cache,
                            sample_labels=digits.test.labels)
    noise = evaluate_samples(rng.uniform(-1, 1, (500, 1, 8, 8)), digits.train, digits.test,
                             classifier_cache=digits.cache)
    json.dumps(real)
    json.dumps(noise)
    assert real["classifier_test_accuracy"] == digits.accuracy  # loaded from the cache
    # the same features by two routes: the singular covariances' square roots differ by ~1.5e-6 relative
    # (SciPy 1.17, NumPy 2.4), so the floor is matched to 1e-5
    assert real["FD_digits"] == pytest.approx(real["floor"]["FD_digits"], rel=1e-5)
    assert noise["FD_digits"] > 20 * noise["floor"]["FD_digits"]
    assert noise["fd_n"] == len(digits.test)
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert noise["precision"] < 0.2 and noise["recall"] < 0.2
    assert sum(real["sample_class_counts"]) == len(digits.test) and len(real["sample_class_counts"]) == 10
    assert real["sample_label_accuracy"] == pytest.approx(digits.accuracy)
    assert noise["energy_distance"] > 10 * abs(noise["floor"]["energy_distance"])
    assert any("FID skipped" in note for note in real["notes"])


def test_evaluate_fid_skipped_without_torch_fidelity(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    ds = Dataset("rgb", np.zeros((20, 3, 4, 4), np.float32), None, "images", 0)
    report = evaluate_samples(np.zeros((5, 3, 4, 4)), ds, ds, inception_weights=str(weights))
    assert "FID" not in report and any("torch-fidelity is not importable" in n for n in report["notes"])


def test_encoder_space_scores_for_any_images():
    # a fixed random projection stands in for the training encoder's pooled features
    rng = np.random.default_rng(11)
    proj = rng.normal(size=(3 * 4 * 4, 24))
    enc = lambda images: np.tanh(np.asarray(images, np.float64).reshape(len(images), -1) @ proj)  # noqa: E731
    ds = Dataset("rgb", np.tanh(rng.normal(size=(400, 3, 4, 4))).astype(np.float32), None, "images", 0)
    train, test = train_test_split(ds)
    good = evaluate_samples(np.tanh(rng.normal(size=(80, 3, 4, 4))), train, test, encoder_features=enc)
    bad = evaluate_samples(np.tanh(rng.normal(size=(80, 3, 4, 4)) + 1.5), train, test, encoder_features=enc)
    assert good["fd_encoder_n"] == 80 and "FD_encoder" in good["floor"]
    assert bad["FD_encoder"] > 5 * good["FD_encoder"]
    for key in ("precision", "recall"):
        assert 0 <= good[key] <= 1 and key in good["floor"]
    assert good["precision"] > bad["precision"]
    # the same fake set against the features it came from: FD 0 up to the float64 square root
    f = enc(train.x[:80])
    assert abs(frechet_distance(f, f)) < 1e-8
    assert "FD_encoder" not in evaluate_samples(np.tanh(rng.normal(size=(20, 3, 4, 4))), train, test)
