"""Image data sets in their own folder layouts: the CIFAR Python folders and image folders.

:func:`read_folder` finds the uint8 images ``(N, C, H, W)`` of a folder given as
``--data``, with integer labels, and the data set's own test split where the
layout has one.  The images are read when used, never all at once
(:class:`dxtrain.pixels.Pixels`: a CIFAR batch file, or an image file, at a time):

* **CIFAR-10** (``cifar-10-batches-py/``): ``data_batch_1`` ... ``data_batch_5``
  for training, ``test_batch`` for the test split, class names from
  ``batches.meta``;
* **CIFAR-100** (``cifar-100-python/``): ``train`` and ``test``, the 100 fine
  labels by default (``labels_key="coarse_labels"`` for the 20 coarse ones),
  class names from ``meta``;
* **an image folder**: ``root/<class>/*.png|jpg|jpeg``, one sub-folder per
  class, read with Pillow; or ``root/train/<class>/...`` with
  ``root/test/<class>/...`` as its own test split.  Every image must have the
  same size; they are read as RGB if any is in colour, else as grayscale.

CIFAR's batches are Python pickles.  They are read with an unpickler that
accepts only what those files hold (dicts, lists, bytes, numbers and NumPy
arrays), so a file that would run code when unpickled is refused.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np

from .pixels import BatchFiles, Pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


@dataclass
class FolderData:
    """What :func:`read_folder` found: uint8 images ``(N, C, H, W)`` (:class:`dxtrain.pixels.Pixels` over
    CIFAR's batch files or the image files, read when used), int64 labels, class names; the first
    ``n_train`` rows are the training split, the rest (if any) the data set's own test split."""

    x: Pixels
    labels: np.ndarray
    n_train: int
    class_names: list[str]


def read_folder(path: str, labels_key: str | None = None, progress: bool = False) -> FolderData:
    """Read the data set in folder ``path`` (see the module's docstring for the layouts)."""
    names = set(os.listdir(path))
    if set(CIFAR10_TRAIN) & names or "test_batch" in names:
        _no_labels_key(labels_key, "CIFAR-10")
        return _cifar10(path, names)
    if {"train", "test", "meta"} <= names and all(os.path.isfile(os.path.join(path, n)) for n in ("train", "test")):
        return _cifar100(path, labels_key)
    _no_labels_key(labels_key, "an image folder")
    return _image_folder(path, progress)


def _no_labels_key(labels_key, layout: str) -> None:
    if labels_key is not None:
        raise ValueError(f"labels_key={labels_key!r} does not apply to {layout} (its labels come from its layout); "
                         "for CIFAR-100 choose 'fine_labels' or 'coarse_labels'")


# --------------------------------------------------------------------------- CIFAR


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and NumPy arrays; refuses every other global (code)."""

    ALLOWED = {(core, name) for core in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds only arrays, lists and bytes")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArraysOnly(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path!r} is not a readable CIFAR batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} is not a CIFAR batch: it holds a {type(obj).__name__}, not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise ValueError(f"{path!r}: a CIFAR batch needs {key!r}; it holds {sorted(d)}")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path!r}: 'data' must be uint8 of shape (N, 3072) (32x32 RGB, channel-major); "
                         f"got {data.dtype} {data.shape}")
    labels = np.asarray(d[label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path!r}: {label_key!r} has {labels.shape[0] if labels.ndim else 0} entries for "
                         f"{data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(path: str, key: str, count: int) -> list[str]:
    if os.path.isfile(path):
        names = _unpickle(path).get(key)
        if isinstance(names, list) and len(names) >= count:  # the labels index into it
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(i) for i in range(count)]


def _cifar10(path: str, names: set) -> FolderData:
    missing = [n for n in CIFAR10_TRAIN + ("test_batch",) if n not in names]
    if missing:
        raise ValueError(f"{path!r} looks like a CIFAR-10 folder but lacks {', '.join(missing)} "
                         "(expected data_batch_1 ... data_batch_5 and test_batch)")
    return _joined([os.path.join(path, n) for n in CIFAR10_TRAIN + ("test_batch",)], "labels",
                   os.path.join(path, "batches.meta"), "label_names")


def _cifar100(path: str, labels_key: str | None) -> FolderData:
    key = labels_key or "fine_labels"
    if key not in ("fine_labels", "coarse_labels"):
        raise ValueError(f"labels_key={labels_key!r}: CIFAR-100 has 'fine_labels' (100 classes) and "
                         "'coarse_labels' (20)")
    return _joined([os.path.join(path, n) for n in ("train", "test")], key, os.path.join(path, "meta"),
                   "fine_label_names" if key == "fine_labels" else "coarse_label_names")


def _joined(paths: list[str], label_key: str, meta: str, names_key: str) -> FolderData:
    """CIFAR batch files as one store read a file at a time (:class:`dxtrain.pixels.BatchFiles`), the last
    file the test split; each file is checked (and its labels read) once here, one at a time; class names
    from ``meta``."""
    labels = [_batch(p, label_key)[1] for p in paths]
    y = np.concatenate(labels)
    store = BatchFiles(paths, [len(v) for v in labels], (3, 32, 32), lambda p: _batch(p, label_key)[0])
    return FolderData(Pixels(store), y, len(y) - len(labels[-1]), _class_names(meta, names_key, int(y.max()) + 1))


# --------------------------------------------------------------------------- image folders


def _class_folders(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if not n.startswith(".") and os.path.isdir(os.path.join(root, n)))


def _image_files(root: str, classes: list[str]) -> list[tuple[str, int]]:
    files = []
    for k, c in enumerate(classes):
        inside = sorted(n for n in os.listdir(os.path.join(root, c))
                        if not n.startswith(".") and n.lower().endswith(IMAGE_SUFFIXES))
        if not inside:
            raise ValueError(f"class folder {os.path.join(root, c)!r} holds no {'/'.join(IMAGE_SUFFIXES)} image")
        files += [(os.path.join(root, c, n), k) for n in inside]
    return files


def _image_folder(path: str, progress: bool) -> FolderData:
    top = _class_folders(path)
    split = {"train", "test"} <= set(top)
    root = os.path.join(path, "train") if split else path
    classes = _class_folders(root)
    if not classes:
        raise ValueError(f"data folder {path!r}: not a CIFAR folder, and no class sub-folders of images "
                         f"(expected {path}/<class>/*.png, or {path}/train/<class>/... with {path}/test/<class>/...)")
    files = _image_files(root, classes)
    test_files = []
    if split:
        extra = sorted(set(_class_folders(os.path.join(path, "test"))) - set(classes))
        if extra:
            raise ValueError(f"{os.path.join(path, 'test')!r} has class folder(s) {extra} that "
                             f"{root!r} lacks; both splits need the same classes")
        present = [c for c in classes if os.path.isdir(os.path.join(path, "test", c))]
        test_files = [(f, classes.index(present[k])) for f, k in _image_files(os.path.join(path, "test"), present)]
    x, labels = _read_images(files + test_files, progress)
    return FolderData(x, labels, len(files), classes)


def _read_images(files: list[tuple[str, int]], progress: bool) -> tuple[Pixels, np.ndarray]:
    """The images as one uint8 store ``(N, C, H, W)`` decoded when read (:class:`dxtrain.pixels.BatchFiles`,
    one file per image): all the size of the first, RGB if any is in colour.  Only the headers are read
    here, to check the sizes and find the modes."""
    from tqdm import tqdm

    with _open_image(files[0][0]) as im:
        size = im.size
    colour = False
    for name, _ in tqdm(files, desc="checking images", unit="img", disable=not progress):  # headers only
        with _open_image(name) as im:
            if im.size != size:
                raise ValueError(f"image {name!r} is {im.size[0]}x{im.size[1]}, but {files[0][0]!r} is "
                                 f"{size[0]}x{size[1]}: every image of a data folder must have one size")
            colour = colour or im.mode not in ("1", "L", "LA", "I", "I;16", "F")
    mode, channels = ("RGB", 3) if colour else ("L", 1)

    def decode(name: str) -> np.ndarray:
        try:
            with _open_image(name) as im:
                a = np.asarray(im.convert(mode))
        except OSError as exc:  # a body that is truncated or damaged
            raise ValueError(f"image {name!r} cannot be read ({exc})") from exc
        return (a[None] if channels == 1 else np.moveaxis(a, -1, 0))[None]

    store = BatchFiles([name for name, _ in files], [1] * len(files), (channels, size[1], size[0]), decode)
    return Pixels(store), np.array([k for _, k in files], dtype=np.int64)


def _open_image(name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(name)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image {name!r} cannot be read ({exc})") from exc
