"""Data folders as --data: the CIFAR-10/100 Python folders and image folders (dxtrain.imagedata)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from dxtrain.data import load_dataset, train_test_split
from dxtrain.pixels import Pixels

PIL = pytest.importorskip("PIL.Image")


def _scaled(u8):
    return u8.astype(np.float32) / 255 * 2 - 1


def _write_batch(path, data, labels, key=b"labels", extra=None):
    with open(path, "wb") as fh:  # the official files' layout: bytes keys, protocol 2
        pickle.dump({b"batch_label": b"x", key: [int(v) for v in labels], b"data": data, **(extra or {})}, fh,
                    protocol=2)


def make_cifar10(root, per_batch=6, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch)
        _write_batch(os.path.join(root, name), data, labels)
        batches[name] = (data, labels)
    with open(os.path.join(root, "batches.meta"), "wb") as fh:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, fh, protocol=2)
    return batches


def test_a_cifar10_folder_reads_in_order_with_its_own_test_split(tmp_path):
    batches = make_cifar10(tmp_path / "cifar-10-batches-py")
    ds = load_dataset(str(tmp_path / "cifar-10-batches-py"))
    train_x = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    train_y = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert ds.kind == "images" and ds.shape == (3, 32, 32) and len(ds) == 30
    np.testing.assert_array_equal(ds.x, _scaled(train_x))  # channel-major rows: R plane, G plane, B plane
    present = np.unique(np.concatenate([train_y, batches["test_batch"][1]]))
    np.testing.assert_array_equal(ds.label_names[ds.labels], [f"class{v}" for v in train_y])
    assert ds.num_classes == len(present)
    train, test = train_test_split(ds, 0.5, seed=3)  # the own split wins over the fraction
    assert test.own_split and not train.own_split and train.test is None and len(test) == 6
    np.testing.assert_array_equal(test.x, _scaled(batches["test_batch"][0].reshape(-1, 3, 32, 32)))
    np.testing.assert_array_equal(test.label_names[test.labels], [f"class{v}" for v in batches["test_batch"][1]])
    sub = load_dataset(str(tmp_path / "cifar-10-batches-py"), n=10, seed=1)
    assert len(sub) == 10 and len(sub.test) == 6  # --n subsamples the training split only


def test_a_cifar100_folder_has_fine_labels_by_default_and_coarse_on_request(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name, n in (("train", 12), ("test", 5)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        _write_batch(root / name, data, rng.integers(0, 100, n), key=b"fine_labels",
                     extra={b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)]})
    with open(root / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, fh, protocol=2)
    fine = load_dataset(str(root))
    coarse = load_dataset(str(root), labels_key="coarse_labels")
    with open(root / "train", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    np.testing.assert_array_equal(fine.label_names[fine.labels], [f"f{v}" for v in raw[b"fine_labels"]])
    np.testing.assert_array_equal(coarse.label_names[coarse.labels], [f"c{v}" for v in raw[b"coarse_labels"]])
    assert len(fine.test) == 5 and fine.test.own_split
    with pytest.raises(ValueError, match="labels_key='bogus'.*fine_labels"):
        load_dataset(str(root), labels_key="bogus")


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.fromarray(array).save(path)


def _split_folder(root, rng, shape, *, train: int, test: int, classes=("a", "b")):
    """``root/train/<class>/i.png`` and ``root/test/<class>/i.png``: random uint8 images of ``shape``."""
    for split, n in (("train", train), ("test", test)):
        for cls in classes:
            for i in range(n):
                _png(str(root / split / cls / f"{i}.png"), rng.integers(0, 256, shape, dtype=np.uint8))


def test_an_image_folder_reads_classes_in_name_order(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "shapes"
    images = {}
    for cls in ("zebra", "apple"):
        for i in range(3):
            a = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # H=6, W=8, RGB
            _png(str(root / cls / f"{i}.png"), a)
            images[(cls, i)] = a
    (root / "apple" / "notes.txt").write_text("not an image")  # other files are skipped
    (root / ".hidden").mkdir()
    ds = load_dataset(str(root))
    assert ds.shape == (3, 6, 8) and ds.num_classes == 2 and ds.test is None
    assert isinstance(ds.x, Pixels) and ds.x.store.paths[0].endswith("0.png")  # read when used, file by file
    assert list(ds.label_names) == ["apple", "zebra"]
    want = [images[("apple", i)] for i in range(3)] + [images[("zebra", i)] for i in range(3)]
    np.testing.assert_array_equal(ds.x, _scaled(np.stack(want).transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])


def test_an_image_folder_with_train_and_test_and_grayscale(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "gray"
    _split_folder(root, rng, (5, 5), train=4, test=2)
    ds = load_dataset(str(root))
    assert ds.shape == (1, 5, 5) and len(ds) == 8 and len(ds.test) == 4
    train, test = train_test_split(ds)
    np.testing.assert_array_equal(test.labels, [0, 0, 1, 1])
    first = np.asarray(PIL.open(root / "test" / "a" / "0.png"))
    np.testing.assert_array_equal(test.x[0, 0], _scaled(first))


def test_data_folder_refusals(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "mixed"
    _png(str(root / "a" / "0.png"), rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    _png(str(root / "a" / "1.png"), rng.integers(0, 256, (5, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"1\.png' is 4x5, but .*0\.png' is 4x4"):
        load_dataset(str(root))
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no .png/.jpg/.jpeg image"):
        load_dataset(str(empty))
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "empty" / "a"))
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="0.png' cannot be read"):
        load_dataset(str(broken))
    truncated = tmp_path / "truncated"
    for i in range(2):
        _png(str(truncated / "a" / f"{i}.png"), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    body = (truncated / "a" / "1.png").read_bytes()
    (truncated / "a" / "1.png").write_bytes(body[:len(body) // 2])  # its header is whole, its pixels are not
    ds = load_dataset(str(truncated))  # the headers are read now, the pixels when used
    np.asarray(ds.x[:1])
    with pytest.raises(ValueError, match="1.png' cannot be read"):
        np.asarray(ds.x)
    with pytest.raises(ValueError, match="labels_key='y' does not apply to an image folder"):
        load_dataset(str(root), labels_key="y")
    with pytest.raises(ValueError, match="key='x' applies to .npz/.h5 files"):
        load_dataset(str(root), key="x")


def test_cifar_folder_refusals_and_a_pickle_that_would_run_code(tmp_path):
    root = tmp_path / "c10"
    make_cifar10(root)
    os.remove(root / "data_batch_3")
    with pytest.raises(ValueError, match="lacks data_batch_3"):
        load_dataset(str(root))
    make_cifar10(root)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(root / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(ValueError, match="data_batch_2' is not a readable CIFAR batch.*refusing"):
        load_dataset(str(root))
    assert not (tmp_path / "pwned").exists()
    _write_batch(root / "data_batch_2", np.zeros((6, 100), np.uint8), [0] * 6)
    with pytest.raises(ValueError, match=r"must be uint8 of shape \(N, 3072\)"):
        load_dataset(str(root))
    _write_batch(root / "data_batch_2", np.zeros((6, 3072), np.uint8), [0] * 5)
    with pytest.raises(ValueError, match="'labels' has 5 entries for 6 images"):
        load_dataset(str(root))


def test_training_reads_an_image_folder_and_says_it_uses_its_own_test_split(tmp_path):
    from dxtrain.train import TrainConfig, train

    rng = np.random.default_rng(5)
    root = tmp_path / "tiny"
    _split_folder(root, rng, (8, 8, 3), train=6, test=2)
    lines = []
    cfg = TrainConfig(data=str(root), out=str(tmp_path / "run"), steps=2, batch=8, positives=8, landmarks=4,
                      device="cpu", evaluate=False, progress=False)
    result = train(cfg, log=lines.append)
    assert result["step"] == 2
    assert any("12 train / 4 test (its own test split), sample shape (3, 8, 8), 2 classes" in m for m in lines), lines
    assert not any("--test-fraction" in m for m in lines)
    lines.clear()
    cfg = TrainConfig(data=str(root), out=str(tmp_path / "run2"), steps=1, batch=8, positives=8, landmarks=4,
                      device="cpu", evaluate=False, progress=False, test_fraction=0.3)
    train(cfg, given={"test_fraction"}, log=lines.append)  # given on purpose: the user hears it is not used
    assert "note: --test-fraction does not apply: this data set has its own test split" in lines, lines
