"""How close are generated samples to the real data? Metrics for dxtrain runs.

Two-sample distances between generated samples and held-out real data, all in
float64 on the CPU and all returning plain Python floats:

* :func:`energy_distance` -- ``2 E|A-B| - E|A-A'| - E|B-B'|``;
* :func:`mmd_rbf` -- squared maximum mean discrepancy, Gaussian kernels;
* :func:`sliced_wasserstein` -- Wasserstein-2 averaged over random 1-D
  projections;
* :func:`frechet_distance` -- the Frechet distance of Gaussians fitted to two
  feature sets (the formula behind FID);
* :func:`precision_recall` -- k-NN manifold precision and recall
  (Kynkaanniemi et al., 2019);
* :func:`mixture_quality` -- for data with a known Gaussian-mixture density
  (the embedded ``"mixture"``): energy distance to fresh samples of the truth,
  per-mode mass error, mode coverage and the share of samples inside a mode.

For the embedded 8x8 digits, :class:`dxtrain.classifier.DigitsClassifier`
(importable from here too) is a small CNN trained in seconds on the training
split; its penultimate layer is the feature space of ``FD_digits``, our
embedded analogue of FID. :func:`evaluate_samples`
puts it together and also reports a *floor*: the same metrics for real
held-out data, i.e. what a perfect generator would score at the same sample
size. Everything it returns is JSON-ready.

The report of :func:`evaluate_samples` always holds ``dataset``, ``kind``,
``n_samples``, ``n_nonfinite``, ``n_train``, ``n_test``, ``notes`` and, on
flattened samples vs ``test``, ``energy_distance``, ``mmd_rbf``,
``sliced_wasserstein``.  Data with a known density (``train.truth``, the
embedded ``"mixture"``) add the scores of :func:`mixture_quality`
(``truth_energy_distance``, ``mode_tv``, ``modes_covered``, ``modes_missed``,
``in_mode_fraction``, ``rare_mode_mass_ratio``).  Labelled 1x8x8 images (the
digits) add ``FD_digits`` (classifier features, samples vs ``train``),
``precision``/``recall`` (k=3, vs ``train``), ``classifier_test_accuracy``,
``sample_class_counts``.  ``floor`` holds the same metrics for real data in
the samples' place (a ``train`` subsample vs ``test`` for the distances;
``test`` vs ``train`` for the FD and precision/recall) at the same sample
size, since every metric here is biased by sample size: compare a run's
numbers with its floor, not with 0.  FD_digits uses ``fd_n = min(n_samples,
n_test)`` points on both sides of the comparison for that reason.

Example
-------
>>> from dxtrain.data import load_dataset, train_test_split
>>> train, test = train_test_split(load_dataset("moons", n=4000))
>>> report = evaluate_samples(test.x + 0.5, train, test)
>>> report["energy_distance"] > report["floor"]["energy_distance"]
True
"""

from __future__ import annotations

import os
import time

import numpy as np
import scipy.linalg
import scipy.stats

from dxtrain import inception, models, rundir
from dxtrain.classifier import DigitsClassifier, train_digits_classifier
from dxtrain.data import Dataset
from dxtrain.featcache import cache_home

__all__ = [
    "energy_distance", "mmd_rbf", "sliced_wasserstein", "frechet_distance", "precision_recall",
    "DigitsClassifier", "train_digits_classifier", "evaluate_samples", "mixture_quality",
]

MAX_POINTS = 2000  # pairwise metrics subsample to this many points per set (O(n^2) memory and time)


# --------------------------------------------------------------------------- helpers


def _points(a, name: str, min_points: int = 2) -> np.ndarray:
    """Any array-like or torch tensor -> float64 ``(N, D)``, samples flattened."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim < 2:
        raise ValueError(f"{name}: expected an array of samples (N, ...), got shape {a.shape}")
    a = a.reshape(len(a), -1)
    if len(a) < min_points:
        raise ValueError(f"{name}: needs at least {min_points} samples, got {len(a)}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains {int(np.count_nonzero(~np.isfinite(a)))} NaN/Inf value(s)")
    return a


def _pair(a, b, names=("a", "b"), min_points: int = 2):
    a, b = _points(a, names[0], min_points), _points(b, names[1], min_points)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} has {a.shape[1]} features per sample but {names[1]} has {b.shape[1]}")
    return a, b


def _subsample(a: np.ndarray, max_points: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_points is None or len(a) <= max_points:
        return a
    return a[np.sort(rng.choice(len(a), size=int(max_points), replace=False))]


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def _offdiag_mean(m: np.ndarray) -> float:
    n = len(m)
    return float((m.sum() - np.trace(m)) / (n * (n - 1)))


# --------------------------------------------------------------------------- two-sample metrics


def energy_distance(a, b, *, max_points: int | None = MAX_POINTS, seed: int = 0) -> float:
    """Energy distance ``2 E|A-B| - E|A-A'| - E|B-B'|`` between two samples.

    The unbiased U-statistic: ``E|A-A'|`` and ``E|B-B'|`` average over pairs
    of *distinct* points, so for two samples of one distribution the value
    scatters around 0 and can be slightly negative. Each set is randomly
    subsampled (with ``seed``) to at most ``max_points`` points. Samples are
    flattened; inputs may be NumPy arrays or torch tensors.
    """
    rng = np.random.default_rng(seed)
    a, b = _pair(a, b)
    a, b = _subsample(a, max_points, rng), _subsample(b, max_points, rng)
    ab = np.sqrt(_sq_distances(a, b)).mean()
    aa = _offdiag_mean(np.sqrt(_sq_distances(a, a)))
    bb = _offdiag_mean(np.sqrt(_sq_distances(b, b)))
    return float(2.0 * ab - aa - bb)


def mmd_rbf(a, b, bandwidths=None, *, max_points: int | None = MAX_POINTS, seed: int = 0) -> float:
    """Squared MMD with a sum of Gaussian kernels (unbiased U-statistic).

    ``k(x, y) = mean_s exp(-||x - y||^2 / (2 s^2))`` over the bandwidths
    ``s``; by default ``s = h * (0.5, 1, 2)`` with ``h`` the median pairwise
    distance of the pooled samples (median heuristic). Like
    :func:`energy_distance`, ~0 (possibly slightly negative) for one
    distribution, and subsampled to ``max_points`` per set.
    """
    rng = np.random.default_rng(seed)
    a, b = _pair(a, b)
    a, b = _subsample(a, max_points, rng), _subsample(b, max_points, rng)
    aa, bb, ab = _sq_distances(a, a), _sq_distances(b, b), _sq_distances(a, b)
    if bandwidths is None:
        pooled = np.concatenate([aa[np.triu_indices(len(a), 1)], bb[np.triu_indices(len(b), 1)], ab.ravel()])
        median = float(np.sqrt(np.median(pooled)))
        bandwidths = [median * f for f in (0.5, 1.0, 2.0)] if median > 0 else [1.0]
    bandwidths = [float(s) for s in np.atleast_1d(bandwidths)]
    if not bandwidths or any(not (np.isfinite(s) and s > 0) for s in bandwidths):
        raise ValueError(f"bandwidths={bandwidths!r}: expected positive numbers")

    def kernel(d2):
        return sum(np.exp(-d2 / (2.0 * s * s)) for s in bandwidths) / len(bandwidths)

    return float(_offdiag_mean(kernel(aa)) + _offdiag_mean(kernel(bb)) - 2.0 * kernel(ab).mean())


def sliced_wasserstein(a, b, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance ``sqrt(mean_theta W2^2(a.theta, b.theta))``.

    ``n_projections`` random unit directions (drawn with ``seed``); each 1-D
    W2 is computed exactly between the two empirical distributions (the
    sizes may differ: the quantile functions are compared piecewise). No
    subsampling -- the cost is a sort per direction.
    """
    if int(n_projections) != n_projections or n_projections < 1:
        raise ValueError(f"n_projections={n_projections!r}: expected a positive integer")
    a, b = _pair(a, b, min_points=1)
    directions = np.random.default_rng(seed).standard_normal((a.shape[1], int(n_projections)))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    pa, pb = np.sort(a @ directions, axis=0), np.sort(b @ directions, axis=0)
    n, m = len(pa), len(pb)
    # Breakpoints of both empirical quantile functions; on each piece both are constant.
    edges = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(np.concatenate([[0.0], edges]))
    mids = edges - widths / 2
    ia = np.minimum((mids * n).astype(np.int64), n - 1)
    ib = np.minimum((mids * m).astype(np.int64), m - 1)
    w2 = (widths[:, None] * (pa[ia] - pb[ib]) ** 2).sum(axis=0)
    return float(np.sqrt(w2.mean()))


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with sample
    covariances (``ddof=1``), in float64. The trace of the matrix square root
    is computed from the symmetric form ``S_a^{1/2} S_b S_a^{1/2}`` (same
    eigenvalues as ``S_a S_b``) with :func:`scipy.linalg.eigh`, which suits
    these symmetric positive semi-definite (often singular) matrices; negative
    round-off eigenvalues are clipped, and so is the result at 0.
    """
    a, b = _pair(feats_a, feats_b, names=("feats_a", "feats_b"))
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # driver "evd" (divide and conquer): on singular feature covariances the default "evr" moves the
    # result by ~1e-6 relative between float32 and float64 copies of the same features
    w, v = scipy.linalg.eigh(sa, driver="evd")
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # the PSD square root of S_a
    middle = root_a @ sb @ root_a
    eig = scipy.linalg.eigh((middle + middle.T) / 2, eigvals_only=True, driver="evd")
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    return max(0.0, float(mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * tr_covmean))


def precision_recall(real_feats, fake_feats, k: int = 3, *, max_points: int | None = MAX_POINTS,
                     seed: int = 0) -> dict:
    """Improved precision and recall (Kynkaanniemi et al., 2019).

    Each set's manifold is the union of balls around its points with radius
    the distance to the point's ``k``-th nearest neighbour in the same set.
    Precision is the fraction of fake samples inside the real manifold
    (quality); recall the fraction of real samples inside the fake manifold
    (coverage). Each set is subsampled to ``max_points``.

    Returns ``{"precision", "recall", "k", "n_real", "n_fake"}``.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k={k!r}: expected a positive integer")
    k = int(k)
    rng = np.random.default_rng(seed)
    real, fake = _pair(real_feats, fake_feats, names=("real_feats", "fake_feats"), min_points=k + 1)
    real, fake = _subsample(real, max_points, rng), _subsample(fake, max_points, rng)

    def radii(x):
        d = np.sqrt(_sq_distances(x, x))
        return np.partition(d, k, axis=1)[:, k]  # column 0 is the point itself

    cross = np.sqrt(_sq_distances(real, fake))  # n_real x n_fake
    precision = float(np.mean(np.any(cross <= radii(real)[:, None], axis=0)))
    recall = float(np.mean(np.any(cross <= radii(fake)[None, :], axis=1)))
    return {"precision": precision, "recall": recall, "k": k, "n_real": len(real), "n_fake": len(fake)}


# --------------------------------------------------------------------------- known mixture


def _mean_distance(a: np.ndarray, b: np.ndarray | None = None, block: int = 1024) -> float:
    """Mean ``||a_i - b_j||`` over all pairs, or over distinct pairs of ``a`` when ``b`` is None; in blocks."""
    other = a if b is None else b
    o2 = (other * other).sum(1)
    total = 0.0
    for i in range(0, len(a), block):
        ai = a[i:i + block]
        d = np.sqrt(np.maximum((ai * ai).sum(1)[:, None] + o2[None, :] - 2.0 * (ai @ other.T), 0.0))
        if b is None:
            d[np.arange(len(ai)), i + np.arange(len(ai))] = 0.0  # self pairs
        total += float(d.sum())
    pairs = len(a) * len(other) - (len(a) if b is None else 0)
    return total / pairs


_TRUTH_CACHE: dict = {}


def _truth_reference(truth, n_truth: int, n: int, seed: int) -> dict:
    """Fresh truth samples (``n_truth``), their mean pairwise distance, and the floor at sample size ``n``.

    Cached: the benchmark scores many checkpoints against the same reference.
    """
    key = (truth.fingerprint(), int(n_truth), int(n), int(seed))
    if key not in _TRUTH_CACHE:
        rng = np.random.default_rng([int(seed), 0x7D1])  # never the stream the training data came from
        y, _ = truth.sample(n_truth, rng)
        yy = _mean_distance(y)
        _TRUTH_CACHE.clear()  # one reference at a time is all anyone needs
        _TRUTH_CACHE[key] = {"y": y, "yy": yy}
        floor_x, _ = truth.sample(n, rng)  # a perfect generator's score at this sample size
        _TRUTH_CACHE[key]["floor"] = _mixture_scores(floor_x, truth, y, yy)
    return _TRUTH_CACHE[key]


def _mixture_scores(x: np.ndarray, truth, y: np.ndarray, yy: float) -> dict:
    k = truth.num_modes
    energy = 2.0 * _mean_distance(x, y) - _mean_distance(x) - yy
    modes, d2 = truth.nearest_mode(x)
    mass = np.bincount(modes, minlength=k) / len(x)
    w = np.asarray(truth.weights)
    rare = np.argsort(w, kind="stable")[:max(1, k // 4)]
    return {
        "truth_energy_distance": float(energy),
        "mode_tv": float(0.5 * np.abs(mass - w).sum()),
        "modes_covered": int(np.count_nonzero(mass >= 0.5 * w)),
        "modes_missed": int(np.count_nonzero(mass == 0)),
        "in_mode_fraction": float(np.mean(d2 <= scipy.stats.chi2.ppf(0.99, truth.dim))),
        "rare_mode_mass_ratio": float(mass[rare].sum() / w[rare].sum()),
    }


def mixture_quality(samples, truth, *, n_truth: int = 8000, seed: int = 0) -> dict:
    """Score samples against a known :class:`dxtrain.data.GaussianMixture`; a JSON-ready dict.

    * ``truth_energy_distance`` (the primary scalar, lower is better): the
      energy distance between the samples and ``n_truth`` fresh samples of the
      truth, with U-statistics (``E|X-X'|`` over distinct pairs, all points,
      no subsampling; computed in blocks);
    * ``mode_tv``: total variation between the samples' mode histogram and the
      true weights, each sample assigned to its nearest mode in units of that
      mode's width (``argmin_k ||x - mu_k||^2 / sigma_k^2``); 0 is perfect,
      1 means all mass on the wrong modes;
    * ``modes_covered``: modes that receive at least half their true mass
      (of ``num_modes``); ``modes_missed``: modes that receive no sample;
    * ``in_mode_fraction``: share of samples within the 99 % chi-squared
      radius of their nearest mode (0.99 for the truth itself);
    * ``rare_mode_mass_ratio``: mass on the lightest quarter of the modes
      divided by its true mass (1 is right; mode dropping shows as < 1).

    ``floor`` holds the same scores for a fresh truth sample of the same size
    as ``samples``: every score is biased by sample size, so compare with the
    floor, not with 0.  The reference samples come from ``seed`` (a stream
    separate from the training data's) and are cached between calls.
    """
    if int(n_truth) != n_truth or n_truth < 2:
        raise ValueError(f"n_truth={n_truth!r}: expected an integer >= 2")
    x = _points(samples, "samples")
    if x.shape[1] != truth.dim:
        raise ValueError(f"samples have {x.shape[1]} features per sample; the mixture has {truth.dim}")
    ref = _truth_reference(truth, int(n_truth), len(x), seed)
    out = _mixture_scores(x, truth, ref["y"], ref["yy"])
    out.update(n=len(x), n_truth=int(n_truth), num_modes=truth.num_modes, floor=dict(ref["floor"]))
    return out


# --------------------------------------------------------------------------- the report


def _distances(a: np.ndarray, b: np.ndarray, max_points: int, seed: int) -> dict:
    return {
        "energy_distance": energy_distance(a, b, max_points=max_points, seed=seed),
        "mmd_rbf": mmd_rbf(a, b, max_points=max_points, seed=seed),
        "sliced_wasserstein": sliced_wasserstein(a, b, seed=seed),
    }


def _digits_scores(samples, sample_labels, train: Dataset, test: Dataset, report: dict, floor: dict, *,
                   rng: np.random.Generator, seed: int, max_points: int, classifier_cache: str | None) -> None:
    """Add the digits classifier's scores (FD_digits, precision/recall, class counts) to ``report``, ``floor``."""
    t0 = time.perf_counter()
    model, accuracy = train_digits_classifier(train, test, seed=seed, cache=classifier_cache)
    report["classifier_seconds"] = round(time.perf_counter() - t0, 3)
    report["classifier_test_accuracy"] = accuracy
    f_train, f_test, f_fake = model.features(train.x), model.features(test.x), model.features(samples)
    fd_n = min(len(samples), len(test))
    report["fd_n"] = fd_n
    report["FD_digits"] = frechet_distance(_subsample(f_fake, fd_n, rng), f_train)
    floor["FD_digits"] = frechet_distance(f_test, f_train)
    pr = precision_recall(f_train, f_fake, k=3, max_points=max_points, seed=seed)
    pr_floor = precision_recall(f_train, f_test, k=3, max_points=max_points, seed=seed)
    report.update(precision=pr["precision"], recall=pr["recall"])
    floor.update(precision=pr_floor["precision"], recall=pr_floor["recall"])
    predicted = model.predict(samples.astype(np.float32))
    report["sample_class_counts"] = [int(c) for c in np.bincount(predicted, minlength=train.num_classes)]
    if sample_labels is not None:
        report["sample_label_accuracy"] = float(np.mean(predicted == sample_labels))


def evaluate_samples(samples, train: Dataset, test: Dataset, *, classifier_cache: str | None = None,
                     seed: int = 0, max_points: int = MAX_POINTS, sample_labels=None,
                     inception_weights: str | None = None, device: str = "cpu", encoder_features=None) -> dict:
    """Score generated ``samples`` against real data; a JSON-ready dict.

    Parameters
    ----------
    samples : array (N, *train.shape) (NumPy or torch)
        Generated samples in the data's units (images in ``[-1, 1]``).
        Samples with NaN/Inf are counted (``n_nonfinite``) and left out.
    train, test : Dataset
        The training split and the held-out split.
    classifier_cache : str, optional
        Where the digits classifier's weights are cached (see
        :func:`train_digits_classifier`).
    seed : int
        Seed of every subsample and projection.
    max_points : int
        Cap on the points per set of the pairwise metrics.
    sample_labels : array (N,), optional
        Class indices the samples were generated for (class-conditional
        generators); digits only: adds ``sample_label_accuracy``.
    inception_weights : str, optional
        Path to torch-fidelity's InceptionV3 weights
        (``weights-inception-2015-12-05-6726825d.pth``); with torch-fidelity
        importable, adds standard ``FID`` (pool-3 features, samples vs
        ``train``), ``KID`` and, for RGB images, ``IS`` (torch-fidelity's). Never downloads; otherwise a
        note says why they were skipped, and a file that does not hold those weights is a ValueError.
    device : str
        Device for the Inception network.
    encoder_features : callable, optional
        Images (N, C, H, W) in ``[-1, 1]`` -> features (N, F): the training encoder's pooled features
        (:meth:`dxtrain.features.FeatureGroups.pooled`); images then add ``FD_encoder`` and, except the
        digits (whose classifier gives them), k-NN ``precision``/``recall`` in that space.

    Returns
    -------
    dict
        The report described in this module's docstring ("The report").
    """
    samples, sample_labels = _checked_samples(samples, sample_labels, train, test)
    finite = np.all(np.isfinite(samples.reshape(len(samples), -1)), axis=1)
    report: dict = {
        "dataset": train.name, "kind": train.kind, "n_samples": int(len(samples)),
        "n_nonfinite": int(np.count_nonzero(~finite)), "n_train": len(train), "n_test": len(test), "notes": [],
    }
    samples = samples[finite]
    if len(samples) < 2:
        report["notes"].append(f"metrics skipped: {len(samples)} finite sample(s), need at least 2")
        return report
    if sample_labels is not None:
        sample_labels = sample_labels[finite]

    rng = np.random.default_rng(seed)
    n = min(len(samples), max_points)
    fake = _subsample(samples, n, rng)
    floor_real = np.asarray(_subsample(train.x, min(n, len(train)), rng), dtype=np.float64)  # only the rows used
    test_x = np.asarray(test.x)  # uint8 images (dxtrain.pixels) are read here
    report.update(_distances(fake, test_x, max_points, seed))
    floor = _distances(floor_real, test_x, max_points, seed)

    digits_like = train.kind == "images" and train.shape == (1, 8, 8) and train.labels is not None \
        and test.labels is not None
    if digits_like and len(samples) < 4:
        report["notes"].append(f"FD_digits skipped: {len(samples)} finite samples, need at least 4")
    elif digits_like:
        _digits_scores(samples, sample_labels, train, test, report, floor, rng=rng, seed=seed,
                       max_points=max_points, classifier_cache=classifier_cache)
    elif train.kind == "images":
        report["notes"].append("FD_digits skipped: needs labelled 1x8x8 images")
    _truth_scores(samples, train, report, floor, seed)
    if encoder_features is not None and train.kind == "images":
        _encoder_scores(fake, train, test, report, floor, rng=rng, max_points=max_points, seed=seed,
                        encoder_features=encoder_features, precision_recall_too=not digits_like)
    _fid_scores(fake, train, test, report, floor, rng=rng, max_points=max_points,
                inception_weights=inception_weights, device=device, seed=seed)
    report["floor"] = floor
    return report


def _truth_scores(samples, train: Dataset, report: dict, floor: dict, seed: int) -> None:
    """:func:`mixture_quality` for data with a known density (the embedded "mixture")."""
    if getattr(train, "truth", None) is None:
        return
    scores = mixture_quality(samples.reshape(len(samples), -1), train.truth, seed=seed)
    for key in ("n", "n_truth", "num_modes"):
        scores.pop(key)
    floor.update(scores.pop("floor"))
    report.update(scores)


def _checked_samples(samples, sample_labels, train: Dataset, test: Dataset):
    """``samples`` as float64 NumPy of the data's shape, and their labels, checked against the data."""
    if hasattr(samples, "detach"):
        samples = samples.detach().cpu().numpy()
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim < 2 or (samples.shape[1:] != train.shape and samples.shape[1:] != (train.dim,)):
        raise ValueError(f"samples shape {samples.shape}: expected (N, {', '.join(map(str, train.shape))}) "
                         f"like the training data {train.name!r}")
    if train.shape != test.shape:
        raise ValueError(f"train samples have shape {train.shape} but test samples {test.shape}")
    samples = samples.reshape((len(samples),) + train.shape)
    if sample_labels is not None:
        sample_labels = np.asarray(sample_labels).reshape(-1)
        if len(sample_labels) != len(samples):
            raise ValueError(f"sample_labels has {len(sample_labels)} entries for {len(samples)} samples")
    return samples, sample_labels


def _fid_scores(fake, train: Dataset, test: Dataset, report: dict, floor: dict, *, rng, max_points: int,
                inception_weights, device, seed: int = 0) -> None:
    """FID, KID and (RGB) IS of :func:`dxtrain.inception.inception_scores` where torch-fidelity can run them:
    samples vs ``train``, floors ``test`` vs ``train``; otherwise a note saying why not."""
    why_not = inception.unavailable(inception_weights, train.kind, train.shape[0] if train.kind == "images" else 0)
    if why_not is None:
        real = np.asarray(_subsample(train.x, max_points, rng))
        held_out = np.asarray(_subsample(test.x, len(fake), rng))
        scores, floors, notes = inception.inception_scores(fake, real, held_out, weights=inception_weights,
                                                           device=device, seed=seed)
        report.update(scores)
        floor.update(floors)
        report["notes"] += notes
    elif inception_weights is not None or train.kind == "images":
        report["notes"].append(why_not)


def _encoder_scores(fake, train: Dataset, test: Dataset, report: dict, floor: dict, *, rng, max_points: int,
                    seed: int, encoder_features, precision_recall_too: bool) -> None:
    """``FD_encoder`` (and, unless the digits classifier gave them, k-NN ``precision``/``recall``, k=3) in the
    training encoder's pooled feature space, samples vs ``train``; floors: ``test`` vs ``train``."""
    f_train = encoder_features(np.asarray(_subsample(train.x, max_points, rng)))
    f_fake = encoder_features(fake)
    f_test = encoder_features(np.asarray(_subsample(test.x, len(fake), rng)))
    report["FD_encoder"] = frechet_distance(f_fake, f_train)
    floor["FD_encoder"] = frechet_distance(f_test, f_train)
    report["fd_encoder_n"] = len(fake)
    if precision_recall_too:
        pr = precision_recall(f_train, f_fake, k=3, max_points=max_points, seed=seed)
        pr_floor = precision_recall(f_train, f_test, k=3, max_points=max_points, seed=seed)
        report.update(precision=pr["precision"], recall=pr["recall"])
        floor.update(precision=pr_floor["precision"], recall=pr_floor["recall"])


# --------------------------------------------------------------------------- a run's final evaluation


MAIN_SCORES = ("FD_digits", "FID", "FD_encoder", "truth_energy_distance", "energy_distance")
"""A run's main score, the first of these a report holds (all lower-is-better): what keeps the best checkpoint."""


def main_score(report: dict) -> tuple[str, float] | None:
    """``(name, value)`` of the report's main score (:data:`MAIN_SCORES`), or None when it holds none."""
    for name in MAIN_SCORES:
        value = report.get(name)
        if value is not None and np.isfinite(value):
            return name, float(value)
    return None


def classifier_cache() -> str:
    """Where the evaluation caches its digits classifier: ``$DXTRAIN_CACHE`` or ``~/.cache/dxtrain``."""
    return os.path.join(cache_home(), "digits_classifier.pt")


def default_samples(train_ds: Dataset, test_ds: Dataset) -> int:
    """Samples a run's evaluation draws by default: 2000 for vectors, twice the test split for images."""
    return 2000 if train_ds.kind == "vectors" else 2 * len(test_ds)


def evaluate_run(model, train_ds: Dataset, test_ds: Dataset, num_classes: int, device, *, folder: str, step: int,
                 wall: float, field: str, seed: int = 0, n: int | None = None, alpha: float | None = None,
                 **options) -> dict:
    """Evaluate ``n`` samples of ``model`` against the held-out data and write ``eval.json``.

    The final evaluation of :func:`train` and ``dxtrain eval``: ``n`` defaults to 2000 for
    vectors and twice the test split for images, drawn with ``seed + 7``; ``options`` go to
    :func:`dxtrain.evaluate.evaluate_samples`; ``alpha``: the guidance scale of a generator trained with
    guidance (recorded as ``cfg_scale``).  Returns the report.
    """
    n = n or default_samples(train_ds, test_ds)
    x = models.generate(model, n, num_classes, device, seed=seed + 7, alpha=alpha)
    report = evaluate_samples(x, train_ds, test_ds, classifier_cache=classifier_cache(), seed=seed, **options)
    report.update({"step": step, "wall": wall, "field": field, **({} if alpha is None else {"cfg_scale": alpha})})
    rundir.write_eval(folder, report)
    return report
