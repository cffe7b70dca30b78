"""HDF5 summary caches of ``dxfield.ProjectedField`` (dxfield/cache.py).

* ``save``/``load`` round trips leave every stored quantity, the attraction and
  the field bit-for-bit unchanged (unconditional and class caches, both kernels,
  float32 and float64, feature scale fixed / auto / None);
* ``load`` refuses caches built for another kernel, temperature set, dimension
  or feature scale than the caller expects, naming each difference;
* damaged files are refused with ``ValueError``: truncated, bytes flipped in an
  array, metadata edited without the checksum, another format version, not
  HDF5 at all, HDF5 without the metadata, a missing array; a missing path is
  ``FileNotFoundError``;
* ``save`` is atomic: a write that fails midway leaves the previous file intact
  and no temporary files behind.
"""

import json
import os

import numpy as np
import pytest

import dxfield
from dxfield.projected import merge

h5py = pytest.importorskip("h5py")


def _data(seed, n, d, shift=0.0, dtype=np.float64):
    return (np.random.default_rng(seed).normal(size=(n, d)) + shift).astype(dtype)


CONFIGS = {
    "plain-laplace-f32": dict(dtype=np.float32, kw=dict(landmarks=16, method="uniform", temperatures=(0.02, 0.05, 0.2))),
    "labels-gaussian-f64": dict(dtype=np.float64, labels=True,
                                kw=dict(landmarks=8, method="kmeans", kernel="gaussian", temperatures=(0.05, 0.2))),
    "fixed-scale": dict(dtype=np.float64, kw=dict(landmarks=12, method="kcenter", feature_scale=0.75,
                                                  temperatures=(0.1,), ridge=1e-3, den_floor=1e-6)),
    "no-scale": dict(dtype=np.float64, kw=dict(landmarks=12, method="uniform", feature_scale=None,
                                               temperatures=(0.5, 2.0))),
}


def _build(name):
    cfg = CONFIGS[name]
    y = _data(1, 150, 4, dtype=cfg["dtype"])
    labels = (np.arange(150) % 3) if cfg.get("labels") else None
    return dxfield.ProjectedField.build(y, labels=labels, **cfg["kw"]), labels


@pytest.fixture(scope="module")
def cache():
    pf, _ = _build("plain-laplace-f32")
    return pf


def _assert_same_cache(a, b):
    for attr in ("kernel", "temperatures", "ridge", "eig_clamp", "feature_scale", "dim", "dtype", "den_floor",
                 "classes", "fingerprint", "n_samples", "n_landmarks"):
        assert getattr(a, attr) == getattr(b, attr), attr
    np.testing.assert_array_equal(a.centre, b.centre)
    for sa, sb in zip(a.shards, b.shards):
        assert sa.label == sb.label and sa.n == sb.n and sa.spectra == sb.spectra
        np.testing.assert_array_equal(sa.landmarks, sb.landmarks)
        for k in range(len(a.temperatures)):
            np.testing.assert_array_equal(sa.t[k], sb.t[k])
            np.testing.assert_array_equal(sa.G[k], sb.G[k])
            np.testing.assert_array_equal(sa.factors[k], sb.factors[k])


# ---------------------------------------------------------------------------------------
# round trip


@pytest.mark.filterwarnings("ignore::dxfield.ClassesCombinedWarning")  # unlabelled queries on purpose
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_exact(tmp_path, name):
    pf, labels = _build(name)
    path = tmp_path / "cache.h5"
    pf.save(path)
    assert sorted(os.listdir(tmp_path)) == ["cache.h5"]  # no temporary file left behind
    back = dxfield.ProjectedField.load(path)
    _assert_same_cache(back, pf)
    x = _data(2, 20, 4, shift=0.3, dtype=CONFIGS[name]["dtype"])
    np.testing.assert_array_equal(back.attraction(x), pf.attraction(x))
    np.testing.assert_array_equal(back.field(x), pf.field(x))
    np.testing.assert_array_equal(back.field(x, drift_norm=False), pf.field(x, drift_norm=False))
    np.testing.assert_array_equal(back.field(x, repulsion="nystrom"), pf.field(x, repulsion="nystrom"))
    if labels is not None:
        lq = np.arange(20) % 3
        np.testing.assert_array_equal(back.field(x, labels=lq), pf.field(x, labels=lq))
    # loading with the right expectations is fine, and str paths work
    again = dxfield.ProjectedField.load(str(path), kernel=pf.kernel, temperatures=pf.temperatures, dim=pf.dim,
                                        feature_scale=pf.feature_scale)
    np.testing.assert_array_equal(again.field(x), pf.field(x))


def test_save_replaces_an_existing_file_and_creates_folders(tmp_path, cache):
    path = tmp_path / "sub" / "dir" / "cache.h5"
    other, _ = _build("no-scale")
    other.save(path)
    cache.save(path)
    _assert_same_cache(dxfield.ProjectedField.load(path), cache)
    assert os.listdir(path.parent) == ["cache.h5"]


def test_loaded_caches_merge_like_built_ones(tmp_path):
    y = _data(3, 200, 3)
    kw = dict(landmarks=y[:15], feature_scale=1.0, temperatures=(0.05, 0.2))
    whole = dxfield.ProjectedField.build(y, **kw)
    dxfield.ProjectedField.build(y[:120], **kw).save(tmp_path / "a.h5")
    dxfield.ProjectedField.build(y[120:], **kw).save(tmp_path / "b.h5")
    merged = merge(dxfield.ProjectedField.load(tmp_path / "a.h5"), dxfield.ProjectedField.load(tmp_path / "b.h5"))
    merged.save(tmp_path / "m.h5")
    back = dxfield.ProjectedField.load(tmp_path / "m.h5")
    x = _data(4, 10, 3)
    np.testing.assert_allclose(back.field(x), whole.field(x), atol=1e-10)
    assert back.n_samples == 200


# ---------------------------------------------------------------------------------------
# expectations


@pytest.mark.parametrize("expect, words", [
    (dict(kernel="gaussian"), ["kernel", "laplace", "gaussian"]),
    (dict(temperatures=(0.02, 0.05)), ["temperatures"]),
    (dict(temperatures=0.05), ["temperatures"]),
    (dict(temperatures=(0.02, 0.05, 0.3)), ["temperatures"]),
    (dict(dim=5), ["D=4", "D=5"]),
    (dict(feature_scale=123.0), ["feature scale", "123"]),
    (dict(kernel="gaussian", dim=7), ["kernel", "D=7"]),
])
def test_load_refuses_caches_built_for_other_settings(tmp_path, cache, expect, words):
    path = tmp_path / "cache.h5"
    cache.save(path)
    with pytest.raises(ValueError) as info:
        dxfield.ProjectedField.load(path, **expect)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


def test_load_refuses_an_expected_scale_for_an_unscaled_cache(tmp_path):
    pf, _ = _build("no-scale")
    pf.save(tmp_path / "c.h5")
    with pytest.raises(ValueError, match="feature scale"):
        dxfield.ProjectedField.load(tmp_path / "c.h5", feature_scale=1.0)
    # "auto" means: whatever was stored
    dxfield.ProjectedField.load(tmp_path / "c.h5", feature_scale="auto")


# ---------------------------------------------------------------------------------------
# damaged files


@pytest.mark.parametrize("keep", [0.5, 0.9, -1])
def test_truncated_files_are_refused(tmp_path, cache, keep):
    path = tmp_path / "cache.h5"
    cache.save(path)
    raw = path.read_bytes()
    cut = len(raw) - 1 if keep == -1 else int(len(raw) * keep)
    path.write_bytes(raw[:cut])
    with pytest.raises(ValueError):
        dxfield.ProjectedField.load(path)


@pytest.mark.parametrize("dataset", ["shards/0/landmarks", "shards/0/t_0", "shards/0/G_2", "shards/0/factor_1"])
def test_flipped_bytes_in_an_array_are_refused(tmp_path, cache, dataset):
    path = tmp_path / "cache.h5"
    cache.save(path)
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
        size = f[dataset].id.get_storage_size()
    assert offset is not None and size > 0
    raw = bytearray(path.read_bytes())
    where = offset + size // 2
    raw[where] ^= 0x10  # one bit: a finite, plausible-looking value
    path.write_bytes(bytes(raw))
    with h5py.File(path, "r") as f:  # still a readable HDF5 file
        assert f[dataset].shape
    with pytest.raises(ValueError, match="checksum"):
        dxfield.ProjectedField.load(path)


def _edit_meta(path, **changes):
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        meta.update(changes)
        f.attrs["meta"] = json.dumps(meta, sort_keys=True)


@pytest.mark.parametrize("changes, match", [
    (dict(version=2), "version"),
    (dict(format="something.else"), "format|not a dxfield"),
    (dict(ridge=0.5), "checksum"),
    (dict(kernel="gaussian"), "checksum"),
    (dict(temperatures=[0.02, 0.05, 0.3]), "checksum"),
    (dict(centre=[0.0, 0.0, 0.0, 1.0]), "checksum"),
])
def test_metadata_edited_without_the_checksum_is_refused(tmp_path, cache, changes, match):
    path = tmp_path / "cache.h5"
    cache.save(path)
    _edit_meta(path, **changes)
    with pytest.raises(ValueError, match=match):
        dxfield.ProjectedField.load(path)


def test_edited_checksum_and_missing_array_are_refused(tmp_path, cache):
    path = tmp_path / "cache.h5"
    cache.save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["checksum"] = "0" * 64
    with pytest.raises(ValueError, match="checksum"):
        dxfield.ProjectedField.load(path)
    cache.save(path)
    with h5py.File(path, "r+") as f:
        del f["shards/0/G_1"]
    with pytest.raises(ValueError, match="truncated or corrupted"):
        dxfield.ProjectedField.load(path)


def test_files_that_are_not_caches(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("this is not an HDF5 file\n" * 50)
    with pytest.raises(ValueError):
        dxfield.ProjectedField.load(text)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        dxfield.ProjectedField.load(empty)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.arange(5))
    with pytest.raises(ValueError, match="not a dxfield summary cache"):
        dxfield.ProjectedField.load(other)
    with pytest.raises(FileNotFoundError):
        dxfield.ProjectedField.load(tmp_path / "missing.h5")


# ---------------------------------------------------------------------------------------
# atomic save


def _failing_create_dataset(monkeypatch, exc=RuntimeError("disk full (simulated)")):
    original = h5py.File.create_dataset
    calls = {"n": 0}

    def create_dataset(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.File, "create_dataset", create_dataset)
    return calls


def test_a_save_that_fails_midway_leaves_the_previous_file_intact(tmp_path, cache, monkeypatch):
    path = tmp_path / "cache.h5"
    previous, _ = _build("no-scale")
    previous.save(path)
    before = path.read_bytes()
    calls = _failing_create_dataset(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        cache.save(path)
    assert calls["n"] == 2  # it really failed midway, after one array was written
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["cache.h5"]
    _assert_same_cache(dxfield.ProjectedField.load(path), previous)


def test_a_save_that_fails_leaves_nothing_when_there_was_no_file(tmp_path, cache, monkeypatch):
    _failing_create_dataset(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        cache.save(tmp_path / "new.h5")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("field", ["address", "index"])
def test_a_corrupted_metadata_attribute_is_refused_with_value_error(tmp_path, cache, field):
    import struct

    path = tmp_path / "cache.h5"
    cache.save(path)
    raw = bytearray(path.read_bytes())
    with h5py.File(path, "r") as f:
        meta = f.attrs["meta"]
    # the attribute's variable-length string is stored as (length u32, heap collection address u64, index u32)
    heap = raw.find(b"GCOL")
    ref = struct.pack("<I", len(meta.encode())) + struct.pack("<Q", heap)
    at = raw.find(ref)
    assert heap > 0 and at > 0 and raw.count(ref) == 1
    raw[at + (4 if field == "address" else 12)] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError):
        dxfield.ProjectedField.load(path)


def test_atomic_write_gives_a_normal_file_mode(tmp_path):
    """The temporary file is 0600; the written file gets the mode any other new file would."""
    import os

    from dxfield.atomic import atomic_write

    atomic_write(tmp_path / "f.bin", lambda fh: fh.write(b"x"))
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    assert (os.stat(tmp_path / "f.bin").st_mode & 0o777) == (os.stat(plain).st_mode & 0o777)
