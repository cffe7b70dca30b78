"""bench/train.py (wall-clock to quality) and the dxtrain.train callback it relies on.

* ``train(cfg, callback=...)``: called once per step with the step, the training clock and the EMA
  generator; the callback's own time is not in the training clock;
* the time-to-target analysis: interpolation between the bracketing evaluations, a crossing at the
  first evaluation (a bound), never reached, missing values; the per-seed comparison;
* the evaluation schedule, the report and the plot on synthetic results;
* the command line: ``--help``, bad arguments named, and a ``--quick --in-process`` smoke run of both
  benchmarks writing JSON (strict: no NaN) and PNG files.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

importlib.import_module("dxtrain")  # before torch: sleep-waiting thread pools (dxtrain/__init__.py)
torch = pytest.importorskip("torch")

from dxtrain.pictures import read_png  # noqa: E402
from dxtrain.train import StepInfo, TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "train.py"


@pytest.fixture(scope="module")
def bt():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the training callback


def _tiny(out, **kw):
    return TrainConfig(**{"data": "moons", "out": str(out), "field": "exact", "steps": 5, "batch": 40,
                          "positives": 60, "encoder": "none", "device": "cpu", "evaluate": False, "progress": False,
                          "log_every": 1, "sample_every": 1000, "checkpoint_every": 1000, **kw})


def test_callback_sees_every_step_and_its_time_is_not_training_time(tmp_path):
    seen = []

    def callback(info):
        assert isinstance(info, StepInfo)
        seen.append((info.step, info.elapsed, info.final, info.setup_s))
        assert not info.ema_model.training and info.num_classes == 2 and len(info.test_ds) > 0
        time.sleep(0.1)

    result = train(_tiny(tmp_path / "run"), callback=callback, log=lambda m: None)
    assert [s for s, *_ in seen] == [1, 2, 3, 4, 5]
    assert [f for _, _, f, _ in seen] == [False] * 4 + [True]
    elapsed = [e for _, e, _, _ in seen]
    assert elapsed == sorted(elapsed) and elapsed[-1] == result["wall"]
    assert result["wall"] < 0.25  # 5 x 0.1 s slept in the callback are not training time
    assert result["setup_s"] > 0 and seen[0][3] == result["setup_s"]
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        walls = [json.loads(line)["wall"] for line in fh]
    assert walls == pytest.approx(elapsed, abs=1e-4)


def test_callback_final_at_time_budget(tmp_path):
    seen = []
    train(_tiny(tmp_path / "run", steps=10 ** 6, time_budget=0.3), callback=lambda i: seen.append(i.final),
          log=lambda m: None)
    assert seen[-1] is True and not any(seen[:-1])


# --------------------------------------------------------------------------- analysis


def test_time_to_target_interpolates(bt):
    hit = bt.time_to_target([1, 2, 4, 8], [1.0, 0.5, 0.3, 0.1], 0.4)
    assert hit["bound"] == "interpolated" and hit["time"] == pytest.approx(3.0)
    assert hit["between"] == [[2.0, 0.5], [4.0, 0.3]]
    exact_hit = bt.time_to_target([1, 2, 4], [1.0, 0.5, 0.3], 0.5)
    assert exact_hit["time"] == pytest.approx(2.0)


def test_time_to_target_bounds_and_gaps(bt):
    first = bt.time_to_target([1, 2], [0.1, 0.05], 0.2)
    assert first["bound"] == "at_first_eval" and first["time"] == 1.0
    never = bt.time_to_target([1, 2], [0.5, 0.4], 0.2)
    assert never["bound"] == "not_reached" and never["time"] is None
    assert bt.time_to_target([1, 2], [0.5, 0.1], math.nan)["bound"] == "not_reached"
    # a missing evaluation is skipped; a curve that rises again keeps its first crossing
    gap = bt.time_to_target([1, 2, 3, 4], [1.0, None, 0.0, 1.0], 0.5)
    assert gap["time"] == pytest.approx(2.0) and gap["between"] == [[1.0, 1.0], [3.0, 0.0]]
    with pytest.raises(ValueError, match="times"):
        bt.time_to_target([1, 2], [1.0], 0.5)


def _run(times, values, setup=1.0):
    return {"records": [{"time": t, "quality": v, "scores": {}, "step": i} for i, (t, v) in enumerate(zip(times, values))],
            "train_s": times[-1], "setup_s": setup, "steps": len(times), "steps_per_s": 1.0, "floor": {"q": 0.01}}


def test_compare_ratio_and_equal_budget(bt):
    exact = _run([10, 20, 40, 80], [1.0, 0.5, 0.3, 0.2], setup=2.0)
    projected = _run([10, 20, 40, 80], [0.6, 0.15, 0.1, 0.05], setup=6.0)
    c = bt.compare(exact, projected)
    # 0.2 is crossed between (10, 0.6) and (20, 0.15): at 10 + 10 * 0.4 / 0.45
    t = 10 + 10 * 0.4 / 0.45
    assert c["target"] == 0.2 and c["projected_time_to_target"] == pytest.approx(t)
    assert c["ratio"] == pytest.approx(80 / t) and c["ratio_with_setup"] == pytest.approx(82 / (t + 6))
    assert c["projected_final_lower"] is True and c["final_ratio"] == pytest.approx(4.0)
    worse = bt.compare(exact, _run([10, 20, 40, 80], [4.0, 4.5, 4.6, 4.7]))
    assert worse["bound"] == "not_reached" and worse["ratio"] is None
    assert worse["projected_final_lower"] is False


def test_compare_in_steps_and_summary_over_seeds(bt):
    exact = _run([10, 20, 40, 80], [1.0, 0.5, 0.3, 0.2])  # steps 0..3, 80 s: 20 s/step
    projected = _run([5, 10, 20, 40], [0.6, 0.15, 0.1, 0.05])  # 10 s/step
    c = bt.compare(exact, projected)
    # in steps, 0.2 is crossed between step 0 (0.6) and step 1 (0.15)
    assert c["projected_steps_to_target"] == pytest.approx(0.4 / 0.45)
    assert c["steps_ratio"] == pytest.approx(4 / (0.4 / 0.45)) and c["step_time_ratio"] == pytest.approx(2.0)
    bad = bt.compare(exact, _run([10, 20], [4.0, 4.5]))
    s = bt.summarize({"0": c, "1": bad})
    assert s["ratio_lower_median"] is None and s["ratio_text"].startswith("not reached")
    assert s["exact_final_median"] == 0.2 and s["projected_final_median"] == pytest.approx((0.05 + 4.5) / 2)
    s = bt.summarize({"0": c, "1": c, "2": bad})
    assert s["ratio_lower_median"] == pytest.approx(c["ratio"])
    assert bt.summarize({}) == {}


def test_eval_times_geometric(bt):
    times = bt.eval_times(320.0, 8)
    assert len(times) == 7 and times[0] == pytest.approx(5.0) and times[-1] == pytest.approx(320.0)
    assert np.allclose(np.diff(np.log(times)), np.log(64) / 6)
    assert bt.eval_times(10.0, 1) == [10.0]


def test_report_and_plot_from_synthetic_results(bt, tmp_path):
    exact = _run([5, 10, 20, 40], [1.0, 0.5, 0.3, 0.2])
    projected = _run([5, 10, 20, 40], [0.9, 0.25, 0.1, 0.05])
    for r in (exact, projected):
        for rec in r["records"]:
            rec["scores"] = {"truth_energy_distance": rec["quality"], "mode_tv": 0.1}
        r["floor"] = {"truth_energy_distance": 0.001}
    result = {"budget": 40.0, "host_kind": "cpu2", "runs": {"0": {"exact": exact, "projected": projected}},
              "comparisons": {"0": bt.compare(exact, projected)}}
    text = bt.render("mixture", result)
    assert "| 0 | exact |" in text and "| 0 | projected |" in text
    ratio = 40 / (10 + 10 * 0.05 / 0.15)  # 0.2 is crossed between (10, 0.25) and (20, 0.1)
    assert f"{ratio:.2f}x" in text and "projected better (4.00x lower)" in text
    bt.plot("mixture", result, tmp_path / "p.png")
    pic = read_png(tmp_path / "p.png")
    for colour in bt.METHOD_COLOURS.values():
        assert np.all(pic == colour, axis=2).sum() > 100
    assert json.dumps(bt.jsonable({"a": math.nan, "b": (1, np.float32(2.5)), "c": np.int64(3)}),
                      allow_nan=False) == '{"a": null, "b": [1, 2.5], "c": 3}'


# --------------------------------------------------------------------------- command line


def _cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_help_and_bad_arguments():
    r = _cli("--help")
    assert r.returncode == 0 and "--budget" in r.stdout and "--quick" in r.stdout and "mixture" in r.stdout
    for args, needle in ((["--budget", "-1"], "--budget"), (["--budget", "inf"], "--budget"),
                         (["--repeats", "0"], "--repeats"), (["--bench", "cifar"], "--bench"),
                         (["--repeats", "two"], "--repeats")):
        r = _cli(*args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)


def test_quick_run_writes_results(bt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DXTRAIN_CACHE", str(tmp_path / "cache"))
    assert bt.main(["--quick", "--in-process", "--out", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    kind = f"cpu{os.cpu_count()}"
    for bench, metric in (("digits", "FD_digits"), ("mixture", "truth_energy_distance")):
        assert f"## {bench}:" in out
        path = tmp_path / "res" / f"train-{bench}-{kind}-quick.json"
        with open(path) as fh:
            data = json.load(fh, parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))
        assert data["quick"] is True and data["metric"] == metric and data["budget"] == 2.0
        runs = data["runs"]["0"]
        for method in ("exact", "projected"):
            records = runs[method]["records"]
            assert records and records[-1]["time"] >= 2.0 and all(r["quality"] is not None for r in records)
            assert runs[method]["setup_s"] > 0 and runs[method]["steps"] > 0
        assert data["configs"]["projected"]["landmarks"] == 32 and data["configs"]["exact"]["field"] == "exact"
        assert "0" in data["comparisons"] and data["png"] == path.with_suffix(".png").name
        height, width, _ = read_png(path.with_suffix(".png")).shape
        assert width == 900 and height >= 560  # the legend may add a band below
    assert not list(tmp_path.glob("res/*.tmp"))
    # --replot recomputes the analysis of saved results without training
    path = tmp_path / "res" / f"train-mixture-{kind}-quick.json"
    before = json.loads(path.read_text())
    assert bt.main(["--replot", str(path)]) == 0
    after = json.loads(path.read_text())
    assert after["runs"] == before["runs"] and after["comparisons"] == before["comparisons"]
    assert "replotted" in after and "## mixture:" in capsys.readouterr().out
    (tmp_path / "junk.json").write_text("{}")
    assert bt.main(["--replot", str(tmp_path / "junk.json")]) == 2


def test_non_default_settings_get_their_own_file_names(bt):
    p = bt.build_parser()
    assert bt.variant_suffix(p.parse_args([])) == ""
    args = p.parse_args(["--temperatures", "0.2", "--landmarks", "2048", "--landmark-method", "uniform",
                         "--normalization", "row", "--repulsion", "nystrom", "--positives", "4096", "--quick"])
    assert bt.variant_suffix(args) == "-tau0.2-m2048-uniform-row-nystrom-p4096-quick"


def test_settings_reach_the_run_configs(bt, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(bt, "run_one", lambda job: seen.append(job["config"]) or {"error": "skipped"})
    assert bt.main(["--bench", "mixture", "--quick", "--in-process", "--out", str(tmp_path),
                    "--repulsion", "nystrom", "--normalization", "row", "--landmark-method", "uniform"]) == 0
    exact, projected = sorted(seen, key=lambda c: c["field"])
    assert exact["normalization"] == projected["normalization"] == "row"
    assert projected["repulsion"] == "nystrom" and projected["landmark_method"] == "uniform"
    assert "repulsion" not in exact and "landmark_method" not in exact
    assert (tmp_path / f"train-mixture-cpu{os.cpu_count()}-uniform-row-nystrom-quick.json").exists()


def test_legend_labels_name_the_projected_settings(bt):
    result = {"configs": {"exact": {"field": "exact"},
                          "projected": {"field": "projected", "landmarks": 512, "correction": True}}}
    assert bt.method_label(result, "exact") == "exact (standard drifting)"
    assert bt.method_label(result, "projected") == "projected (DriftXpress, m=512, corrected)"
    result["configs"]["projected"] = {"repulsion": "nystrom", "normalization": "row"}
    assert bt.method_label(result, "projected") == "projected (DriftXpress, nystrom repulsion, row)"


def test_a_non_default_budget_is_in_the_file_name(bt, tmp_path, monkeypatch):
    monkeypatch.setattr(bt, "run_one", lambda job: {"error": "skipped"})
    assert bt.main(["--bench", "mixture", "--budget", "3", "--evals", "2", "--in-process", "--out",
                    str(tmp_path), "--correction"]) == 0
    assert (tmp_path / f"train-mixture-cpu{os.cpu_count()}-3s-corrected.json").exists()
