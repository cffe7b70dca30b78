"""Reading a user's arrays from ``.npz``, ``.npy`` and HDF5 files: samples and optional labels.

Each reader returns ``(samples, labels or None)`` as stored; :func:`dxtrain.data.load_dataset` turns
them into a :class:`dxtrain.data.Dataset`.  Pickled objects are never loaded.
"""

from __future__ import annotations

import os

import numpy as np

# Keys tried, in order, when the caller names none.
SAMPLE_KEYS = ("x", "data", "images", "arr_0")
LABEL_KEYS = ("labels", "y")


def _missing_key(path, what, wanted, present):
    listed = ", ".join(repr(k) for k in present) if present else "none"
    return ValueError(f"data file {path!r}: no {what} array {wanted}; arrays present: {listed}")


def _pick(path, what, keys, explicit, defaults, required):
    """The key to read: ``explicit`` if present, else the first default present."""
    if explicit is not None:
        if explicit not in keys:
            raise _missing_key(path, what, f"under key {explicit!r}", keys)
        return explicit
    for k in defaults:
        if k in keys:
            return k
    if required:
        raise _missing_key(path, what, "under any of " + ", ".join(repr(k) for k in defaults)
                           + " (pass the key to use)", keys)
    return None


def read_npz(path, key, labels_key):
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile/pickle errors: say which file
        raise ValueError(f"data file {path!r}: not a readable .npz archive ({exc})") from exc
    with archive as z:
        keys = list(z.files)
        xk = _pick(path, "sample", keys, key, SAMPLE_KEYS, required=True)
        lk = _pick(path, "label", keys, labels_key, LABEL_KEYS, required=False)
        try:
            mapped = _mapped_member(path, xk)
            return (z[xk] if mapped is None else mapped), (None if lk is None else z[lk])
        except ValueError as exc:  # object arrays need pickle, which we refuse
            raise ValueError(f"data file {path!r}: cannot read array ({exc})") from exc


def _mapped_member(path: str, key: str):
    """The uint8 array ``key`` of an uncompressed .npz (``np.savez``) as a read-only memory map, so images
    larger than RAM are read by rows; None where it cannot be mapped (compressed, another dtype)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)  # the local file header: its name and extra field lengths at bytes 26-29
        fh.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                + int.from_bytes(local[28:30], "little"))
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fh))
        offset = fh.tell()
    if dtype != np.uint8 or fortran or len(shape) < 3:
        return None
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)


def _read_npy_file(path):
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")  # uint8 images stay on disk until read
    except Exception as exc:
        raise ValueError(f"data file {path!r}: not a readable .npy array ({exc})") from exc


def read_npy(path, key, labels_key):
    if key is not None:
        raise ValueError(f"key={key!r}: a .npy file holds a single array, so there is no key to choose "
                         f"({path!r})")
    if labels_key is not None:
        raise ValueError(f"labels_key={labels_key!r}: labels of a .npy file come from the sibling file "
                         f"{_labels_sibling(path)!r}, not from a key")
    x = _read_npy_file(path)
    sibling = _labels_sibling(path)
    return x, (_read_npy_file(sibling) if os.path.exists(sibling) else None)


def _labels_sibling(path):
    return os.path.splitext(path)[0] + ".labels.npy"


def read_h5(path, key, labels_key):
    import h5py  # only users of HDF5 files need it

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"data file {path!r}: not a readable HDF5 file ({exc})") from exc
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    try:
        xk = _pick(path, "sample", names, key, SAMPLE_KEYS[:3], required=True)
        lk = _pick(path, "label", names, labels_key, LABEL_KEYS, required=False)
        labels = None if lk is None else f[lk][()]
        ds = f[xk]
        if ds.dtype == np.uint8 and ds.ndim == 4 and ds.shape[1] in (1, 3, 4):
            return ds, labels  # uint8 images (N, C, H, W) stay in the file (open while they are used)
        x = ds[()]
    except BaseException:
        f.close()
        raise
    f.close()
    return x, labels
