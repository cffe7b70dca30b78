"""Training data for dxtrain: the embedded sets and a user's own arrays.

Everything the trainer sees is a :class:`Dataset`: float32 samples, either
vectors ``(N, D)`` or images ``(N, C, H, W)``, with optional integer labels
``0..K-1``. :func:`load_dataset` builds one from a spec:

* an embedded name (:data:`EMBEDDED`), so ``dxtrain train`` runs with nothing
  to download:

  - ``"digits"`` -- scikit-learn's 8x8 handwritten digits (UCI, 1797 images,
    10 classes; see ``dxtrain/assets/README.md``), images ``(N, 1, 8, 8)``
    scaled ``pixel / 16 * 2 - 1``;
  - 2-D toys drawn with NumPy from ``seed`` (``n`` points, default 20000),
    centred and divided by one scalar so each coordinate has unit variance on
    average (the shape's aspect is kept): ``"moons"`` (labels 0/1),
    ``"swissroll"`` and ``"checkerboard"`` (unlabelled), ``"gaussians8"``
    (8 Gaussians on a circle, labels 0..7);
  - ``"mixture"`` -- a many-mode Gaussian mixture with a KNOWN density
    (:func:`mixture_truth`): 64 isotropic modes in 32 dimensions with unequal
    (Zipf) weights, 60000 points by default (``n``), drawn from ``seed``;
    unlabelled.  The mixture itself is fixed (it never depends on ``seed``),
    so generated samples can be scored against fresh samples of the truth
    (:func:`dxtrain.evaluate.mixture_quality`); ``Dataset.truth`` carries it;

* a path to a user's ``.npz``, ``.npy``, ``.h5`` or ``.hdf5`` file of vectors
  or images, with optional labels (see :func:`load_dataset` for the keys);

* a path to a folder of images: the CIFAR-10/100 Python folders, or
  ``root/<class>/*.png|jpg`` (:mod:`dxtrain.imagedata`), with the data set's
  own test split where it has one (``Dataset.test``).

Images end up in ``[-1, 1]`` (uint8 pixels are scaled ``/ 255``), the range
the generator's output and :func:`dxtrain.pictures.image_grid` assume.
:func:`train_test_split` holds out a stratified test split for evaluation.

Example
-------
>>> ds = load_dataset("digits")
>>> ds.kind, ds.shape, ds.num_classes
('images', (1, 8, 8), 10)
>>> train, test = train_test_split(ds, test_fraction=0.2, seed=0)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from importlib import resources

import numpy as np

from .datafiles import read_h5, read_npy, read_npz
from .pixels import SCALING, Pixels, to_float

__all__ = ["Dataset", "EMBEDDED", "GaussianMixture", "load_dataset", "mixture_truth", "train_test_split"]

EMBEDDED = ("digits", "moons", "swissroll", "checkerboard", "gaussians8", "mixture")
"""Names :func:`load_dataset` accepts without a file."""

FILE_EXTENSIONS = (".npz", ".npy", ".h5", ".hdf5")

DEFAULT_TOY_POINTS = 20000
DEFAULT_MIXTURE_POINTS = 60000  # about 51000 training points after the default 15 % test split


@dataclass
class Dataset:
    """Samples (and labels) ready for training.

    Attributes
    ----------
    name : str
        The embedded name, or the file's stem.
    x : numpy.ndarray
        float32, vectors ``(N, D)`` or images ``(N, C, H, W)``. Images lie in
        ``[-1, 1]`` unless the file held floats outside that range, which are
        standardised instead (see ``preprocessing``).
    labels : numpy.ndarray or None
        int64 ``(N,)`` with values in ``0..num_classes-1``, or None.
    kind : str
        ``"vectors"`` or ``"images"``.
    num_classes : int
        Number of classes; 0 when unlabelled.
    label_names : numpy.ndarray or None
        The original label value of each class index (``label_names[k]`` was
        remapped to ``k``), or None when unlabelled.
    preprocessing : str
        How the stored values became ``x``, e.g. ``"uint8 / 255 * 2 - 1"``.
    truth : GaussianMixture or None
        The known distribution the samples were drawn from (the embedded
        ``"mixture"``), or None; evaluation scores against it when present.
    """

    name: str
    x: np.ndarray
    labels: np.ndarray | None
    kind: str
    num_classes: int
    label_names: np.ndarray | None = None
    preprocessing: str = "none"
    truth: GaussianMixture | None = None
    test: Dataset | None = None  # the data set's own test split (CIFAR's test batch, an image folder's test/)
    own_split: bool = False  # this is such a split (train_test_split returned it)

    def __post_init__(self):
        if self.kind not in ("vectors", "images"):
            raise ValueError(f"Dataset kind={self.kind!r}: expected 'vectors' or 'images'")
        want_ndim = 2 if self.kind == "vectors" else 4
        if self.x.ndim != want_ndim:
            raise ValueError(f"Dataset {self.name!r}: kind={self.kind!r} needs x with {want_ndim} dims, "
                             f"got shape {self.x.shape}")
        if self.labels is None:
            if self.num_classes != 0:
                raise ValueError(f"Dataset {self.name!r}: num_classes={self.num_classes} without labels; use 0")
        elif self.labels.shape != (len(self.x),):
            raise ValueError(f"Dataset {self.name!r}: labels shape {self.labels.shape} does not match "
                             f"{len(self.x)} samples")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(D,)`` or ``(C, H, W)``."""
        return tuple(self.x.shape[1:])

    @property
    def dim(self) -> int:
        """Flattened size of one sample."""
        return int(np.prod(self.shape))

    def subset(self, idx) -> Dataset:
        """The samples at ``idx`` (indices or a boolean mask), same classes.

        ``num_classes`` and ``label_names`` are kept even if some class has no
        sample left, so class indices mean the same in every subset.
        """
        idx = np.asarray(idx)
        return Dataset(
            name=self.name,
            x=self.x[idx],
            labels=None if self.labels is None else self.labels[idx],
            kind=self.kind,
            num_classes=self.num_classes,
            label_names=self.label_names,
            preprocessing=self.preprocessing,
            truth=self.truth,
            test=self.test,
            own_split=self.own_split,
        )


def load_dataset(spec: str, *, n: int | None = None, seed: int = 0, key: str | None = None,
                 labels_key: str | None = None) -> Dataset:
    """Load an embedded data set or a user's file.

    Parameters
    ----------
    spec : str
        One of :data:`EMBEDDED`, a path to a ``.npz``, ``.npy``, ``.h5`` or
        ``.hdf5`` file, or a path to a data folder (a CIFAR-10/100 Python
        folder, or an image folder: :mod:`dxtrain.imagedata`).
    n : int, optional
        For the 2-D toys, the number of points to draw (default 20000); for
        ``"mixture"`` likewise (default 60000). For
        ``"digits"`` and files, a random subset of ``n`` samples (drawn with
        ``seed``); all samples when None.
    seed : int
        Seed of the toys' points and of the ``n``-subset.
    key : str, optional
        Files only: the array holding the samples. By default the first of
        ``x``, ``data``, ``images``, ``arr_0`` present (``.npz``), or ``x``,
        ``data``, ``images`` (HDF5; may be a path such as ``"group/x"``).
        A ``.npy`` file is the array itself.
    labels_key : str, optional
        Files only: the array holding integer labels. By default ``labels``
        or ``y`` when present; for ``.npy`` a sibling ``<stem>.labels.npy``.

    Accepted sample arrays: ``(N, D)`` vectors; ``(N, H, W)`` grayscale
    images; ``(N, C, H, W)`` or channels-last ``(N, H, W, C)`` images (taken
    as channels-last when the last dimension is 1, 3 or 4 and the second is
    not). uint8 values are scaled ``/ 255`` to ``[-1, 1]``. Floats are kept
    for vectors; float images in ``[0, 1]`` are mapped to ``[-1, 1]``, images
    already in ``[-1, 1]`` are kept, others are standardised (zero mean, unit
    standard deviation over all pixels). Other integer dtypes are treated as
    floats. Labels must be integers (floats with integral values are
    accepted); they are remapped to ``0..K-1`` in sorted order and the
    original values kept in ``Dataset.label_names``.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Unknown embedded name or extension, missing key (the keys present are
        listed), empty array, wrong number of dimensions, NaN/Inf, labels of
        the wrong length or not integers, ``n`` out of range.
    """
    if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
        raise ValueError(f"n={n!r}: expected a positive integer or None")
    spec = os.fspath(spec)
    name = spec.strip().lower()
    if name in EMBEDDED:
        for arg, value in (("key", key), ("labels_key", labels_key)):
            if value is not None:
                raise ValueError(f"{arg}={value!r} applies to files only, not to the embedded data set {name!r}")
        if name == "digits":
            return _subsample(_load_digits(), n, seed)
        if name == "mixture":
            return _mixture(DEFAULT_MIXTURE_POINTS if n is None else int(n), np.random.default_rng(seed))
        return _TOYS[name](DEFAULT_TOY_POINTS if n is None else int(n), np.random.default_rng(seed))

    return _subsample(_from_path(spec, key, labels_key), n, seed)


def train_test_split(ds: Dataset, test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split ``ds`` into a training and a held-out test set.

    A data set with its own test split (``ds.test``: CIFAR's test batch, an
    image folder's ``test/``) returns it instead.  Labelled sets are stratified: each class contributes
    ``round(test_fraction * count)`` samples to the test set, at least one
    (and at least one stays in training) whenever the class has two or more.
    Both splits are in random order; the same ``seed`` gives the same split.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r}: expected a number strictly between 0 and 1")
    if ds.test is not None:  # the data set's own split, as its authors made it
        return replace(ds, test=None), ds.test
    if len(ds) < 2:
        raise ValueError(f"data set {ds.name!r} has {len(ds)} sample(s); a split needs at least 2")
    rng = np.random.default_rng(seed)
    groups = [np.arange(len(ds))] if ds.labels is None else \
        [np.flatnonzero(ds.labels == c) for c in range(ds.num_classes)]
    test_parts, train_parts = [], []
    for members in groups:
        members = rng.permutation(members)
        k = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        test_parts.append(members[:k])
        train_parts.append(members[k:])
    test_idx = rng.permutation(np.concatenate(test_parts))
    train_idx = rng.permutation(np.concatenate(train_parts))
    return ds.subset(train_idx), ds.subset(test_idx)


# --------------------------------------------------------------------------- embedded


def _load_digits() -> Dataset:
    with resources.files("dxtrain").joinpath("assets/digits.npz").open("rb") as fh, \
            np.load(fh, allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    x = (images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    return Dataset("digits", np.ascontiguousarray(x), labels.astype(np.int64), "images", 10,
                   label_names=np.arange(10, dtype=np.int64), preprocessing="pixel / 16 * 2 - 1")


def _toy(name, points, labels, num_classes, rng) -> Dataset:
    # Shuffle so that any prefix is a fair sample, then unit scale: one scalar
    # for both coordinates keeps the picture's aspect ratio.
    order = rng.permutation(len(points))
    points = points[order] - points.mean(axis=0)
    points = points / np.sqrt(np.mean(points ** 2))
    if labels is not None:
        labels = labels[order].astype(np.int64)
    return Dataset(name, points.astype(np.float32), labels, "vectors", num_classes,
                   label_names=None if labels is None else np.arange(num_classes, dtype=np.int64),
                   preprocessing="centred, divided by the RMS coordinate")


def _moons(n, rng):
    labels = (np.arange(n) >= (n + 1) // 2).astype(np.int64)  # first half outer moon (0), rest inner (1)
    t = rng.uniform(0.0, np.pi, n)
    outer = np.stack([np.cos(t), np.sin(t)], axis=1)
    inner = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)
    points = np.where(labels[:, None] == 0, outer, inner) + rng.normal(0.0, 0.1, (n, 2))
    return _toy("moons", points, labels, 2, rng)


def _swissroll(n, rng):
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.uniform(size=n))
    points = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + rng.normal(0.0, 0.5, (n, 2))
    return _toy("swissroll", points, None, 0, rng)


def _checkerboard(n, rng):
    # 4x4 board on [-2, 2)^2, points uniform on the 8 dark squares.
    col = rng.uniform(-2.0, 2.0, n)
    row_in_pair = rng.uniform(0.0, 1.0, n) - 2.0 * rng.integers(0, 2, n)  # [-2,-1) or [0,1)
    row = row_in_pair + np.mod(np.floor(col), 2.0)
    return _toy("checkerboard", np.stack([col, row], axis=1), None, 0, rng)


def _gaussians8(n, rng):
    labels = rng.integers(0, 8, n)
    angle = labels * (np.pi / 4.0)
    centres = 2.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return _toy("gaussians8", centres + rng.normal(0.0, 0.2, (n, 2)), labels, 8, rng)


# --------------------------------------------------------------------------- the known mixture

MIXTURE_MODES = 64
MIXTURE_DIM = 32
MIXTURE_ZIPF = 1.0  # weight of the r-th heaviest mode ~ 1 / r: the heaviest is 64x the lightest
MIXTURE_SIGMA = 0.35  # mode width relative to the spread of the (unit-variance) mode centres, before scaling
_MIXTURE_STRUCTURE_SEED = 20260517  # fixes the mixture; ``seed`` only draws its points


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """A mixture of isotropic Gaussians: mode ``k`` is ``N(means[k], sigmas[k]**2 I)`` with weight ``weights[k]``.

    The truth behind the embedded ``"mixture"`` (see :func:`mixture_truth`); float64 parameters.
    """

    means: np.ndarray  # (K, D)
    sigmas: np.ndarray  # (K,)
    weights: np.ndarray  # (K,), sums to 1

    def __post_init__(self):
        k, d = self.means.shape
        if self.sigmas.shape != (k,) or self.weights.shape != (k,):
            raise ValueError(f"GaussianMixture: means {self.means.shape}, sigmas {self.sigmas.shape} and weights "
                             f"{self.weights.shape} disagree on the number of modes")
        if not (np.all(self.sigmas > 0) and np.all(self.weights >= 0) and abs(self.weights.sum() - 1) < 1e-9):
            raise ValueError("GaussianMixture: sigmas must be > 0 and weights >= 0 summing to 1")

    @property
    def num_modes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` float64 points and the mode each came from."""
        modes = rng.choice(self.num_modes, size=int(n), p=self.weights)
        x = self.means[modes] + self.sigmas[modes, None] * rng.standard_normal((int(n), self.dim))
        return x, modes.astype(np.int64)

    def nearest_mode(self, x, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """For each point, the mode ``k`` minimising ``||x - means[k]||^2 / sigmas[k]^2`` and that value.

        The value is ``chi^2`` with ``dim`` degrees of freedom for a point drawn from mode ``k``.
        """
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"points have {x.shape[1]} coordinates; the mixture has {self.dim}")
        inv = 1.0 / self.sigmas ** 2
        m2 = (self.means ** 2).sum(1)
        modes = np.empty(len(x), np.int64)
        dist = np.empty(len(x), np.float64)
        for i in range(0, len(x), block):
            xb = x[i:i + block]
            d2 = np.maximum((xb * xb).sum(1)[:, None] + m2[None, :] - 2.0 * xb @ self.means.T, 0.0) * inv
            modes[i:i + block] = d2.argmin(1)
            dist[i:i + block] = d2[np.arange(len(xb)), modes[i:i + block]]
        return modes, dist

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for a in (self.means, self.sigmas, self.weights):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
        return h.hexdigest()


_MIXTURE: GaussianMixture | None = None


def mixture_truth() -> GaussianMixture:
    """The fixed mixture behind the embedded ``"mixture"`` data set.

    64 modes in 32 dimensions.  Centres ``N(0, I)``; mode widths
    ``0.35 * U(0.7, 1.3)`` per coordinate (a point lies ~1.9 units from its
    centre, centres are ~7.7 apart, the closest pair 4.6: every mode is
    clearly separate); weights proportional to ``1 / rank`` (Zipf), in random order
    over the modes, so the heaviest mode carries 21 % of the mass and the
    lightest 0.33 %.  Then centred and scaled exactly (from the parameters,
    not a sample) to zero mean and unit mean squared coordinate, like the
    2-D toys.  Drawn once from a fixed seed: the same on every machine.
    """
    global _MIXTURE
    if _MIXTURE is None:
        rng = np.random.default_rng(_MIXTURE_STRUCTURE_SEED)
        k, d = MIXTURE_MODES, MIXTURE_DIM
        means = rng.standard_normal((k, d))
        sigmas = MIXTURE_SIGMA * rng.uniform(0.7, 1.3, k)
        weights = (1.0 / np.arange(1, k + 1) ** MIXTURE_ZIPF)[rng.permutation(k)]
        weights /= weights.sum()
        centre = weights @ means
        second = float(weights @ (((means - centre) ** 2).sum(1) + d * sigmas ** 2)) / d
        scale = np.sqrt(second)
        _MIXTURE = GaussianMixture((means - centre) / scale, sigmas / scale, weights)
        for a in (_MIXTURE.means, _MIXTURE.sigmas, _MIXTURE.weights):
            a.setflags(write=False)
    return _MIXTURE


def _mixture(n, rng) -> Dataset:
    truth = mixture_truth()
    x, _ = truth.sample(n, rng)  # unlabelled: the generator must find every mode and its mass itself
    return Dataset("mixture", x.astype(np.float32), None, "vectors", 0,
                   preprocessing="drawn from dxtrain.data.mixture_truth() (zero mean, unit mean square)",
                   truth=truth)


_TOYS = {"moons": _moons, "swissroll": _swissroll, "checkerboard": _checkerboard, "gaussians8": _gaussians8}


# --------------------------------------------------------------------------- files


# --------------------------------------------------------------------------- arrays -> Dataset


def _from_path(spec: str, key, labels_key) -> Dataset:
    """The data set in the file or folder ``spec``."""
    ext = os.path.splitext(spec)[1].lower()
    if not os.path.exists(spec):
        if ext in FILE_EXTENSIONS:
            raise FileNotFoundError(f"data file not found: {spec!r}"
                                    + ("" if os.path.isabs(spec) else f" (relative to {os.getcwd()})"))
        raise ValueError(f"unknown data set {spec!r}: not an embedded data set ({', '.join(EMBEDDED)}) "
                         f"and not a path to a {'/'.join(FILE_EXTENSIONS)} file or a data folder")
    if os.path.isdir(spec):
        if key is not None:
            raise ValueError(f"key={key!r} applies to .npz/.h5 files, not to the data folder {spec!r}")
        return _from_folder(spec, labels_key)
    if ext == ".npz":
        x, labels = read_npz(spec, key, labels_key)
    elif ext == ".npy":
        x, labels = read_npy(spec, key, labels_key)
    elif ext in (".h5", ".hdf5"):
        x, labels = read_h5(spec, key, labels_key)
    else:
        raise ValueError(f"data file {spec!r}: unsupported extension {ext!r}; expected one of "
                         f"{', '.join(FILE_EXTENSIONS)}")
    stem = os.path.splitext(os.path.basename(spec))[0]
    return _from_arrays(stem, x, labels, source=spec)


def _from_folder(path: str, labels_key) -> Dataset:
    """A CIFAR Python folder or an image folder (:mod:`dxtrain.imagedata`), with its own test split when it
    has one; both splits scaled and labelled alike."""
    from .imagedata import read_folder

    f = read_folder(path, labels_key, progress=sys.stderr.isatty())
    whole = _from_arrays(os.path.basename(os.path.normpath(path)), f.x, f.labels, source=path)
    whole.label_names = np.array([f.class_names[int(v)] for v in whole.label_names])
    n = f.n_train
    if n == len(whole):
        return whole
    test = replace(whole, x=whole.x[n:], labels=whole.labels[n:], own_split=True)
    return replace(whole, x=whole.x[:n], labels=whole.labels[:n], test=test)


def _from_arrays(name, x, labels, source) -> Dataset:
    if isinstance(x, Pixels) or not isinstance(x, np.ndarray):  # a folder's or an HDF5 file's uint8 images
        values, kind, how = (x if isinstance(x, Pixels) else Pixels(x)), "images", SCALING
    else:
        values, kind, how = _values(x, source)
    y, names = _labels(labels, len(values), source)
    return Dataset(name, values, y, kind, 0 if names is None else len(names), label_names=names,
                   preprocessing=how)


def _values(x: np.ndarray, source):
    """``(values, kind, how)`` of an array read from a file: uint8 images kept as :class:`Pixels` (a memory
    map stays on disk until a batch reads it), anything else float32 in RAM."""
    if isinstance(x, np.memmap) and x.dtype != np.uint8:
        x = np.array(x)  # in RAM: only uint8 images stay mapped
    if x.dtype.kind not in "uif":
        raise ValueError(f"data file {source!r}: samples have dtype {x.dtype}; expected uint8, integers or floats")
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"data file {source!r}: samples have shape {x.shape}; expected (N, D) vectors, "
                         f"(N, H, W) grayscale images, or (N, C, H, W) / (N, H, W, C) images")
    if x.size == 0:
        raise ValueError(f"data file {source!r}: samples are empty (shape {x.shape})")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ValueError(f"data file {source!r}: samples contain {bad} NaN/Inf value(s)")

    if x.ndim == 2:
        kind = "vectors"
    else:
        kind = "images"
        if x.ndim == 3:
            x = x[:, None]
        elif x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = np.moveaxis(x, -1, 1)

    if x.dtype == np.uint8:
        return (Pixels(x), kind, SCALING) if kind == "images" else (to_float(x), kind, "uint8 / 255 * 2 - 1")
    values = x.astype(np.float64)
    how = "none"
    if kind == "images":
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            values, how = values * 2 - 1, "[0, 1] -> [-1, 1]"
        elif not (lo >= -1.0 and hi <= 1.0):
            mean, std = float(values.mean()), float(values.std())
            values = (values - mean) / (std if std > 0 else 1.0)
            how = f"standardised (mean {mean:.6g}, std {std:.6g})"
    return np.ascontiguousarray(values.astype(np.float32)), kind, how


def _labels(labels, n, source):
    if labels is None:
        return None, None
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"data file {source!r}: labels have shape {labels.shape}; expected ({n},), "
                         f"one per sample")
    if labels.dtype.kind in "ui":
        ints = labels.astype(np.int64)
    elif labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        ints = labels.astype(np.int64)
    else:
        example = labels[0] if labels.dtype.kind != "f" else labels[~(labels == np.round(labels))][0]
        raise ValueError(f"data file {source!r}: labels must be integers; got dtype {labels.dtype} "
                         f"(e.g. {example!r})")
    names, y = np.unique(ints, return_inverse=True)
    return y.astype(np.int64).reshape(n), names.astype(np.int64)


def _subsample(ds: Dataset, n, seed) -> Dataset:
    if n is None:
        return ds
    if n > len(ds):
        raise ValueError(f"n={n} exceeds the {len(ds)} samples of data set {ds.name!r}")
    return ds.subset(np.sort(np.random.default_rng(seed).choice(len(ds), size=int(n), replace=False)))
