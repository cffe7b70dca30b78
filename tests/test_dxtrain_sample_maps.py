"""dxtrain keeps the correction's per-row Nystrom maps (docs/design.md section 8.18): made once, at the first
corrected step, within --feature-ram; the drift is the one computed without them."""

import numpy as np
import torch

import dxfield
from dxtrain import rundir
from dxtrain.fields import ProjectedFieldSet
from dxtrain.train import TrainConfig, train


def field_set(y, labels):
    field = ProjectedFieldSet({"x": dxfield.ProjectedField.build(y, labels=labels, temperatures=(0.05, 0.2),
                                                                  landmarks=16, method="uniform")})
    field.configure(TrainConfig(correction=True))
    return field


def test_kept_maps_give_the_drift_computed_without_them():
    rng = np.random.default_rng(40)
    labels = rng.integers(0, 3, 600)
    y = (rng.standard_normal((600, 5)) + 2 * labels[:, None]).astype(np.float32)
    x = torch.from_numpy((rng.standard_normal((60, 5)) + 2).astype(np.float32))
    qlab = torch.from_numpy(np.arange(60) % 3)
    rows = torch.from_numpy(np.sort(rng.choice(600, 90, replace=False)))
    pos = {"x": torch.from_numpy(y[rows.numpy()])}
    plab = torch.from_numpy(labels[rows.numpy()])
    plain, kept = field_set(y, labels), field_set(y, labels)
    logs = []
    kept.keep_sample_maps({"x": y}, labels, 1 << 30, logs.append)
    assert kept.maps == {}  # made at the first corrected step, not before
    want = plain(({"x": x}), pos, qlab, plab)["x"].v
    got = kept({"x": x}, pos, qlab, plab, pos_rows=rows)["x"].v
    assert kept.maps["x"].shape == (600, 2, 16)
    assert any("sample maps of the 600 training rows kept in RAM" in m for m in logs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
    # the maps are what the call used: shuffled maps move the drift
    kept.maps["x"] = kept.maps["x"][torch.randperm(600)]
    assert float((kept({"x": x}, pos, qlab, plab, pos_rows=rows)["x"].v - want).abs().max()) > 1e-3


def test_maps_over_the_limit_are_not_made_and_the_log_says_so():
    rng = np.random.default_rng(41)
    y = rng.standard_normal((300, 4)).astype(np.float32)
    field = field_set(y, None)
    logs = []
    field.keep_sample_maps({"x": y}, None, field.sample_map_bytes(300) - 1, logs.append)
    x = torch.from_numpy(rng.standard_normal((20, 4)).astype(np.float32))
    rows = torch.arange(50)
    field({"x": x}, {"x": torch.from_numpy(y[:50])}, pos_rows=rows)
    assert field.maps == {}
    assert any("would take" in m and "--feature-ram" in m for m in logs)


def test_a_corrected_run_keeps_the_maps_and_resumes_exactly(tmp_path):
    rng = np.random.default_rng(42)
    labels = rng.integers(0, 3, 900)
    np.savez(tmp_path / "data.npz", x=(rng.standard_normal((900, 6)) + labels[:, None]).astype(np.float32),
             labels=labels)
    base = dict(data=str(tmp_path / "data.npz"), steps=6, batch=64, positives=64, landmarks=16, correction=True, seed=3,
                evaluate=False, progress=False, log_every=1, sample_every=10 ** 9, checkpoint_every=3)
    logs = []
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **base), log=logs.append)
    assert any("sample maps of the" in m and "kept in RAM" in m for m in logs)
    train(TrainConfig(out=str(tmp_path / "half"), **{**base, "steps": 3}), log=lambda m: None)
    resumed = train(TrainConfig(out=str(tmp_path / "half"), **base), resume=True, log=lambda m: None)
    a, _ = rundir.load_checkpoint_file(str(tmp_path / "whole" / rundir.CHECKPOINT), "")
    b, _ = rundir.load_checkpoint_file(str(tmp_path / "half" / rundir.CHECKPOINT), "")
    assert whole["step"] == resumed["step"] == a["step"] == b["step"] == 6
    for name in a["generator"]:
        assert torch.equal(a["generator"][name], b["generator"][name]), name
