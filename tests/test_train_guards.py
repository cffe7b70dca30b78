"""No silent failure, no traceback: runs that cannot learn are refused, adapted settings announced
(dxtrain/guards.py, the set-up and loop of dxtrain/train.py, ProjectedFieldSet.build in dxtrain/fields.py).

Covered:

* a batch under two generated samples per class (bidirectional field) is refused before any work,
  naming the batch, the classes, the per-class count and the minimum; row normalisation may take it;
  a batch that does not split evenly over the classes is announced with the values used;
* the drift exactly zero on every step of the first window stops the run with a clear error;
* landmarks clamped per class (a one-sample class no longer cuts every class to one landmark), the
  clamp announced, ``--landmarks 100000`` announced and fast; dxfield's progress bars on a terminal;
* positives (and the correction's sample) per class as used, announced;
* summaries from the run's own folder left by an earlier run with other settings are refused; an
  explicit ``--cache`` built otherwise is used, announced, and its values recorded in config.json;
* a CUDA device without CuPy is refused at set-up, naming the ``gpu`` extra and ``--device cpu``.

Tiny runs on the CPU (raw features, a handful of steps), in-process: the library's ``train`` and
the CLI through click's ``CliRunner``.
"""

import json
import os
import sys

import numpy as np
import pytest

import dxtrain  # noqa: F401  (before torch: the sleep-waiting thread pools)
from helpers import assert_refused, describe

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

import dxfield.summaries as dx_summaries  # noqa: E402
import dxtrain.fields as dx_fields  # noqa: E402
import dxtrain.guards as guards  # noqa: E402
import dxtrain.train as dx_train  # noqa: E402
from dxtrain.cli import main  # noqa: E402
from dxtrain.fields import GroupDrift, ProjectedFieldSet  # noqa: E402
from dxtrain.train import TrainConfig, train  # noqa: E402

FAST = ["--positives", "60", "--landmarks", "8", "--log-every", "2", "--sample-every", "100",
        "--checkpoint-every", "100", "--no-eval", "--no-progress", "--device", "cpu", "--encoder", "none"]


# --------------------------------------------------------------------------- helpers


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def cli_train(out, *extra, data="digits", steps=4, batch=40, ok=True):
    result = invoke("train", "--data", data, "--out", out, "--steps", steps, "--batch", batch, *FAST, *extra)
    if ok:
        assert result.exit_code == 0, describe(result)
    return result






def config(tmp_path, **kw) -> TrainConfig:
    base = dict(data="digits", out=str(tmp_path / "run"), steps=4, batch=40, positives=60, landmarks=8,
                log_every=2, sample_every=100, checkpoint_every=100, evaluate=False, progress=False,
                device="cpu", encoder="none")
    return TrainConfig(**{**base, **kw})


def library_train(tmp_path, **kw):
    """``train(TrainConfig(...))``: ``(result, log lines)``."""
    lines = []
    return train(config(tmp_path, **kw), log=lines.append), lines


def small_class_npz(tmp_path, small=3):
    """Two classes of 2-D points: 300 in class 0, ``small`` in class 1 (``small - 1`` stay in training)."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(300, np.int64), np.ones(small, np.int64)]
    x = (rng.normal(size=(labels.size, 2)) + 3.0 * labels[:, None]).astype(np.float32)
    path = tmp_path / "small.npz"
    np.savez(path, x=x, labels=labels)
    return path


def read_config(out) -> dict:
    with open(os.path.join(out, "config.json")) as fh:
        return json.load(fh)


def shard_sizes(folder) -> dict:
    field = ProjectedFieldSet.load(str(folder))
    pf = next(iter(field.fields.values()))
    return {s.label: s.m for s in pf.shards}


# --------------------------------------------------------------------------- 1. runs that cannot learn


def test_batch_of_one_per_class_is_refused_before_any_work(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the batch check comes before the generator is made")

    monkeypatch.setattr(dx_train, "make_generator", no_model)
    result = cli_train(tmp_path / "run", batch=10, ok=False)
    error = assert_refused(result, "batch=10", "10 classes", "1 generated sample", "at least 2 per class",
                           "--batch 20")
    assert "bidirectional" in error
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "summaries").exists()


@pytest.mark.parametrize("field", ["exact", "projected"])
def test_library_refuses_too_small_batch(tmp_path, field):
    with pytest.raises(ValueError, match=r"batch=15 over 10 classes gives 1 generated sample.*at least 2"):
        library_train(tmp_path, field=field, batch=15)


def test_unconditional_batch_of_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"batch=1\b.*--batch 2"):
        library_train(tmp_path, data="moons", conditional=False, field="exact", batch=1)


def test_row_normalisation_learns_from_one_sample_per_class(tmp_path):
    result, lines = library_train(tmp_path, field="exact", normalization="row", batch=5)
    assert result["drift_norm"] > 0
    assert any("batch: 5 over 10 classes is 1 generated samples per class, 10 per step" in s for s in lines), lines


def test_uneven_batch_is_announced_with_the_values_used(tmp_path):
    result = cli_train(tmp_path / "run", "--field", "exact", batch=45)
    assert "batch: 45 over 10 classes is 4 generated samples per class, 40 per step" in result.stderr


def _zero_field(monkeypatch, calls, nonzero_from=None):
    """Make the exact field return an all-zero drift (from step ``nonzero_from`` on: the real one)."""
    real = dx_fields.ExactField.__call__

    def field(self, feats, *args, **kw):
        calls.append(1)
        if nonzero_from is not None and len(calls) >= nonzero_from:
            return real(self, feats, *args, **kw)
        return {k: GroupDrift(torch.zeros_like(f).detach(), 1.0) for k, f in feats.items()}

    monkeypatch.setattr(dx_fields.ExactField, "__call__", field)


def test_zero_drift_on_the_first_steps_stops_the_run(tmp_path, monkeypatch):
    calls = []
    _zero_field(monkeypatch, calls)
    with pytest.raises(guards.NoDrift, match=r"exactly 0 .* first 25 step.*--batch") as info:
        library_train(tmp_path, data="moons", field="exact", batch=8, positives=16, steps=100, log_every=5)
    assert len(calls) == guards.ZERO_DRIFT_STEPS  # stopped at the end of the window, not trained on
    assert str(tmp_path / "run") in str(info.value)


def test_zero_drift_in_a_short_run_is_a_clean_cli_error(tmp_path, monkeypatch):
    calls = []
    _zero_field(monkeypatch, calls)
    result = cli_train(tmp_path / "run", "--field", "exact", data="moons", steps=3, ok=False)
    assert_refused(result, "exactly 0", "first 3 step", "learn nothing")
    assert len(calls) == 3


def test_a_drift_that_moves_once_in_the_window_trains_on(tmp_path, monkeypatch):
    calls = []
    _zero_field(monkeypatch, calls, nonzero_from=7)
    result, _ = library_train(tmp_path, data="moons", field="exact", batch=8, positives=16, steps=30,
                              log_every=10)
    assert result["step"] == 30 and len(calls) == 30


def test_class_without_training_samples_is_refused():
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] of 3 have no sample"):
        guards.check_classes(np.array([0, 0, 2]), 3)
    guards.check_classes(np.array([0, 1, 2]), 3)
    guards.check_classes(None, 0)


# --------------------------------------------------------------------------- 2-3. clamps, per class


def test_landmarks_are_clamped_per_class_and_announced(tmp_path):
    path = small_class_npz(tmp_path)
    out = tmp_path / "run"
    result = invoke("train", "--data", path, "--out", out, "--steps", 2, "--batch", 20, *FAST)
    assert result.exit_code == 0, describe(result)
    assert "landmarks: 8 per class, but 1 of 2 classes hold fewer samples and use all of them (class 1: 2)" \
        in result.stderr
    assert shard_sizes(out / "summaries") == {0: 8, 1: 2}  # not every class cut to the smallest


def test_huge_landmarks_are_announced_and_take_every_sample(tmp_path, monkeypatch):
    def no_selection(*a, **k):
        raise AssertionError("all of a class's samples are its landmarks: nothing to select")

    monkeypatch.setattr("dxfield.projected.select", no_selection)
    out = tmp_path / "run"
    result = cli_train(out, "--landmarks", 100000, steps=2)
    assert "landmarks: 100000 per class asked for, more than any class holds: every class uses all its samples" \
        in result.stderr
    assert "building summaries of 1528 samples" in result.stderr
    train_ds, _, _ = dx_train.setup(TrainConfig(data="digits"))
    counts = np.bincount(train_ds.labels)
    assert shard_sizes(out / "summaries") == {c: int(k) for c, k in enumerate(counts)}


def test_unconditional_landmarks_clamped_to_the_data(tmp_path):
    path = small_class_npz(tmp_path)
    result = invoke("train", "--data", path, "--unconditional", "--out", tmp_path / "run", "--steps", 2,
                    "--batch", 20, *FAST[:2], "--landmarks", 1000, *FAST[4:])
    assert result.exit_code == 0, describe(result)
    assert "landmarks: 1000 asked for, but the training split holds 257 samples: all 257 are landmarks" \
        in result.stderr


def test_per_class_build_equals_dxfield_build_where_nothing_is_clamped():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(100, 3))
    lab = np.r_[np.zeros(50, int), np.ones(50, int)]
    y[lab == 1] += 3
    x, xl = rng.normal(size=(8, 3)), np.r_[[0] * 4, [1] * 4]
    kw = dict(temperatures=(0.05, 0.2), method="kmeans", seed=0, memory_budget=None, progress=False)
    ref = ProjectedFieldSet.build({"g": y}, labels=lab, landmarks=50, **kw).fields["g"]
    got = dx_fields._build_per_class(y, lab, {0: 50, 1: 50}, summarize=True, **kw)
    assert got.feature_scale == ref.feature_scale and [s.n for s in got.shards] == [50, 50]
    for norm in ("bidirectional", "row"):
        np.testing.assert_allclose(got.field(x, labels=xl, normalization=norm),
                                   ref.field(x, labels=xl, normalization=norm), atol=1e-10)


def test_clamped_sharded_build_equals_single():
    rng = np.random.default_rng(1)
    lab = np.r_[np.zeros(200, int), np.ones(5, int)]
    x = rng.normal(size=(lab.size, 4)) + lab[:, None]
    kw = dict(labels=lab, temperatures=(0.05, 0.2), landmarks=8, method="kmeans", seed=0)
    ref = ProjectedFieldSet.build({"a": x}, **kw).fields["a"]
    recorded = []
    ProjectedFieldSet.build({"a": x}, rank=0, world_size=2, allreduce=lambda a: recorded.append(a.copy()) or a, **kw)
    got = ProjectedFieldSet.build({"a": x}, rank=1, world_size=2, allreduce=lambda a: a + recorded[0], **kw)
    got = got.fields["a"]
    assert [(s.label, s.m, s.n) for s in got.shards] == [(0, 8, 200), (1, 5, 5)]
    np.testing.assert_allclose(got.summary_vector(), ref.summary_vector(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("landmarks", [8, 100000])
@pytest.mark.parametrize("terminal, progress, shown", [(True, True, True), (True, False, False),
                                                       (False, True, False)])
def test_summaries_show_progress_on_a_terminal(tmp_path, monkeypatch, landmarks, terminal, progress, shown):
    seen = []
    real = dx_summaries.progress_bar

    def spy(total, desc, *, enabled=False, **kw):
        seen.append(enabled)
        return real(total, desc, enabled=False, **kw)

    monkeypatch.setattr(dx_summaries, "progress_bar", spy)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal, raising=False)
    library_train(tmp_path, steps=1, landmarks=landmarks, progress=progress)
    assert seen and all(s == shown for s in seen)


def test_positives_per_class_are_announced(tmp_path):
    result = cli_train(tmp_path / "run", "--field", "exact", "--positives", 55)
    assert "positives: 55 over 10 classes is 5 real samples per class, 50 per step" in result.stderr


def test_small_class_positives_are_announced(tmp_path):
    path = small_class_npz(tmp_path)
    result = invoke("train", "--data", path, "--field", "exact", "--out", tmp_path / "run", "--steps", 2,
                    "--batch", 20, *FAST)
    assert result.exit_code == 0, describe(result)
    assert ("positives: 60 over 2 classes is 30 real samples per class, 32 per step (1 class(es) hold fewer "
            "and give all theirs: class 1: 2)") in result.stderr


def test_correction_sample_is_announced(tmp_path):
    _, lines = library_train(tmp_path, correction=True, correction_sample=25, steps=2)
    assert any("correction sample: 25 over 10 classes is 2 real samples per class, 20 per step" in s
               for s in lines), lines


def test_projected_options_with_the_exact_field_are_noted(tmp_path):
    result = cli_train(tmp_path / "run", "--field", "exact", "--landmark-method", "uniform", steps=2)
    assert "note: --landmark-method, --landmarks only apply to --field projected" in result.stderr


# --------------------------------------------------------------------------- 4. summaries built otherwise


def test_run_folder_summaries_of_other_settings_are_refused(tmp_path):
    out = tmp_path / "run"
    # an earlier run of this folder died after building its summaries, before its first checkpoint
    assert invoke("summarize", "--data", "digits", "--out", out / "summaries", "--landmarks", 8, "--device", "cpu",
                  "--encoder", "none").exit_code == 0
    result = cli_train(out, "--landmarks", 16, "--landmark-method", "uniform", ok=False)
    error = assert_refused(result, "earlier run", "landmarks: 8 there, 16 in this run",
                           "landmark_method: 'kmeans' there, 'uniform' in this run", "delete or rename")
    assert str(out / "summaries") in error
    assert not (out / "checkpoint.pt").exists()
    # the same settings: used, and said so
    result = cli_train(out)
    assert f"loaded summaries from {out / 'summaries'} (left by an earlier run of this folder)" in result.stderr


def test_explicit_cache_built_otherwise_is_used_announced_and_recorded(tmp_path):
    cache = tmp_path / "cache"
    assert invoke("summarize", "--data", "digits", "--out", cache, "--landmarks", 8, "--landmark-method",
                  "uniform", "--device", "cpu", "--encoder", "none").exit_code == 0
    with open(cache / "manifest.json") as fh:
        assert json.load(fh)["settings"] == {"landmarks": 8, "landmark_method": "uniform", "seed": 0,
                                             "temperatures": [0.02, 0.05, 0.2]}
    out = tmp_path / "run"
    result = cli_train(out, "--cache", cache, "--landmarks", 32)
    assert (f"using the summaries in {cache} as they were built, not as this run's options say (landmarks: 8 "
            "there, 32 in this run; landmark_method: 'uniform' there, 'kmeans' in this run)") in result.stderr
    saved = read_config(out)
    assert saved["landmarks"] == 8 and saved["landmark_method"] == "uniform" and saved["cache"] == str(cache)
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["landmarks"] == 8 and ckpt["config"]["landmark_method"] == "uniform"


def test_cache_of_other_temperatures_names_the_fix(tmp_path):
    cache = tmp_path / "cache"
    invoke("summarize", "--data", "digits", "--out", cache, "--landmarks", 8, "--device", "cpu", "--encoder",
           "none", "--temperatures", "0.05,0.2")
    result = cli_train(tmp_path / "run", "--cache", cache, ok=False)
    assert_refused(result, "temperatures (0.05,0.2", "rebuild", "--temperatures 0.05,0.2")


def test_cache_without_recorded_settings_is_used_with_a_note(tmp_path):
    cache = tmp_path / "cache"
    invoke("summarize", "--data", "digits", "--out", cache, "--landmarks", 8, "--device", "cpu", "--encoder", "none")
    with open(cache / "manifest.json") as fh:
        manifest = json.load(fh)
    del manifest["settings"]  # as an older dxtrain wrote it
    with open(cache / "manifest.json", "w") as fh:
        json.dump(manifest, fh)
    result = cli_train(tmp_path / "run", "--cache", cache)
    assert "do not record how they were built" in result.stderr and "8..8 landmarks per shard" in result.stderr


# --------------------------------------------------------------------------- 5. CuPy on CUDA


def _cuda_without_cupy(monkeypatch):
    monkeypatch.setattr(dx_train, "pick_device", lambda spec: torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "cupy", None)  # find_spec: None, import: ImportError

    def no_data(*a, **k):
        raise AssertionError("the CuPy check comes before any work")

    monkeypatch.setattr(dx_train, "setup", no_data)


def test_cuda_without_cupy_is_refused_at_set_up(tmp_path, monkeypatch):
    _cuda_without_cupy(monkeypatch)
    with pytest.raises(ValueError, match=r"needs CuPy.*not installed.*driftxpress\[gpu\].*--device cpu"):
        library_train(tmp_path, device="cuda")


def test_cuda_without_cupy_is_a_clean_cli_error(tmp_path, monkeypatch):
    _cuda_without_cupy(monkeypatch)
    result = invoke("train", "--data", "digits", "--out", tmp_path / "run", "--device", "cuda", "--no-eval")
    assert_refused(result, "CuPy", "pip install \"driftxpress[gpu]\"", "--device cpu")


def test_cupy_that_does_not_import_is_named(monkeypatch):
    monkeypatch.setattr(guards.importlib.util, "find_spec", lambda name: object())

    def broken(name):
        raise ImportError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setattr(guards.importlib, "import_module", broken)
    with pytest.raises(ValueError, match=r"does not import \(ImportError: libcudart"):
        guards.need_cupy(torch.device("cuda", 0))
    guards.need_cupy(torch.device("cpu"))  # the CPU needs no CuPy


def test_final_evaluation_without_two_test_samples_is_refused_before_training(tmp_path):
    """A test split of one sample cannot be evaluated: said before any step, not after the whole run."""
    from dxtrain.train import TrainConfig, train

    x = np.random.default_rng(0).standard_normal((40, 2)).astype(np.float32)
    np.save(tmp_path / "small.npy", x)
    cfg = TrainConfig(data=str(tmp_path / "small.npy"), out=str(tmp_path / "run"), field="exact", steps=3, batch=8,
                      positives=8, test_fraction=0.02, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"test split holds 1 sample.*--no-eval"):
        train(cfg, log=lambda msg: None)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    cfg.evaluate = False
    assert train(cfg, log=lambda msg: None)["step"] == 3


# --------------------------------------------------------------------------- --cpu-threads


def threads_during_run(tmp_path, **kw):
    """Train 4 steps with torch at 2 intra-op threads before: ``(count at each step, log lines, count after)``;
    torch's own count is put back afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen, lines = [], []
        train(config(tmp_path, **kw), log=lines.append, callback=lambda info: seen.append(torch.get_num_threads()))
        return seen, lines, torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_hold_for_every_step_and_torch_gets_its_own_count_back(tmp_path):
    seen, _, after = threads_during_run(tmp_path, cpu_threads=1)
    assert seen == [1] * 4
    assert after == 2  # the caller's count, put back when the run ends


def test_cpu_threads_below_one_are_refused_by_name(tmp_path):
    result = invoke("train", "--data", "digits", "--out", tmp_path / "run", "--cpu-threads", 0, *FAST)
    assert_refused(result, "--cpu-threads", "x>=1")
    with pytest.raises(ValueError, match="cpu_threads must be >= 1"):
        config(tmp_path, cpu_threads=0).validate()


def test_a_resumed_run_may_change_its_cpu_threads(tmp_path):
    out = tmp_path / "run"
    cli_train(out, steps=2)
    result = cli_train(out, "--resume", "--cpu-threads", 1, steps=4)
    assert json.loads((out / "config.json").read_text())["cpu_threads"] == 1, describe(result)


@pytest.mark.parametrize("data, given, expected", [("moons", None, 1), ("moons", 2, 2), ("digits", None, 2)])
def test_cpu_threads_default_to_one_for_the_mlp_on_vectors_only(tmp_path, data, given, expected):
    """The MLP generator on vectors takes one intra-op thread unless told (docs/design.md 8.21); images (the
    convolution generator) keep torch's count, here 2."""
    seen, lines, _ = threads_during_run(tmp_path, data=data, cpu_threads=given, positives=40, batch=32)
    assert seen == [expected] * 4
    assert any("CPU threads: torch at 1" in line for line in lines) == (given is None and expected == 1)
