"""End-to-end tests of the ``dxtrain`` command line (dxtrain/cli.py, dxtrain/train.py).

Most tests drive the click group in-process with ``CliRunner`` on tiny settings
(a handful of steps, batch 40, 8 landmarks, CPU), so the module runs in well
under a minute and a half on two cores.  A subprocess is used only where the
process matters: the installed console script, and SIGINT delivered to a real
training process.

Covered:

* ``--help`` of the group and of every subcommand;
* ``train`` on digits (projected field) and moons (exact field): the run folder
  (config.json, metrics.jsonl, checkpoint.pt, sample PNGs, summaries); the
  default encoder on 2-D data, the builtin encoder's many feature groups;
* ``--resume``: split run == straight run bit for bit; the two refusals;
* ``--time-budget`` stops early and the files say so;
* ``sample`` (.npz / .png, labels, errors) and ``eval`` (moons, digits);
* ``summarize`` + ``train --cache``, and a cache built for other settings;
* a user's ``.npz`` of 2-D points, and malformed files;
* checkpoint atomicity (a crash inside ``torch.save``; SIGINT in a subprocess
  and in-process) and resuming afterwards;
* DLPack zero-copy between torch and dxfield, also inside a real step.

An interrupted run exits with status 130 (the shell's SIGINT convention) after
saving its checkpoint.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dxtrain  # noqa: F401  (before torch: it sets the sleep-waiting thread pools the trainer relies on)
from helpers import describe  # noqa: E402

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

import dxfield  # noqa: E402
import dxtrain.fields as dx_fields  # noqa: E402
import dxtrain.train as dx_train  # noqa: E402
from dxtrain.cli import main  # noqa: E402
from dxtrain.pictures import read_png  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
posix_signals = pytest.mark.skipif(sys.platform == "win32", reason="POSIX SIGINT delivery")

# Tiny settings shared by every training run: CPU so results are bit-reproducible on any machine, and
# the raw-sample feature group (--encoder none) so the runs stay fast whatever the default encoder is.
FAST = ["--batch", "40", "--positives", "60", "--landmarks", "8", "--log-every", "2", "--sample-every", "3",
        "--checkpoint-every", "3", "--no-eval", "--no-progress", "--device", "cpu", "--encoder", "none"]
SUMMARIZE_FAST = ["--landmarks", "8", "--device", "cpu", "--encoder", "none"]
METRIC_KEYS = {"step", "wall", "loss", "drift_norm", "field_s", "steps_per_s"}
DIGITS_GRID = (331, 331)  # 100 samples, 10 per row, 8x8 scaled x4, 1 px padding: 10 * 33 + 1
SCATTER = (512, 512, 3)


# --------------------------------------------------------------------------- helpers


def invoke(*args, ok=True):
    """Run ``dxtrain ARGS`` in-process; with ``ok`` assert exit code 0 (showing the output if not);
    ``ok=130``: the run was interrupted (SIGINT) and must exit with 130."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if ok:
        assert result.exit_code == (130 if ok == 130 else 0), describe(result)
    return result




def train(out, *extra, data="digits", steps=6, ok=True):
    return invoke("train", "--data", data, "--out", out, "--steps", steps, *FAST, *extra, ok=ok)


def assert_clean_error(result, *needles):
    """Non-zero exit through a click error (no traceback), with a message naming each needle."""
    assert result.exit_code != 0, describe(result)
    assert isinstance(result.exception, SystemExit), describe(result)  # handled, not a crash
    assert "Traceback" not in result.output
    assert "Error:" in result.output, result.output
    for needle in needles:
        assert needle.lower() in result.output.lower(), (needle, result.output)


def summary_json(result) -> dict:
    """``train`` prints one JSON object on the first line of stdout."""
    return json.loads(result.stdout.splitlines()[0])


def read_metrics(run) -> list[dict]:
    path = os.path.join(run, "metrics.jsonl")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_ckpt(run) -> dict:
    return torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_png(path, shape):
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE, path
    assert read_png(path).shape == shape


# --------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """digits, projected field, 6 steps."""
    out = tmp_path_factory.mktemp("digits") / "run"
    result = train(out, data="digits")
    return out, result


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    """moons, exact field, 6 steps."""
    out = tmp_path_factory.mktemp("moons") / "run"
    result = train(out, "--field", "exact", data="moons")
    return out, result


@pytest.fixture
def classifier_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DXTRAIN_CACHE", str(tmp_path / "dxtrain-cache"))
    return tmp_path / "dxtrain-cache"


# --------------------------------------------------------------------------- 1. help

HELP = {
    (): ["train", "summarize", "sample", "eval"],
    ("train",): ["--field", "--steps", "--time-budget", "--resume", "--data", "--out", "--cache", "--batch",
                 "--landmarks", "--temperatures", "projected", "exact"],
    ("sample",): ["--run", "--n", "--out", "--label"],
    ("eval",): ["--run", "--n"],
    ("summarize",): ["--out", "--data", "--landmarks", "--temperatures"],
}


@pytest.mark.parametrize("cmd", list(HELP), ids=lambda c: " ".join(c) or "dxtrain")
def test_help(cmd):
    result = invoke(*cmd, "--help")
    assert result.output.startswith("Usage:")
    for option in HELP[cmd]:
        assert option in result.output, (cmd, option)


def test_version():
    result = invoke("--version")
    assert "version" in result.output


def test_console_script_help():
    exe = shutil.which("dxtrain")
    if exe is None:
        pytest.skip("the dxtrain console script is not on PATH (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "summarize" in proc.stdout


def test_unknown_field_is_a_usage_error(tmp_path):
    result = invoke("train", "--field", "nope", "--out", tmp_path / "r", ok=False)
    assert result.exit_code == 1
    assert "--field" in result.output
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- 2. train end to end


@pytest.mark.parametrize("which", ["digits", "moons"])
def test_train_writes_run_folder(which, request):
    out, result = request.getfixturevalue(f"{which}_run")
    field = "projected" if which == "digits" else "exact"

    lines = result.stdout.splitlines()
    summary = json.loads(lines[0])
    assert summary["step"] == 6
    assert summary["wall"] > 0 and np.isfinite(summary["loss"])
    assert lines[-1] == f"run folder: {out}"
    assert f"field {field}" in result.stderr

    with open(out / "config.json") as fh:
        config = json.load(fh)
    assert config["data"] == which and config["field"] == field and config["steps"] == 6
    assert config["batch"] == 40 and config["landmarks"] == 8 and config["evaluate"] is False

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [2, 4, 6]
    for m in metrics:
        assert METRIC_KEYS <= m.keys(), m.keys()
        assert all(np.isfinite(m[k]) for k in METRIC_KEYS)
        assert m["field_s"] >= 0 and m["steps_per_s"] > 0 and m["drift_norm"] > 0
    walls = [m["wall"] for m in metrics]
    assert walls == sorted(walls) and walls[0] > 0
    assert metrics[-1]["loss"] == summary["loss"]

    ckpt = load_ckpt(out)
    assert ckpt["step"] == 6
    assert {"config", "generator", "ema", "optimizer", "elapsed", "rng", "data"} <= ckpt.keys()
    assert ckpt["config"]["field"] == field
    assert ckpt["data"]["name"] == which

    pngs = sorted(p.name for p in (out / "samples").iterdir())
    assert pngs == ["step-000003.png", "step-000006.png"]
    for name in pngs:
        assert_png(out / "samples" / name, DIGITS_GRID if which == "digits" else SCATTER)

    if field == "projected":
        with open(out / "summaries" / "manifest.json") as fh:
            manifest = json.load(fh)
        assert list(manifest["groups"]) == ["pixels"]
        for fname in manifest["groups"].values():
            assert (out / "summaries" / fname).is_file()
        assert "built summaries" in result.stderr
    else:
        assert not (out / "summaries").exists()
    assert not (out / "eval.json").exists()  # --no-eval
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_default_encoder_trains_vectors(tmp_path):
    """Without --encoder, 2-D data must train: an image encoder cannot be the default for vectors."""
    fast = [a for a in FAST if a not in ("--encoder", "none")]
    result = invoke("train", "--data", "moons", "--field", "exact", "--out", tmp_path / "run", "--steps", 2, *fast,
                    ok=False)
    assert result.exit_code == 0, describe(result)
    assert load_ckpt(tmp_path / "run")["step"] == 2


def test_builtin_encoder_many_feature_groups(tmp_path):
    """The frozen conv encoder gives many feature groups; every one reaches the exact field and the loss."""
    out = tmp_path / "run"
    result = invoke("train", "--data", "digits", "--field", "exact", "--out", out, "--steps", 2, *FAST,
                    "--encoder", "builtin", "--log-every", 1)
    groups = int(result.stderr.split(" group(s): ")[0].rsplit(" ", 1)[-1])
    assert groups > 2
    sizes = result.stderr.split(" group(s): ")[1].split(";")[0]  # "4 x 32-D, ..." sums to the groups
    assert sum(int(part.split(" x ")[0]) for part in sizes.split(", ")) == groups
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    assert load_ckpt(out)["config"]["encoder"] == "builtin"


# --------------------------------------------------------------------------- 3. resume


@pytest.mark.parametrize("data,field", [("digits", "projected"), ("moons", "exact")])
def test_resume_equals_straight_run(tmp_path, data, field, request):
    straight = request.getfixturevalue(f"{data}_run")[0]  # the same settings, 6 steps in one go
    split = tmp_path / "split"
    train(split, "--field", field, data=data, steps=3)
    assert load_ckpt(split)["step"] == 3
    result = train(split, "--field", field, "--resume", data=data, steps=6)
    assert "resumed" in result.stderr and "at step 3" in result.stderr

    a, b = load_ckpt(straight), load_ckpt(split)
    assert a["step"] == b["step"] == 6
    assert same_weights(a["generator"], b["generator"])
    assert same_weights(a["ema"]["model"], b["ema"]["model"])
    ma, mb = read_metrics(straight), read_metrics(split)
    assert ma[-1]["step"] == mb[-1]["step"] == 6
    assert ma[-1]["loss"] == mb[-1]["loss"]
    steps = [m["step"] for m in mb]
    assert steps == sorted(set(steps))  # strictly increasing across the two invocations
    if field == "projected":
        assert "loaded summaries" in result.stderr  # the resumed run reuses the summaries it built


def test_resume_without_checkpoint_fails(tmp_path):
    result = train(tmp_path / "empty", "--resume", ok=False)
    assert_clean_error(result, "--resume", "no checkpoint", "checkpoint.pt")


def test_train_over_existing_run_needs_resume(tmp_path):
    out = tmp_path / "run"
    train(out, "--field", "exact", data="moons", steps=2)
    before = (out / "checkpoint.pt").read_bytes()
    result = train(out, "--field", "exact", data="moons", steps=4, ok=False)
    assert_clean_error(result, "--resume", "already holds a run")
    assert (out / "checkpoint.pt").read_bytes() == before  # untouched
    assert load_ckpt(out)["step"] == 2


# --------------------------------------------------------------------------- 4. time budget


def test_time_budget_stops_early(tmp_path):
    out = tmp_path / "budget"
    result = invoke("train", "--data", "moons", "--field", "exact", "--out", out, "--steps", 100000,
                    "--time-budget", 0.5, *FAST, "--checkpoint-every", 1000, "--sample-every", 1000)
    summary = summary_json(result)
    assert 0 < summary["step"] < 100000
    assert summary["wall"] >= 0.5
    assert summary["wall"] < 0.5 + 10  # at most one (slow) step past the budget
    assert "time budget" in result.stderr and f"step {summary['step']}" in result.stderr

    with open(out / "config.json") as fh:
        config = json.load(fh)
    assert config["time_budget"] == 0.5 and config["steps"] == 100000
    ckpt = load_ckpt(out)
    assert ckpt["step"] == summary["step"]
    assert ckpt["elapsed"] == pytest.approx(summary["wall"])
    assert ckpt["config"]["time_budget"] == 0.5
    metrics = read_metrics(out)
    assert metrics and all(m["step"] <= summary["step"] for m in metrics)
    assert all(m["wall"] <= summary["wall"] + 1e-3 for m in metrics)
    assert (out / "samples" / f"step-{summary['step']:06d}.png").is_file()


def test_time_budget_logs_final_step(tmp_path):
    out = tmp_path / "budget"
    result = invoke("train", "--data", "moons", "--field", "exact", "--out", out, "--steps", 100000,
                    "--time-budget", 0.3, *FAST, "--log-every", 100000, "--checkpoint-every", 100000,
                    "--sample-every", 100000)
    summary = summary_json(result)
    assert 0 < summary["step"] < 100000
    metrics = read_metrics(out)
    assert metrics, "metrics.jsonl is empty after a time-budgeted run"
    assert metrics[-1]["step"] == summary["step"]


# --------------------------------------------------------------------------- 5. sample


def test_sample_npz_digits(digits_run, tmp_path):
    run, _ = digits_run
    out = tmp_path / "x.npz"
    result = invoke("sample", "--run", run, "--n", 16, "--out", out)
    assert "16 samples" in result.output
    with np.load(out) as z:
        assert set(z.files) == {"x", "labels"}
        x, labels = z["x"], z["labels"]
    assert x.shape == (16, 1, 8, 8) and x.dtype == np.float32 and np.all(np.isfinite(x))
    np.testing.assert_array_equal(labels, np.arange(16) % 10)
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
    # deterministic for a seed, different for another
    again = tmp_path / "again.npz"
    invoke("sample", "--run", run, "--n", 16, "--out", again)
    with np.load(again) as z:
        np.testing.assert_array_equal(z["x"], x)
    other = tmp_path / "other.npz"
    invoke("sample", "--run", run, "--n", 16, "--out", other, "--seed", 1)
    with np.load(other) as z:
        assert not np.array_equal(z["x"], x)


def test_sample_label(digits_run, tmp_path):
    run, _ = digits_run
    out = tmp_path / "three.npz"
    invoke("sample", "--run", run, "--n", 5, "--out", out, "--label", 3)
    with np.load(out) as z:
        np.testing.assert_array_equal(z["labels"], np.full(5, 3))
    result = invoke("sample", "--run", run, "--n", 5, "--out", tmp_path / "bad.npz", "--label", 10, ok=False)
    assert_clean_error(result, "--label 10", "10 classes")
    assert not (tmp_path / "bad.npz").exists()


def test_sample_png(digits_run, moons_run, tmp_path):
    invoke("sample", "--run", digits_run[0], "--n", 16, "--out", tmp_path / "digits.png")
    assert_png(tmp_path / "digits.png", (4 * 33 + 1, 4 * 33 + 1))  # 4x4 grid of 8x8 scaled x4
    invoke("sample", "--run", moons_run[0], "--n", 300, "--out", tmp_path / "moons.png")
    assert_png(tmp_path / "moons.png", SCATTER)


def test_sample_moons_npz(moons_run, tmp_path):
    invoke("sample", "--run", moons_run[0], "--n", 10, "--out", tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as z:
        assert z["x"].shape == (10, 2)
        np.testing.assert_array_equal(z["labels"], np.arange(10) % 2)


def test_sample_bad_extension(digits_run, tmp_path):
    result = invoke("sample", "--run", digits_run[0], "--n", 4, "--out", tmp_path / "x.jpg", ok=False)
    assert_clean_error(result, "--out must end in .npz or .png")
    assert os.listdir(tmp_path) == []


def test_sample_without_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    result = invoke("sample", "--run", tmp_path / "run", "--n", 4, "--out", tmp_path / "x.npz", ok=False)
    assert_clean_error(result, "no checkpoint", "train first")
    assert not (tmp_path / "x.npz").exists()


# --------------------------------------------------------------------------- 6. eval


def test_eval_moons(moons_run, classifier_cache):
    run, _ = moons_run
    result = invoke("eval", "--run", run)
    report = json.loads(result.stdout)
    for key in ("energy_distance", "mmd_rbf", "sliced_wasserstein"):
        assert np.isfinite(report[key]) and report[key] >= 0, key
        assert key in report["floor"]
    assert report["dataset"] == "moons" and report["kind"] == "vectors"
    assert report["n_samples"] == 2000 and report["n_nonfinite"] == 0
    assert report["step"] == 6 and report["field"] == "exact" and report["wall"] > 0
    assert "FD_digits" not in report
    with open(run / "eval.json") as fh:
        assert json.load(fh) == report
    assert not classifier_cache.exists()  # no classifier for 2-D data


def test_eval_digits(digits_run, classifier_cache):
    run, _ = digits_run
    result = invoke("eval", "--run", run)
    report = json.loads(result.stdout)
    assert report["dataset"] == "digits" and report["kind"] == "images" and report["field"] == "projected"
    assert report["step"] == 6
    assert np.isfinite(report["FD_digits"]) and report["FD_digits"] >= 0
    assert report["classifier_test_accuracy"] > 0.8
    assert report["n_samples"] == 2 * report["n_test"]
    assert len(report["sample_class_counts"]) == 10 and sum(report["sample_class_counts"]) == report["n_samples"]
    for key in ("energy_distance", "precision", "recall"):
        assert key in report
    with open(run / "eval.json") as fh:
        assert json.load(fh) == report
    assert (classifier_cache / "digits_classifier.pt").is_file()  # DXTRAIN_CACHE honoured
    assert "FD_encoder" not in report  # trained with --encoder none: no encoder space
    assert_png(run / "eval-samples.png", DIGITS_GRID)  # 10 per class, a column each


def test_eval_in_the_training_encoders_space(tmp_path, classifier_cache):
    run = tmp_path / "run"
    train(run, "--encoder", "builtin", "--max-locations", 1, steps=2)
    report = json.loads(invoke("eval", "--run", run, "--n", 200).stdout)
    assert report["FD_encoder"] > report["floor"]["FD_encoder"] >= 0 and report["fd_encoder_n"] == 200


def test_eval_without_checkpoint(tmp_path):
    result = invoke("eval", "--run", tmp_path, ok=False)
    assert_clean_error(result, "no checkpoint")


# --------------------------------------------------------------------------- 7. summarize and --cache


def test_summarize_then_train_with_cache(tmp_path):
    cache = tmp_path / "cache"
    result = invoke("summarize", "--data", "digits", "--out", cache, *SUMMARIZE_FAST)
    assert "1 group(s)" in result.stdout and str(cache) in result.stdout
    with open(cache / "manifest.json") as fh:
        manifest = json.load(fh)
    assert list(manifest["groups"]) == ["pixels"]
    assert (cache / manifest["groups"]["pixels"]).is_file()

    out = tmp_path / "run"
    result = train(out, "--cache", cache, data="digits", steps=4)
    assert f"loaded summaries from {cache}" in result.stderr
    assert "built summaries" not in result.stderr
    assert not (out / "summaries").exists()  # the run used the cache, it built nothing
    assert load_ckpt(out)["step"] == 4
    assert [m["step"] for m in read_metrics(out)] == [2, 4]


def test_cache_with_other_temperatures_is_refused(tmp_path):
    cache = tmp_path / "cache"
    invoke("summarize", "--data", "digits", "--out", cache, *SUMMARIZE_FAST, "--temperatures", "0.05,0.2")
    result = train(tmp_path / "run", "--cache", cache, data="digits", ok=False)
    assert_clean_error(result, "temperatures", "rebuild")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cache_folder_without_manifest_is_filled(tmp_path):
    # train falls back to building the summaries and saves them in the --cache folder for the next run
    result = train(tmp_path / "run", "--cache", tmp_path / "nothing-here", data="digits", steps=2)
    assert (tmp_path / "nothing-here" / "manifest.json").is_file()
    assert "built summaries" in result.stderr


def test_cache_of_other_feature_groups_is_refused(tmp_path):
    cache = tmp_path / "cache"
    invoke("summarize", "--data", "moons", "--out", cache, *SUMMARIZE_FAST)
    result = train(tmp_path / "run", "--cache", cache, data="digits", ok=False)
    assert_clean_error(result, "feature groups")


def test_cache_of_other_data_is_refused(tmp_path):
    cache = tmp_path / "cache"
    invoke("summarize", "--data", "swissroll", "--out", cache, *SUMMARIZE_FAST)
    result = train(tmp_path / "run", "--cache", cache, data="checkerboard", steps=2, ok=False)
    assert result.exit_code != 0, "training on checkerboard accepted summaries of swissroll"


# --------------------------------------------------------------------------- 8. user data


def _points(n=600, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[-2.0, 0.0], [2.0, 0.5]], np.float32)
    labels = rng.integers(0, 2, n)
    return (centres[labels] + 0.3 * rng.normal(size=(n, 2))).astype(np.float32), labels


@pytest.mark.parametrize("field", ["exact", "projected"])
def test_user_npz_points(tmp_path, field):
    x, _ = _points()
    path = tmp_path / "pts.npz"
    np.savez(path, x=x)
    out = tmp_path / "run"
    result = invoke("train", "--data", path, "--field", field, "--out", out, "--steps", 4, *FAST)
    assert "data " + str(path) in result.stderr and "(unconditional)" in result.stderr
    ckpt = load_ckpt(out)
    assert ckpt["step"] == 4 and ckpt["data"]["name"] == "pts" and ckpt["data"]["shape"] == [2]
    assert ckpt["data"]["num_classes"] == 0
    with open(out / "config.json") as fh:
        assert json.load(fh)["data"] == str(path)
    assert_png(out / "samples" / "step-000003.png", SCATTER)
    invoke("sample", "--run", out, "--n", 7, "--out", tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        assert z.files == ["x"] and z["x"].shape == (7, 2)  # unconditional: no labels


def test_user_npz_with_labels_trains_conditionally(tmp_path):
    x, y = _points()
    path = tmp_path / "lab.npz"
    np.savez(path, points=x, cls=y + 5)  # custom keys, labels remapped 5,6 -> 0,1
    out = tmp_path / "run"
    result = invoke("train", "--data", path, "--data-key", "points", "--labels-key", "cls", "--field", "exact",
                    "--out", out, "--steps", 2, *FAST)
    assert "2 classes (conditional)" in result.stderr
    assert load_ckpt(out)["data"]["num_classes"] == 2


def _bad_files():
    x, _ = _points(50)
    nan = x.copy()
    nan[3, 1] = np.nan
    return {
        "nan": (dict(x=nan), "NaN"),
        "inf": (dict(x=np.where(np.arange(100).reshape(50, 2) == 7, np.inf, x)), "NaN/Inf"),
        "ndim1": (dict(x=np.arange(10.0)), "expected (N, D)"),
        "ndim5": (dict(x=np.zeros((4, 1, 2, 2, 2), np.float32)), "expected (N, D)"),
        "empty": (dict(x=np.zeros((0, 2), np.float32)), "empty"),
        "no_key": (dict(points=x), "arrays present"),
        "labels_len": (dict(x=x, labels=np.zeros(49, np.int64)), "labels have shape"),
        "labels_float": (dict(x=x, labels=np.full(50, 0.5)), "labels must be integers"),
        "strings": (dict(x=np.array([["a", "b"]] * 5)), "dtype"),
    }


@pytest.mark.parametrize("case", list(_bad_files()))
def test_malformed_user_data(tmp_path, case):
    arrays, needle = _bad_files()[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    result = invoke("train", "--data", path, "--field", "exact", "--out", tmp_path / "run", "--steps", 2, *FAST,
                    ok=False)
    assert_clean_error(result, "bad.npz", needle)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("spec,needle", [("missing.npz", "not found"), ("nonsense", "unknown data set"),
                                         ("notes.txt", "unsupported extension"), ("corrupt.npz", "not a readable")])
def test_bad_data_spec(tmp_path, spec, needle):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    data = str(tmp_path / spec) if spec != "nonsense" else spec
    result = invoke("train", "--data", data, "--out", tmp_path / "run", "--steps", 2, *FAST, ok=False)
    assert_clean_error(result, needle)


# --------------------------------------------------------------------------- 9. checkpoint atomicity


class DiskFull(OSError):
    pass


def _crash_in_second_checkpoint(out, monkeypatch):
    """Train moons 6 steps (checkpoints at 3 and 6) with the second torch.save dying half-way."""
    real_save = torch.save
    calls = []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(obj.get("step") if isinstance(obj, dict) else None)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        partial = b"PK\x03\x04" + b"\0" * 100  # the first bytes of a zip archive, then nothing
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                fh.write(partial)
        else:
            f.write(partial)
        raise DiskFull(28, "No space left on device (simulated)")

    monkeypatch.setattr(dx_train.torch, "save", flaky_save)  # the torch module dxtrain.train uses
    result = train(out, "--field", "exact", data="moons", steps=6, ok=False)
    monkeypatch.undo()
    assert calls == [3, 6], calls
    assert result.exit_code == 1, describe(result)  # one clean Error: line (dxtrain/errors.py), no traceback
    assert "no space left on device" in result.output.splitlines()[-1].lower(), describe(result)
    return result


def test_crash_while_checkpointing_keeps_previous_checkpoint(tmp_path, monkeypatch, moons_run):
    out = tmp_path / "run"
    _crash_in_second_checkpoint(out, monkeypatch)
    data = (out / "checkpoint.pt").read_bytes()
    assert not data.startswith(b"PK\x03\x04" + b"\0" * 100)
    ckpt = load_ckpt(out)  # still a complete, loadable checkpoint
    assert ckpt["step"] == 3
    # ... and the run resumes from it to the same weights as an uninterrupted run
    result = train(out, "--field", "exact", "--resume", data="moons", steps=6)
    assert "at step 3" in result.stderr
    final = load_ckpt(out)
    assert final["step"] == 6
    assert same_weights(final["generator"], load_ckpt(moons_run[0])["generator"])


def test_crash_while_checkpointing_leaves_no_temp_file(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _crash_in_second_checkpoint(out, monkeypatch)
    leftovers = [p for p in os.listdir(out) if p.startswith("checkpoint.pt") and p != "checkpoint.pt"]
    assert leftovers == []


def test_resume_after_crash_keeps_metrics_monotonic(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _crash_in_second_checkpoint(out, monkeypatch)
    train(out, "--field", "exact", "--resume", data="moons", steps=6)
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == sorted(set(steps)), steps


def _stop_handler_installed() -> bool:
    handler = signal.getsignal(signal.SIGINT)
    return type(getattr(handler, "__self__", None)).__name__ == "_Stop"


def _interrupt_at_step(monkeypatch, at: int):
    """Deliver SIGINT to this process while step ``at`` runs (from inside the loss computation)."""
    real = dx_train.drift_loss
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            # only if the trainer's handler is in place: never interrupt pytest itself
            assert _stop_handler_installed(), signal.getsignal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(dx_train, "drift_loss", spy)
    return calls


@posix_signals
def test_sigint_in_process_checkpoints_and_resumes_exactly(tmp_path, monkeypatch, moons_run):
    straight = moons_run[0]  # the same settings, 6 steps in one go
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    calls = _interrupt_at_step(monkeypatch, 4)
    result = train(out, "--field", "exact", data="moons", steps=6, ok=130)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert len(calls) == 4  # the step in flight finished, no further step ran
    assert "interrupted: checkpoint saved at step 4" in result.stderr and "--resume" in result.stderr
    assert summary_json(result)["interrupted"] is True
    assert load_ckpt(out)["step"] == 4

    result = train(out, "--field", "exact", "--resume", data="moons", steps=6)
    assert "at step 4" in result.stderr
    a, b = load_ckpt(straight), load_ckpt(out)
    assert b["step"] == 6
    assert same_weights(a["generator"], b["generator"])
    assert read_metrics(straight)[-1]["loss"] == read_metrics(out)[-1]["loss"]


@posix_signals
def test_sigint_summary_reports_checkpoint_step(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupt_at_step(monkeypatch, 5)
    result = train(out, "--field", "exact", "--log-every", 4, data="moons", steps=8, ok=130)
    monkeypatch.undo()
    assert load_ckpt(out)["step"] == 5
    assert summary_json(result)["step"] == 5


@posix_signals
def test_sigint_subprocess_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dxtrain", "train", "--data", "digits", "--out", str(out), "--steps", "100000",
           *FAST, "--checkpoint-every", "1000", "--sample-every", "1000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(tmp_path / "stdout", "wb") as so, open(tmp_path / "stderr", "wb") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=tmp_path, env=env)
        try:
            metrics = out / "metrics.jsonl"
            deadline = time.monotonic() + 240  # generous: imports + summaries on a busy machine
            while time.monotonic() < deadline and proc.poll() is None:
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                    break
                time.sleep(0.1)
            assert proc.poll() is None, "training exited before it was interrupted: " + \
                (tmp_path / "stderr").read_text()
            assert metrics.exists() and len(metrics.read_text().splitlines()) >= 3, "no progress in 240 s"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=90)
            waited = time.monotonic() - t0
        finally:
            if proc.poll() is None:  # only the process this test started
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert waited < 60, f"exit took {waited:.1f}s after SIGINT"
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    ckpt = load_ckpt(out)
    step = ckpt["step"]
    assert step > 0
    assert f"interrupted: checkpoint saved at step {step}" in stderr
    logged = [m["step"] for m in read_metrics(out)]
    assert logged and logged[-1] <= step
    assert not [p for p in os.listdir(out) if ".tmp" in p]

    result = train(out, "--resume", data="digits", steps=step + 4)
    assert f"at step {step}" in result.stderr
    assert load_ckpt(out)["step"] == step + 4
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == sorted(set(steps)) and steps[-1] == step + 4


# --------------------------------------------------------------------------- 10. DLPack zero-copy


def test_to_dxfield_shares_memory():
    f = torch.randn(6, 3, requires_grad=True)
    a = dx_fields.to_dxfield(f)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (6, 3)
    assert a.ctypes.data == f.data_ptr()
    with torch.no_grad():
        f[0, 0] = 42.0
    assert a[0, 0] == 42.0  # same memory, not a copy
    labels = torch.arange(6)
    assert dx_fields.to_dxfield(labels).ctypes.data == labels.data_ptr()


def test_to_dxfield_copies_only_non_contiguous():
    base = torch.randn(3, 6)
    t = base.t()
    a = dx_fields.to_dxfield(t)
    np.testing.assert_array_equal(a, t.numpy())
    assert a.flags["C_CONTIGUOUS"]


def test_to_torch_shares_memory():
    like = torch.zeros(2, dtype=torch.float32)
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    t = dx_fields.to_torch(a, like)
    assert t.dtype == torch.float32 and t.shape == (4, 3)
    assert t.data_ptr() == a.ctypes.data
    a[1, 1] = -7.0
    assert t[1, 1].item() == -7.0


@pytest.mark.parametrize("data,field", [("digits", "projected"), ("moons", "exact")])
def test_step_crosses_dlpack_without_copies(tmp_path, monkeypatch, data, field):
    """Every tensor -> dxfield and result -> torch conversion in real training steps is zero-copy."""
    real_in, real_out = dx_fields.to_dxfield, dx_fields.to_torch
    seen = {"in": [], "out": []}

    def spy_in(t):
        a = real_in(t)
        if t.is_contiguous():
            seen["in"].append(a.ctypes.data == t.data_ptr())
        return a

    def spy_out(a, like):
        t = real_out(a, like)
        seen["out"].append(a.dtype == np.float32 and t.data_ptr() == a.ctypes.data)
        return t

    monkeypatch.setattr(dx_fields, "to_dxfield", spy_in)
    monkeypatch.setattr(dx_fields, "to_torch", spy_out)
    train(tmp_path / "run", "--field", field, data=data, steps=2)
    assert seen["in"] and all(seen["in"]), seen
    assert seen["out"] and all(seen["out"]), seen


def test_unknown_normalization_is_a_usage_error(tmp_path):
    result = invoke("train", "--normalization", "column", "--out", tmp_path / "r", ok=False)
    assert result.exit_code == 1 and "--normalization" in result.output


@pytest.mark.parametrize("field", ["projected", "exact"])
@pytest.mark.parametrize("normalization", ["bidirectional", "row", None])
def test_normalization_reaches_the_field(tmp_path, monkeypatch, field, normalization):
    """--normalization (default bidirectional) is what every dxfield call of the run uses."""
    seen = []
    real_field, real_drift = dxfield.ProjectedField.field, dxfield.drift_field

    def spy_field(self, x, *args, **kw):
        seen.append(kw.get("normalization", "row"))
        return real_field(self, x, *args, **kw)

    def spy_drift(*args, **kw):
        seen.append(kw.get("normalization", "bidirectional"))
        return real_drift(*args, **kw)

    monkeypatch.setattr(dxfield.ProjectedField, "field", spy_field)
    monkeypatch.setattr(dxfield, "drift_field", spy_drift)
    extra = () if normalization is None else ("--normalization", normalization)
    train(tmp_path / "run", "--field", field, *extra, data="moons", steps=2)
    assert seen and set(seen) == {normalization or "bidirectional"}
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["normalization"] == (normalization or "bidirectional")


def test_repulsion_reaches_the_projected_field(tmp_path, monkeypatch):
    seen = []
    real_field = dxfield.ProjectedField.field

    def spy_field(self, x, *args, **kw):
        seen.append((kw.get("normalization"), kw.get("repulsion")))
        return real_field(self, x, *args, **kw)

    monkeypatch.setattr(dxfield.ProjectedField, "field", spy_field)
    train(tmp_path / "run", "--field", "projected", "--repulsion", "nystrom", data="moons", steps=2)
    assert seen and set(seen) == {("bidirectional", "nystrom")}
    result = invoke("train", "--repulsion", "both", "--out", tmp_path / "r2", ok=False)
    assert result.exit_code == 1 and "--repulsion" in result.output


@pytest.mark.parametrize("data", ["moons", "digits"])
def test_correction_hands_the_step_positives_to_the_projected_field(tmp_path, monkeypatch, data):
    seen = []
    real_field = dxfield.ProjectedField.field

    def spy_field(self, x, *args, **kw):
        sample = kw.get("pos_sample")
        seen.append(None if sample is None else (sample.shape, kw.get("pos_sample_labels") is not None))
        return real_field(self, x, *args, **kw)

    monkeypatch.setattr(dxfield.ProjectedField, "field", spy_field)
    train(tmp_path / "run", "--field", "projected", "--correction", "--positives", "40", data=data, steps=2)
    assert seen and all(s is not None and s[0][0] == 40 for s in seen), seen
    assert all(s[1] for s in seen)  # both data sets are labelled: per-class samples
    result = invoke("train", "--correction", "--normalization", "row", "--out", tmp_path / "r2", ok=False)
    assert result.exit_code != 0 and "correction" in result.output


def _corrected_calls(monkeypatch) -> list:
    """Whether each ``ProjectedField.field`` call from now on is corrected (given a ``pos_sample``)."""
    seen = []
    real_field = dxfield.ProjectedField.field

    def spy_field(self, x, *args, **kw):
        seen.append(kw.get("pos_sample") is not None)
        return real_field(self, x, *args, **kw)

    monkeypatch.setattr(dxfield.ProjectedField, "field", spy_field)
    return seen


@pytest.mark.parametrize("data, flags, normalization, want", [
    ("moons", (), "bidirectional", False),  # automatic: off until a check finds a material bias
    ("moons", ("--no-correction",), "bidirectional", False),
    ("digits", ("--landmarks", "128", "--correction"), "bidirectional", True),
    ("moons", (), "row", False),  # the correction needs the bidirectional field: no check, no error
])
def test_the_correction_is_automatic_and_says_so(tmp_path, monkeypatch, data, flags, normalization, want):
    seen = _corrected_calls(monkeypatch)
    result = train(tmp_path / "run", "--field", "projected", "--normalization", normalization, *flags, data=data,
                   steps=2)
    assert seen and set(seen) == {want}
    given = {"--correction": True, "--no-correction": False}
    setting = next((given[f] for f in flags if f in given), None)
    auto = setting is None and normalization == "bidirectional"
    assert ("residual correction auto: off until" in result.output) == auto
    if not auto:
        assert f"residual correction {'on' if want else 'off'} (set" in result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["correction"] == setting


@pytest.mark.parametrize("dim, landmarks, turns_on", [(16, 4, True), (2, 128, False)])
def test_the_automatic_correction_turns_on_where_the_bias_is_material(tmp_path, monkeypatch, dim, landmarks,
                                                                      turns_on):
    # 16-D blobs on 4 landmarks: the Nystrom sums are far off and the check after 25 steps turns the correction
    # on; 2-D blobs on 128 landmarks: nearly exact, it stays off (and is checked again after 50 steps)
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((6, dim)) * 3
    x = (centres[rng.integers(0, 6, 3000)] + 0.3 * rng.standard_normal((3000, dim))).astype(np.float32)
    np.savez(tmp_path / "blobs.npz", x=x)
    calls = _corrected_calls(monkeypatch)
    result = train(tmp_path / "run", "--field", "projected", "--landmarks", str(landmarks), "--batch", "64",
                   "--positives", "64", "--log-every", "10", data=str(tmp_path / "blobs.npz"), steps=55)
    # one call per step, and three per check (uncorrected, then corrected by each of two fresh samples)
    check = [False, True, True]
    if turns_on:
        assert calls == [False] * 25 + check + [True] * 30
    else:
        assert calls == [False] * 25 + check + [False] * 25 + check + [False] * 5
    assert ("residual correction on from step 25:" in result.output) == turns_on
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shares = [(r["step"], r["correction_bias_share"]) for r in records if "correction_bias_share" in r]
    assert [s for s, _ in shares] == ([30] if turns_on else [30, 55])  # logged with the next line
    assert all((share >= 0.25) == turns_on for _, share in shares), shares

def _auto_field(y, labels=None):
    from dxtrain.fields import ProjectedFieldSet
    from dxtrain.train import TrainConfig

    field = ProjectedFieldSet({"x": dxfield.ProjectedField.build(y, labels=labels, temperatures=(0.05, 0.2),
                                                                  landmarks=8, method="uniform")})
    field.configure(TrainConfig())
    return field


def test_the_automatic_correction_is_checked_after_25_50_100_steps_until_it_turns_on():
    from dxtrain.fields import correction_applies
    from dxtrain.train import TrainConfig

    field = _auto_field(np.random.default_rng(0).standard_normal((400, 3)).astype(np.float32))
    assert field.auto_correction and not field.correction
    assert [s for s in range(1000) if field.correction_check_due(s)] == [25, 50, 100, 200, 400, 800]
    field.decide_correction(0.0624, 1.0, 100)  # bias RMS 24.98% of the field's: stays off
    assert not field.correction and field.correction_check_due(200)
    assert field.decide_correction(-0.5, 1.0, 100) == 0.0 and not field.correction  # a noisy negative estimate
    assert field.decide_correction(0.0626, 1.0, 200) == pytest.approx(0.0626 ** 0.5)
    assert field.correction and field.correction_from == 200 and not field.correction_check_due(400)
    assert field.state() == {"correction_from": 200}
    again = _auto_field(np.random.default_rng(0).standard_normal((400, 3)).astype(np.float32))
    again.restore(field.state())
    assert again.correction and again.correction_from == 200
    again.restore(None)  # a checkpoint written before the automatic correction existed: keeps what it has
    assert again.correction
    for cfg in (TrainConfig(correction=False), TrainConfig(correction=True), TrainConfig(repulsion="nystrom"),
                TrainConfig(normalization="row")):
        field.configure(cfg)
        assert not field.auto_correction and field.correction == bool(cfg.correction)
        assert not any(field.correction_check_due(s) for s in range(1000))
    assert correction_applies("bidirectional", "exact") and not correction_applies("row", "exact")
    assert not correction_applies("bidirectional", "nystrom")


def test_the_correction_check_measures_the_uncorrected_fields_bias_against_algorithm_2_on_all_the_data():
    # with the whole data as both samples the corrected field is Algorithm 2 over all of it, so the bias is
    # exactly |V_uncorrected - V_all|^2 per query and the signal |V_all|^2 (independent: dxfield.drift_field)
    import torch

    rng = np.random.default_rng(1)
    for labels in (None, rng.integers(0, 3, 300)):
        shift = 0 if labels is None else 2 * labels[:, None]
        y = (rng.standard_normal((300, 4)) + shift).astype(np.float32)
        field = _auto_field(y, labels)
        pf = field.fields["x"]
        x = torch.from_numpy((rng.standard_normal((30, 4)) * 1.5).astype(np.float32))
        qlab = None if labels is None else torch.from_numpy(np.arange(30) % 3)
        whole = ({"x": torch.from_numpy(y)}, None if labels is None else torch.from_numpy(labels))
        bias2, signal2 = field.bias_terms({"x": x}, [whole, whole], qlab)
        vu = pf.field(x.numpy(), labels=None if qlab is None else qlab.numpy(), normalization="bidirectional")
        vall = dxfield.drift_field(x.numpy().astype(np.float64), y.astype(np.float64), temperatures=(0.05, 0.2),
                                   feature_scale=pf.feature_scale, labels=None if qlab is None else qlab.numpy(),
                                   pos_labels=labels)
        assert bias2 == pytest.approx(((vu - vall) ** 2).sum(1).mean(), rel=1e-3)
        assert signal2 == pytest.approx((vall ** 2).sum(1).mean(), rel=1e-4)
        assert 0 < bias2 < signal2


def test_correction_sample_sets_the_real_samples_per_step(tmp_path, monkeypatch):
    from dxtrain.train import TrainConfig, train as run_training

    seen = []
    real_field = dxfield.ProjectedField.field

    def spy_field(self, x, *args, **kw):
        seen.append(kw["pos_sample"].shape[0])
        return real_field(self, x, *args, **kw)

    monkeypatch.setattr(dxfield.ProjectedField, "field", spy_field)
    cfg = TrainConfig(data="moons", out=str(tmp_path / "run"), steps=2, batch=40, positives=60, correction_sample=24,
                      correction=True, landmarks=8, encoder="none", device="cpu", evaluate=False, progress=False)
    run_training(cfg, log=lambda m: None)
    assert seen == [24, 24]  # 12 per class, both classes
    with pytest.raises(ValueError, match="correction_sample"):
        TrainConfig(correction_sample=0).validate()


# --------------------------------------------------------------------------- the UNet generator


def test_unet_generator_trains_logs_its_size_and_samples(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "tiny32.npz"
    np.savez(path, x=rng.integers(0, 256, (90, 3, 32, 32), dtype=np.uint8), labels=np.arange(90) % 3)
    out = tmp_path / "run"
    result = invoke("train", "--data", path, "--out", out, "--steps", 2, *FAST, "--generator", "unet",
                    "--gen-width", 8, "--gen-depth", 1, "--batch", 12, "--positives", 24)
    assert "generator UNetGenerator (width 8, depth 1, channel multipliers (1,2,2,2);" in result.stderr
    ckpt = load_ckpt(out)
    assert ckpt["config"]["generator"] == "unet" and ckpt["config"]["gen_width"] == 8
    invoke("sample", "--run", out, "--n", 5, "--out", tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:
        assert f["x"].shape == (5, 3, 32, 32) and np.abs(f["x"]).max() <= 1


def test_generator_options_that_do_not_fit_are_clean_errors(tmp_path):
    assert_clean_error(train(tmp_path / "a", "--generator", "unet", ok=False), "--generator unet", "(1, 8, 8)",
                       "32 or 64")
    assert_clean_error(train(tmp_path / "b", "--gen-depth", "2", ok=False), "--generator auto", "--gen-depth 2",
                       "no depth")
    assert_clean_error(train(tmp_path / "c", "--gen-width", "0", ok=False), "--gen-width")


def test_balanced_mass_is_logged_per_step(tmp_path):
    # --pos-mass balanced: the mass the field chose (per class, at most the class's size) goes into metrics.jsonl
    out = tmp_path / "balanced"
    train(out, "--pos-mass", "balanced")
    masses = [m["pos_mass"] for m in read_metrics(out)]
    assert masses and all(0 < m <= 200 for m in masses), masses  # about 180 training digits per class
    with open(out / "config.json") as fh:
        assert json.load(fh)["pos_mass"] == "balanced"
    train(tmp_path / "all", "--pos-mass", "all")
    assert all("pos_mass" not in m for m in read_metrics(tmp_path / "all"))
