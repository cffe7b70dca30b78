"""Images kept as uint8 until they form a batch: :class:`Pixels`, over a store that may not be in RAM.

An image data set is kept as it came, ``uint8 (N, C, H, W)``, a quarter of float32's size, and is
read as float32 in ``[-1, 1]`` (``x / 255 * 2 - 1``) only for the rows a batch asks for.  The store
behind it is anything that reads rows by a slice or by increasing indices: an array in RAM, a
memory map of a ``.npy`` file, an HDF5 dataset, or :class:`BatchFiles` (the CIFAR Python batches,
unpickled one file at a time).  With such a store a data set is never read whole: the feature
file's build and its fingerprint go through it in chunks, the evaluation reads subsamples.

``Pixels`` behaves like a read-only float32 array where the trainer needs one: ``len``,
``shape``, ``dtype`` (float32), indexing its rows by a slice, an index array or a mask (another
``Pixels`` over the same store: no pixel is read), ``numpy.asarray`` (the float32 values of its
rows), and a row index with more (``x[i, c]``, ``x[:, 0]``: float32 values, read then).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np

SCALING = "uint8 / 255 * 2 - 1 (at the batch)"


def to_float(u8: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8 pixels as ``dtype`` in ``[-1, 1]``."""
    out = u8.astype(np.float32)
    out /= np.float32(255.0)
    out *= np.float32(2.0)
    out -= np.float32(1.0)
    return out if np.dtype(dtype) == np.float32 else out.astype(dtype)


class Pixels:
    """Rows ``rows`` (all when None) of a uint8 image store ``(N, C, H, W)``, read as float32 in ``[-1, 1]``."""

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, store, rows=None):
        if np.dtype(store.dtype) != np.uint8 or len(store.shape) != 4:
            raise ValueError(f"Pixels needs a uint8 store of 4-D images, got {store.dtype} {tuple(store.shape)}")
        self.store = store
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        n = int(store.shape[0]) if self.rows is None else len(self.rows)
        self.shape = (n, *(int(s) for s in store.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of its rows as stored (uint8)."""
        return self.size

    def _indices(self) -> np.ndarray:
        return np.arange(self.shape[0]) if self.rows is None else self.rows

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return np.asarray(self[np.array([idx])])[0]
        if isinstance(idx, tuple):  # rows, then within them: the float32 values
            rows, rest = idx[0], idx[1:]
            if isinstance(rows, (int, np.integer)):
                return self[rows][rest]
            return np.asarray(self[rows])[(slice(None), *rest)]
        if isinstance(idx, slice) and self.rows is None and idx.step in (None, 1):
            start, stop, _ = idx.indices(self.shape[0])
            return Pixels(self.store, np.arange(start, max(start, stop)))
        return Pixels(self.store, self._indices()[idx])

    def uint8(self) -> np.ndarray:
        """Its rows as a uint8 ``(n, C, H, W)`` array (read from the store now)."""
        rows = self._indices()
        if not len(rows):
            block = np.empty((0, *self.store.shape[1:]), dtype=np.uint8)
        elif rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            block = np.asarray(self.store[int(rows[0]):int(rows[-1]) + 1])  # one contiguous read
        elif isinstance(self.store, np.ndarray):
            block = self.store[rows]
        else:  # HDF5 and batch files read increasing indices
            uniq, back = np.unique(rows, return_inverse=True)
            block = np.asarray(self.store[uniq])[back]
        return block

    def __array__(self, dtype=None, copy=None):
        return to_float(self.uint8(), np.float32 if dtype is None else dtype)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self, dtype=dtype)

    def chunks(self, rows: int) -> Iterator["Pixels"]:
        for i in range(0, len(self), rows):
            yield self[i:i + rows]

    def sha256(self, rows: int = 4096) -> str:
        """SHA-256 of its uint8 rows (C, H, W order) with their shape, read ``rows`` at a time."""
        h = hashlib.sha256(f"uint8{self.shape}".encode())
        for part in self.chunks(rows):
            h.update(np.ascontiguousarray(part.uint8()).tobytes())
        return h.hexdigest()


class BatchFiles:
    """Several files of images as one uint8 store ``(N, *sample_shape)``, read one file at a time.

    ``read(path)`` returns a file's uint8 images; ``counts`` are their numbers.  Reading rows
    loads each file they touch (the last one read is kept, so chunks in order read each file once).
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, paths: list[str], counts: list[int], sample_shape: tuple[int, ...],
                 read: Callable[[str], np.ndarray]):
        self.paths, self.read = list(paths), read
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        self.shape = (int(self.offsets[-1]), *sample_shape)
        self._last: tuple[int, np.ndarray] | None = None

    def __getitem__(self, key) -> np.ndarray:
        rows = np.arange(self.shape[0])[key]
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        files = np.searchsorted(self.offsets, rows, side="right") - 1
        for f in np.unique(files):
            sel = files == f
            out[sel] = self._file(int(f))[rows[sel] - self.offsets[f]]
        return out

    def _file(self, f: int) -> np.ndarray:
        if self._last is None or self._last[0] != f:
            data = self.read(self.paths[f])
            expect = (int(self.offsets[f + 1] - self.offsets[f]), *self.shape[1:])
            if data.shape != expect:
                raise ValueError(f"{self.paths[f]!r} changed since it was opened: it holds {data.shape} images, "
                                 f"not {expect}")
            self._last = (f, data)
        return self._last[1]
