"""uint8 images until the batch (dxtrain.pixels): values, lazy indexing, stores that are not in RAM."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from dxtrain.data import load_dataset, train_test_split
from dxtrain.pixels import BatchFiles, Pixels


def _scaled(u8):
    return u8.astype(np.float32) / np.float32(255) * 2 - 1  # the formula, written out


class CountingStore:
    """A uint8 array that records every read."""

    def __init__(self, a):
        self.a, self.dtype, self.shape, self.reads = a, a.dtype, a.shape, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.a[key]


@pytest.fixture
def u8():
    return np.random.default_rng(0).integers(0, 256, (50, 3, 4, 5), dtype=np.uint8)


def test_values_are_the_scaled_pixels_and_indexing_reads_nothing(u8):
    store = CountingStore(u8)
    x = Pixels(store)
    assert x.shape == (50, 3, 4, 5) and len(x) == 50 and x.dtype == np.float32 and x.nbytes == u8.size
    sub = x[10:40][np.array([5, 0, 29, 5])][np.array([True, False, True, True])]  # views of views
    assert isinstance(sub, Pixels) and sub.shape == (3, 3, 4, 5) and store.reads == []
    np.testing.assert_array_equal(np.asarray(sub), _scaled(u8[[15, 39, 15]]))  # repeats and order kept
    assert np.asarray(sub).dtype == np.float32
    np.testing.assert_array_equal(x[7], _scaled(u8[7]))
    np.testing.assert_array_equal(x[:, 1], _scaled(u8[:, 1]))
    np.testing.assert_array_equal(x.astype(np.float64), _scaled(u8).astype(np.float64))
    store.reads.clear()
    np.asarray(x[20:30])
    assert store.reads == [slice(20, 30)]  # a contiguous run is one slice read
    assert len(x[5:5]) == 0 and np.asarray(x[5:5]).shape == (0, 3, 4, 5)


def test_the_sha256_is_of_the_uint8_rows_and_changes_with_one_pixel(u8):
    x = Pixels(u8)
    assert x.sha256(rows=7) == x.sha256(rows=50) == Pixels(u8.copy()).sha256()
    v = u8.copy()
    v[49, 2, 3, 4] ^= 1
    assert Pixels(v).sha256() != x.sha256()


def test_batch_files_read_each_file_once_in_order_and_any_row_anywhere(u8, tmp_path):
    reads = []
    parts = [u8[:20], u8[20:35], u8[35:]]
    paths = []
    for i, p in enumerate(parts):
        paths.append(str(tmp_path / f"b{i}.npy"))
        np.save(paths[-1], p)

    def read(path):
        reads.append(os.path.basename(path))
        return np.load(path)

    x = Pixels(BatchFiles(paths, [20, 15, 15], (3, 4, 5), read))
    assert x.shape == u8.shape and reads == []
    got = np.concatenate([np.asarray(c) for c in x.chunks(8)])
    np.testing.assert_array_equal(got, _scaled(u8))
    assert reads == ["b0.npy", "b1.npy", "b2.npy"]  # chunks in order: one read per file
    idx = np.array([49, 0, 21, 21, 34, 35])
    np.testing.assert_array_equal(np.asarray(x[idx]), _scaled(u8[idx]))


def test_a_batch_file_that_changed_is_refused(u8, tmp_path):
    path = str(tmp_path / "b.npy")
    np.save(path, u8[:10])
    x = Pixels(BatchFiles([path], [12], (3, 4, 5), np.load))
    with pytest.raises(ValueError, match="changed since it was opened"):
        np.asarray(x)


def test_uint8_npy_images_stay_memory_mapped_and_h5_images_stay_in_the_file(u8, tmp_path):
    np.save(tmp_path / "imgs.npy", u8)
    ds = load_dataset(str(tmp_path / "imgs.npy"))
    assert isinstance(ds.x, Pixels) and isinstance(ds.x.store, np.memmap)
    np.testing.assert_array_equal(np.asarray(ds.x), _scaled(u8))
    chw = np.random.default_rng(2).integers(0, 256, (9, 3, 6, 5), dtype=np.uint8)
    np.save(tmp_path / "hwc.npy", np.ascontiguousarray(np.moveaxis(chw, 1, -1)))  # (N, H, W, C) on disk
    ds = load_dataset(str(tmp_path / "hwc.npy"))
    assert isinstance(ds.x, Pixels) and isinstance(ds.x.store, np.memmap) and ds.shape == (3, 6, 5)
    np.testing.assert_array_equal(np.asarray(ds.x), _scaled(chw))
    with h5py.File(tmp_path / "imgs.h5", "w") as f:
        f["x"] = u8
        f["labels"] = np.arange(50) % 5
    ds = load_dataset(str(tmp_path / "imgs.h5"))
    assert isinstance(ds.x, Pixels) and isinstance(ds.x.store, h5py.Dataset) and ds.num_classes == 5
    train, test = train_test_split(ds, 0.2, seed=1)  # a permuted split: still lazy, values right
    assert isinstance(train.x, Pixels) and len(train) + len(test) == 50
    np.testing.assert_array_equal(np.asarray(test.x), _scaled(u8[test.x.rows]))
    floats = np.random.default_rng(1).random((6, 3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "f.npy", floats)
    assert isinstance(load_dataset(str(tmp_path / "f.npy")).x, np.ndarray)  # floats are read as before


def test_uint8_images_of_an_uncompressed_npz_are_memory_mapped_and_a_compressed_one_is_read(u8, tmp_path):
    labels = np.arange(50) % 5
    np.savez(tmp_path / "plain.npz", x=u8, labels=labels)
    ds = load_dataset(str(tmp_path / "plain.npz"))
    assert isinstance(ds.x, Pixels) and isinstance(ds.x.store, np.memmap) and ds.num_classes == 5
    np.testing.assert_array_equal(np.asarray(ds.x), _scaled(u8))
    np.savez_compressed(tmp_path / "packed.npz", x=u8, labels=labels)
    ds = load_dataset(str(tmp_path / "packed.npz"))  # a compressed member cannot be mapped: read, kept uint8
    assert isinstance(ds.x, Pixels) and not isinstance(ds.x.store, np.memmap)
    np.testing.assert_array_equal(np.asarray(ds.x), _scaled(u8))
