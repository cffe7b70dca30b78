"""The real data's features in a chunked HDF5 file (dxtrain.featcache): identity, resume, memory."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import torch

from dxtrain.data import load_dataset
from dxtrain.featcache import FeatureFile, build_features, fingerprint
from dxtrain.features import FeatureGroups, builtin_encoder
from dxtrain.realfeats import compute_features


def _encoder(seed=0):
    """The builtin encoder's feature groups (weights from ``seed``), an encode function, and its calls."""
    groups = FeatureGroups((1, 8, 8), builtin_encoder(1, seed=seed))
    calls = []

    def encode(chunk):
        calls.append(len(chunk))
        with torch.no_grad():
            return {k: v.numpy() for k, v in groups(torch.from_numpy(chunk)).items()}

    return groups, encode, calls


def _fp(x, groups, spec="builtin"):
    return fingerprint(x, spec, groups.encoder, groups.dims)


def test_the_file_holds_what_the_encoder_gives_row_for_row(tmp_path):
    x = load_dataset("digits").x[:300]
    groups, encode, calls = _encoder()
    ff = build_features(str(tmp_path / "f.h5"), x, encode, _fp(x, groups), chunk=64)
    assert calls == [64, 64, 64, 64, 44] and not os.path.exists(tmp_path / "f.h5.partial")
    ref = compute_features(groups, x, "cpu", chunk=300)  # in RAM, one pass: the reference
    idx = np.array([299, 0, 17, 17, 150])
    got = ff.rows(idx)
    assert set(got) == set(ref) and len(got) == len(groups.names)
    for name, r in ref.items():
        np.testing.assert_allclose(got[name], r[idx], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.concatenate(list(ff.chunks(name, 100))), r, rtol=1e-5, atol=1e-6)
    ff.close()
    again = build_features(str(tmp_path / "f.h5"), x, encode, _fp(x, groups))  # opened, not rebuilt
    assert len(calls) == 5 and again.n == 300
    again.close()


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path):
    x = load_dataset("digits").x[:300]
    groups, encode, calls = _encoder()

    def stops_at_third(chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(chunk)

    path = str(tmp_path / "f.h5")
    with pytest.raises(KeyboardInterrupt):
        build_features(path, x, stops_at_third, _fp(x, groups), chunk=64)
    assert not os.path.exists(path) and os.path.exists(path + ".partial")
    lines = []
    with build_features(path, x, encode, _fp(x, groups), chunk=64, log=lines.append) as ff:
        assert calls == [64, 64, 64, 64, 44]  # two chunks before the interruption, three after
        assert any("resuming the feature file build at row 128" in m for m in lines)
        whole = build_features(str(tmp_path / "whole.h5"), x, _encoder()[1], _fp(x, groups), chunk=64)
        for name in ff.groups:
            np.testing.assert_array_equal(ff.groups[name][()], whole.groups[name][()])
        whole.close()


def test_a_file_of_other_data_or_weights_is_refused_and_a_foreign_partial_started_over(tmp_path):
    x = load_dataset("digits").x[:100]
    groups, encode, _ = _encoder()
    path = str(tmp_path / "f.h5")
    build_features(path, x, encode, _fp(x, groups), chunk=64).close()
    y = x.copy()
    y[5, 0, 0, 0] += 0.5
    with pytest.raises(ValueError, match="other data, encoder or weights.*samples_sha256"):
        build_features(path, y, encode, _fp(y, groups))
    other, _, _ = _encoder(seed=3)
    with pytest.raises(ValueError, match="encoder_weights_sha256"):
        FeatureFile.open(path, _fp(x, other))
    with pytest.raises(ValueError, match="not a complete dxtrain feature file"):
        import h5py
        with h5py.File(tmp_path / "junk.h5", "w") as f:
            f.attrs["format"] = 1
        FeatureFile.open(str(tmp_path / "junk.h5"))
    # a partial left by a build of other data is removed and the build starts over
    os.rename(path, str(tmp_path / "g.h5.partial"))
    lines = []
    build_features(str(tmp_path / "g.h5"), y, encode, _fp(y, groups), chunk=64, log=lines.append).close()
    assert any("starting the feature file over" in m for m in lines)


def test_the_peak_memory_of_a_build_does_not_grow_with_the_data(tmp_path):
    rng = np.random.default_rng(0)
    groups, encode, _ = _encoder()
    peaks = []
    for n in (1000, 4000):
        x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
        fp = _fp(x, groups)
        tracemalloc.start()
        build_features(str(tmp_path / f"f{n}.h5"), x, encode, fp, chunk=128).close()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    features_per_row = 4 * sum(groups.dims.values())
    assert peaks[1] < peaks[0] * 1.3, peaks  # 4x the data, about the same peak
    assert peaks[1] < 4000 * features_per_row / 4, (peaks, 4000 * features_per_row)  # far below all features


def _image_run(tmp_path, name, **kw):
    from dxtrain.train import TrainConfig

    return TrainConfig(data="digits", out=str(tmp_path / name), steps=3, batch=20, positives=30, landmarks=8,
                       device="cpu", evaluate=False, progress=False, seed=3, **kw)


def test_training_computes_the_feature_file_once_and_reuses_it(tmp_path, monkeypatch):
    """Runs on the same data and encoder share one feature file in $DXTRAIN_CACHE/features/."""
    from dxtrain.train import train

    monkeypatch.setenv("DXTRAIN_CACHE", str(tmp_path / "cache"))
    first, second = [], []
    train(_image_run(tmp_path, "a", field="exact"), log=first.append)
    files = os.listdir(tmp_path / "cache" / "features")
    assert len([f for f in files if f.endswith(".h5")]) == 1, files
    assert not [f for f in files if f.endswith(".lock")], files  # the build lock is removed with the build
    assert any(m.startswith("computing the features of 1528 samples") for m in first), first
    train(_image_run(tmp_path, "b"), log=second.append)  # the projected field: its summaries read the same file
    assert not any(m.startswith("computing the features") for m in second), second
    assert any("MiB in RAM" in m for m in second)
    assert sorted(os.listdir(tmp_path / "cache" / "features")) == sorted(files)


@pytest.mark.parametrize("field", ["exact", "projected"])
def test_features_larger_than_feature_ram_stay_in_the_file_and_train_identically(tmp_path, field):
    """With --feature-ram below the features' size, the summaries stream the file and the positives are
    read as rows: the run is the same, weight for weight, as with the features in RAM.  (The corrected
    projected field in RAM also keeps its sample maps, docs/design.md section 8.18, and the run from the
    file, with no RAM left for them, computes each step's: the same sums in another order, so equal to
    float32 rounding there.)"""
    from dxtrain.rundir import read_checkpoint
    from dxtrain.train import train

    models = []
    for name, ram in (("ram", None), ("disk", "1KiB")):
        lines = []
        cfg = _image_run(tmp_path, name, field=field, correction=field == "projected",
                         features=str(tmp_path / "feats.h5"), feature_ram=ram)
        train(cfg, log=lines.append)
        assert any(("read from " + str(tmp_path / "feats.h5")) in m for m in lines) == (ram is not None), lines
        if field == "projected":
            assert any("sample maps of the" in m and "kept in RAM" in m for m in lines) == (ram is None), lines
        models.append(read_checkpoint(str(tmp_path / name))["generator"])
    tol = 0 if field == "exact" else 5e-5  # float32 sums in another order, through the steps (2.2e-5 measured)
    for k, v in models[0].items():
        torch.testing.assert_close(models[1][k], v, rtol=0, atol=tol * max(1.0, float(v.abs().max())))


def test_a_bad_feature_ram_is_refused_naming_it():
    from dxtrain.train import TrainConfig

    with pytest.raises(ValueError, match="feature_ram"):
        TrainConfig(feature_ram="lots").validate()


def test_the_build_lock_excludes_other_builders_and_leaves_no_file(tmp_path):
    """Builders that wait on a lock file its holder removes lock the path afresh: never two at once."""
    import threading
    import time

    from dxtrain.realfeats import _build_lock

    path = str(tmp_path / "feats.h5")
    inside, overlaps, done = [0], [], []

    def builder():
        for _ in range(5):
            with _build_lock(path):
                inside[0] += 1
                overlaps.append(inside[0])
                time.sleep(0.002)
                inside[0] -= 1
        done.append(1)

    threads = [threading.Thread(target=builder) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(done) == 4 and max(overlaps) == 1, overlaps
    assert not os.path.exists(path + ".lock")
