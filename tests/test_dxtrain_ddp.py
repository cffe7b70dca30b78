"""Multi-process (DDP) training: sharded summaries and a two-process CPU run under torchrun (gloo).

* unit: summaries added shard by shard (``build(summarize=False)`` + ``add_summaries``,
  and :meth:`dxtrain.fields.ProjectedFieldSet.build` with ``world_size=2``) equal a
  single build on all the data, to float64 rounding;
* ``python -m torch.distributed.run --nproc-per-node 2 -m dxtrain train ...`` for both
  fields: exits 0, rank 0 alone writes metrics/checkpoint, both ranks end with the
  same weights (hashes written under ``$DXTRAIN_DEBUG_DIR``), and the projected
  run's summaries equal a single-process build.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
try:
    from torch.distributed import is_gloo_available
except ImportError:  # pragma: no cover
    is_gloo_available = None
if is_gloo_available is not None and not is_gloo_available():
    pytest.skip("the gloo backend is not available", allow_module_level=True)

import dxfield  # noqa: E402
from dxtrain.fields import ProjectedFieldSet  # noqa: E402

REL = 1e-10  # float64 data: the summaries are float64 sums, only the order of the additions differs
REL32 = 1e-5  # float32 features (dxtrain): each chunk's kernel sums are float32, and sharding changes the chunks


def _close(a, b, rel=REL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
    assert float(np.abs(a - b).max(initial=0.0)) <= rel * scale


def _same_summaries(pf: dxfield.ProjectedField, ref: dxfield.ProjectedField, rel=REL):
    assert pf.classes == ref.classes
    assert pf.feature_scale == ref.feature_scale
    np.testing.assert_array_equal(pf.centre, ref.centre)
    for s, r in zip(pf.shards, ref.shards):
        np.testing.assert_array_equal(s.landmarks, r.landmarks)
        assert s.n == r.n
        for k in range(len(ref.temperatures)):
            np.testing.assert_array_equal(s.factors[k], r.factors[k])
            _close(s.t[k], r.t[k], rel)
            _close(s.G[k], r.G[k], rel)


def _data(n=3001, d=5, classes=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + rng.integers(0, classes, size=n)[:, None]
    labels = rng.integers(0, classes, size=n)
    return x.astype(dtype), labels


@pytest.mark.parametrize("conditional", [False, True])
def test_two_shards_add_up_to_a_single_build(conditional):
    x, labels = _data()
    lab = labels if conditional else None
    kw = dict(temperatures=(0.05, 0.2), landmarks=16, method="kmeans", labels=lab, seed=3)
    ref = dxfield.ProjectedField.build(x, **kw)
    parts = []
    for rank in range(2):
        pf = dxfield.ProjectedField.build(x, summarize=False, **kw)
        assert pf.n_samples == 0
        pf.add_summaries(x[rank::2], None if lab is None else lab[rank::2], chunk_size=257)
        parts.append(pf)
    total = parts[0]
    for s, o in zip(total.shards, parts[1].shards):
        s.t = [a + b for a, b in zip(s.t, o.t)]
        s.G = [a + b for a, b in zip(s.G, o.G)]
        s.n += o.n
    total._device_cache.clear()
    _same_summaries(total, ref)
    q = x[:50] + 0.1
    ql = None if lab is None else lab[:50]
    _close(total.field(q, labels=ql), ref.field(q, labels=ql), rel=1e-8)


def test_add_summaries_checks_labels():
    x, labels = _data(n=400)
    cond = dxfield.ProjectedField.build(x, landmarks=8, method="uniform", labels=labels, summarize=False)
    with pytest.raises(ValueError, match="class-conditional"):
        cond.add_summaries(x)
    with pytest.raises(ValueError, match="no shards"):
        cond.add_summaries(x[:3], np.array([0, 1, 7]))
    uncond = dxfield.ProjectedField.build(x, landmarks=8, method="uniform", summarize=False)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.add_summaries(x, labels)
    with pytest.raises(ValueError, match="D=5"):
        uncond.add_summaries(x[:, :3])


@pytest.mark.parametrize("dtype, rel", [(np.float64, REL), (np.float32, REL32)])
def test_field_set_sharded_build_equals_single(dtype, rel):
    x, labels = _data(n=2000, d=4, classes=2, seed=1, dtype=dtype)
    feats = {"a": x, "b": x[:, :2] * 3}
    kw = dict(labels=labels, temperatures=(0.02, 0.2), landmarks=8, method="kmeans", seed=0)
    ref = ProjectedFieldSet.build(feats, **kw)
    # simulate two ranks without processes: rank 0 "reduces" to its own sums (recorded), rank 1 adds them
    recorded = []
    ProjectedFieldSet.build(feats, rank=0, world_size=2, allreduce=lambda a: recorded.append(a.copy()) or a, **kw)
    it = iter(recorded)
    got = ProjectedFieldSet.build(feats, rank=1, world_size=2, allreduce=lambda a: a + next(it), **kw)
    for name in feats:
        _same_summaries(got.fields[name], ref.fields[name], rel)
    with pytest.raises(ValueError, match="allreduce"):
        ProjectedFieldSet.build(feats, rank=0, world_size=2, **kw)


# -- two processes under torchrun ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, debug, field):
    env = dict(os.environ, OMP_NUM_THREADS="1", DXTRAIN_DEBUG_DIR=str(debug))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "dxtrain", "train", "--data", "moons", "--field", field, "--encoder", "none", "--steps", "6",
           "--batch", "40", "--landmarks", "8", "--log-every", "2", "--sample-every", "3",
           "--checkpoint-every", "3", "--no-eval", "--no-progress", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.parametrize("field", ["projected", "exact"])
def test_torchrun_two_processes(tmp_path, field):
    out, debug = tmp_path / "run", tmp_path / "debug"
    _torchrun(out, debug, field)
    with open(out / "metrics.jsonl") as fh:
        steps = [json.loads(line)["step"] for line in fh]
    assert steps == [2, 4, 6]  # rank 0 alone writes metrics
    assert sorted(os.listdir(out / "samples")) == ["step-000003.png", "step-000006.png"]
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 6
    assert not any(k.startswith("module.") for k in ckpt["generator"])  # the unwrapped module
    from dxtrain.models import make_generator

    gen = make_generator(ckpt["config"]["generator"], tuple(ckpt["data"]["shape"]),
                         num_classes=ckpt["data"]["num_classes"])
    gen.load_state_dict(ckpt["generator"])
    hashes = {}
    for rank in (0, 1):
        with open(debug / f"rank{rank}.json") as fh:
            rec = json.load(fh)
        assert rec["step"] == 6
        hashes[rank] = rec["sha256"]
    assert hashes[0] == hashes[1], "the ranks ended with different weights"
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    if field == "exact":
        assert not (out / "summaries").exists()
        return
    # the summaries written by the DDP run equal a single-process build on the same split and settings
    from dxtrain.features import FeatureGroups
    from dxtrain.realfeats import compute_features
    from dxtrain.train import TrainConfig, setup

    cfg = TrainConfig.from_dict(ckpt["config"])
    train_ds, _, cond = setup(cfg)
    groups = FeatureGroups(train_ds.shape, "none", max_locations=cfg.max_locations)
    feats = compute_features(groups, train_ds.x, torch.device("cpu"))
    ref = ProjectedFieldSet.build(feats, labels=train_ds.labels if cond else None, temperatures=cfg.temperatures,
                                  landmarks=cfg.landmarks, method=cfg.landmark_method, seed=cfg.seed)
    got = ProjectedFieldSet.load(str(out / "summaries"), expect=groups.dims, temperatures=cfg.temperatures,
                                 data=feats)
    assert set(got.fields) == set(ref.fields)
    for name in ref.fields:
        assert got.fields[name].n_samples == len(train_ds)
        _same_summaries(got.fields[name], ref.fields[name], REL32)
