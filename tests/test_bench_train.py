"""bench/train.py (the wall-clock-to-quality suite), bench/suite.py, and the dxtrain.train callback.

* ``train(cfg, callback=...)``: called once per step with the step, the training clock and the EMA
  generator; the callback's own time (evaluation, waiting for a turn) is not in the training clock;
* the benches' data: shapes, labels, determinism; the class-conditional energy distance against a
  direct computation;
* the time-to-target analysis: interpolation between the bracketing evaluations, a crossing at the
  first evaluation (a bound), never reached, missing values; the per-seed comparison, the choice of
  the baseline's --positives, the summary over seeds;
* interleaving: runs in their own processes take turns, one at a time, each for its slice;
* the command line: ``--help``, bad arguments named, ``--variant`` parsing, and a ``--quick`` run
  writing JSON (strict: no NaN), PNG and the suite table; ``--replot``.
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


# --------------------------------------------------------------------------- the benches


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(ROOT / "bench"))
    import suite as module

    return module


def test_every_bench_writes_its_data_deterministically(suite, tmp_path):
    for name, bench in suite.BENCHES.items():
        if bench.data is not None:
            assert suite.write_data(bench, tmp_path / "x.npz") == bench.data
            continue
        a, b = tmp_path / f"{name}-a.npz", tmp_path / f"{name}-b.npz"
        suite.write_data(bench, a), suite.write_data(bench, b)
        da, db = np.load(a), np.load(b)
        assert np.array_equal(da["x"], db["x"]) and da["x"].dtype == np.float32 and np.isfinite(da["x"]).all()
        assert ("labels" in da) == bench.conditional, name
        if bench.conditional:
            counts = np.bincount(da["labels"])
            assert counts.min() > 100 and len(counts) >= 5, name
        assert len(da["x"]) >= 12000
    x = np.load(tmp_path / "shapes-12px-a.npz")["x"]
    assert x.shape[1:] == (3, 12, 12) and x.min() >= -1 and x.max() <= 1
    # another seed draws other points of the same structure
    other = tmp_path / "other.npz"
    suite.write_data(suite.BENCHES["mix64-32d"], other, seed=1)
    assert not np.array_equal(np.load(other)["x"], np.load(tmp_path / "mix64-32d-a.npz")["x"])


def test_data_size_family_shares_mix64s_modes(suite, tmp_path):
    """The data-size axis changes only the count: 40,000 points are mix64-32d's data, and a smaller set
    draws from the same 64 centres (each point near one of mix64's centres, not of another structure)."""
    mix64 = np.load(suite.write_data(suite.BENCHES["mix64-32d"], tmp_path / "m.npz"))["x"]
    assert np.array_equal(np.load(suite.write_data(suite.CROSSOVER["size40000-mix64"], tmp_path / "s.npz"))["x"], mix64)
    small = np.load(suite.write_data(suite.CROSSOVER["size1250-mix64"], tmp_path / "t.npz"))["x"]
    assert small.shape == (1250, 32)
    centres = suite._structure("mix64-32d").standard_normal((64, 32))
    other = suite._structure("modes64-32d").standard_normal((64, 32))
    near = lambda x, c: np.sqrt(((x[:, None, :] - c[None]) ** 2).sum(-1)).min(1)  # noqa: E731
    assert np.median(near(small, centres)) < 0.3 * np.sqrt(32) * 1.2 < np.median(near(small, other))


def _energy_reference(a, b):
    """The U-statistic energy distance, written out in float64 pair by pair."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ab = np.mean([np.linalg.norm(x - y) for x in a for y in b])
    aa = np.mean([np.linalg.norm(a[i] - a[j]) for i in range(len(a)) for j in range(len(a)) if i != j])
    bb = np.mean([np.linalg.norm(b[i] - b[j]) for i in range(len(b)) for j in range(len(b)) if i != j])
    return 2 * ab - aa - bb


def test_class_energy_against_a_direct_computation(suite):
    rng = np.random.default_rng(0)
    x, ref = rng.standard_normal((30, 3)), rng.standard_normal((40, 3)) + 0.5
    assert suite.class_energy(x, None, ref, None, 0) == pytest.approx(_energy_reference(x, ref), rel=1e-10)
    xl, rl = np.arange(30) % 2, np.arange(40) % 2
    want = (20 * _energy_reference(x[xl == 0], ref[rl == 0]) + 20 * _energy_reference(x[xl == 1], ref[rl == 1])) / 40
    assert suite.class_energy(x, xl, ref, rl, 0) == pytest.approx(want, rel=1e-10)
    # mixing classes up costs: the right classes score lower than swapped ones
    y = np.concatenate([rng.standard_normal((200, 2)), rng.standard_normal((200, 2)) + 4])
    lab = np.repeat([0, 1], 200)
    assert suite.class_energy(y, lab, y[::-1].copy(), lab, 0) > 1 > abs(suite.class_energy(y, lab, y, lab, 0))


# --------------------------------------------------------------------------- analysis


def test_time_to_target_interpolates(bt):
    hit = bt.time_to_target([1, 2, 4, 8], [1.0, 0.5, 0.3, 0.1], 0.4)
    assert hit["bound"] == "interpolated" and hit["time"] == pytest.approx(3.0)
    assert hit["between"] == [[2.0, 0.5], [4.0, 0.3]]
    assert bt.time_to_target([1, 2, 4], [1.0, 0.5, 0.3], 0.5)["time"] == pytest.approx(2.0)


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


def _run(times, values, setup=1.0, steps=None):
    steps = steps or list(range(len(times)))
    return {"records": [{"time": t, "quality": v, "scores": {"energy_distance": v}, "step": s}
                        for t, v, s in zip(times, values, steps)],
            "train_s": times[-1], "setup_s": setup, "steps": steps[-1], "steps_per_s": 1.0,
            "floor": {"energy_distance": 0.01}}


def test_compare_ratio_steps_and_equal_budget(bt):
    base = _run([10, 20, 40, 80], [1.0, 0.5, 0.3, 0.2], setup=2.0, steps=[10, 20, 40, 80])
    run = _run([10, 20, 40, 80], [0.6, 0.15, 0.1, 0.05], setup=6.0, steps=[5, 10, 20, 40])
    c = bt.compare(base, run)
    t = 10 + 10 * 0.4 / 0.45  # 0.2 is crossed between (10, 0.6) and (20, 0.15)
    assert c["target"] == 0.2 and c["time_to_target"] == pytest.approx(t)
    assert c["ratio"] == pytest.approx(80 / t) and c["ratio_with_setup"] == pytest.approx(82 / (t + 6))
    assert c["steps_to_target"] == pytest.approx(5 + 5 * 0.4 / 0.45)
    assert c["steps_ratio"] == pytest.approx(80 / (5 + 5 * 0.4 / 0.45))
    assert c["step_time_ratio"] == pytest.approx(0.5)  # the baseline 1 s/step, this run 2 s/step
    assert c["better_at_budget"] is True and c["final_ratio"] == pytest.approx(4.0)
    worse = bt.compare(base, _run([10, 20, 40, 80], [4.0, 4.5, 4.6, 4.7]))
    assert worse["bound"] == "not_reached" and worse["ratio"] is None and worse["better_at_budget"] is False


def test_the_baseline_is_the_best_positives(bt):
    runs = {"0": {"exact@256": _run([1, 2], [1.0, 0.5]), "exact@512": _run([1, 2], [1.0, 0.3]),
                  "exact@1024": {"error": "x"}, "projected": _run([1, 2], [0.1, 0.01])},
            "1": {"exact@256": _run([1, 2], [1.0, 0.1]), "exact@512": _run([1, 2], [1.0, 0.4])},
            "2": {"exact@256": _run([1, 2], [1.0, 0.1]), "exact@512": _run([1, 2], [1.0, 0.35])}}
    assert bt.choose_baseline(runs, "seed0") == "exact@512"  # projected and failed runs never count
    assert bt.choose_baseline(runs, "all") == "exact@256"  # medians 0.1 against 0.35
    assert bt.choose_baseline({"0": {"projected": _run([1], [0.1])}}, "seed0") is None


def test_analysis_and_summary_over_seeds(bt):
    good = _run([10, 20, 40], [0.5, 0.1, 0.05])
    base = _run([10, 20, 40], [1.0, 0.5, 0.2])
    result = {"methods": ["exact@512", "projected"], "tune": "seed0",
              "runs": {"0": {"exact@512": base, "projected": good},
                       "1": {"exact@512": base, "projected": _run([10, 20, 40], [1.0, 0.9, 0.8])},
                       "2": {"exact@512": base, "projected": good}}}
    bt.analyse(result)
    assert result["baseline"] == "exact@512" and set(result["comparisons"]["projected"]) == {"0", "1", "2"}
    s = result["summary"]["projected"]
    t = 10 + 10 * 0.3 / 0.4  # 0.2 between (10, 0.5) and (20, 0.1)
    assert s["ratio_median"] == pytest.approx(40 / t)  # median of (r, 0, r): "not reached" counts as 0
    assert s["ratios"][1] is None and s["never_worse"] is False and "not reached" in s["ratio_text"]
    assert s["final_median"] == pytest.approx(0.05) and s["base_final_median"] == pytest.approx(0.2)
    assert bt.summarize({}) == {}


def test_eval_times_geometric(bt):
    times = bt.eval_times(320.0, 8)
    assert len(times) == 7 and times[0] == pytest.approx(5.0) and times[-1] == pytest.approx(320.0)
    assert np.allclose(np.diff(np.log(times)), np.log(64) / 6)
    assert bt.eval_times(10.0, 1) == [10.0]


class _Conn:
    def __init__(self):
        self.sent, self.received = [], 0

    def send(self, msg):
        self.sent.append(msg)

    def recv(self):
        self.received += 1
        return "go"


def test_a_turn_ends_after_each_slice_of_training_time(bt):
    conn = _Conn()
    turn = bt.Turn(conn, 1.0)
    handed = [turn.after_step(t, False) for t in (0.3, 0.9, 1.0, 1.5, 3.7, 3.8)]
    assert handed == [False, False, True, False, True, False]
    assert conn.sent == [("yield", 1.0), ("yield", 3.7)] and conn.received == 2
    assert turn.after_step(9.0, True) is False  # the last step ends the run, it does not hand over


def test_report_and_plot_from_synthetic_results(bt, tmp_path):
    base, other = _run([5, 10, 20, 40], [1.0, 0.5, 0.3, 0.2]), _run([5, 10, 20, 40], [1.2, 0.6, 0.35, 0.3])
    good = _run([5, 10, 20, 40], [0.9, 0.25, 0.1, 0.05])
    result = {"bench": "mix64-32d", "budget": 40.0, "host_kind": "cpu2", "tune": "seed0",
              "methods": ["exact@256", "exact@512", "projected"],
              "runs": {"0": {"exact@256": other, "exact@512": base, "projected": good}}}
    bt.analyse(result)
    text = bt.render_bench(result)
    assert "| 0 | exact@512 (baseline) |" in text and "| 0 | projected |" in text
    ratio = 40 / (10 + 10 * 0.05 / 0.15)  # 0.2 is crossed between (10, 0.25) and (20, 0.1)
    assert f"{ratio:.2f}x" in text and "projected 4.00x lower" in text
    suite_text = bt.render_suite([result], "cpu2")
    assert f"| mix64-32d | 40 | 1 | exact@512 | {ratio:.2f}x" in suite_text and "median bench" in suite_text
    bt.plot(result, tmp_path / "p.png")
    pic = read_png(tmp_path / "p.png")
    assert np.all(pic == (255, 127, 14), axis=2).sum() > 100  # DriftXpress's curve
    ext = dict(result, methods=[*result["methods"], "ext"], configs={"ext": {"field": "exact", "positives": 512}},
               runs={"0": {**result["runs"]["0"], "ext": base}})
    bt.analyse(ext)
    assert "ext (standard drifting, --field exact) against exact@512:" in bt.render_bench(ext)
    assert "## ext (standard drifting, --field exact)" in bt.render_suite([ext], "cpu2") and "## projected" in suite_text
    colours = bt.method_colours(["exact@256", "exact@512", "exact@1024", "exact@2048", "projected", "t3", "ext3", "v"])
    assert colours["projected"] == (255, 127, 14) and len(set(colours.values())) == 8  # no two alike
    assert json.dumps(bt.jsonable({"a": math.nan, "b": (1, np.float32(2.5)), "c": np.int64(3)}),
                      allow_nan=False) == '{"a": null, "b": [1, 2.5], "c": 3}'


def test_crossover_points_and_figure(bt, tmp_path):
    base = _run([5, 10, 20, 40], [1.0, 0.5, 0.3, 0.2])
    ahead, behind = _run([5, 10, 20, 40], [0.9, 0.25, 0.1, 0.05]), _run([5, 10, 20, 40], [1.5, 1.2, 0.9, 0.4])
    results = []
    for name, runs in (("classes32-32d", (ahead, ahead)), ("classes2-32d", (behind, ahead)), ("dim512-zipf200", (ahead,)),
                       ("size5000-mix64", (behind,)), ("mix64-32d", (ahead,))):
        r = {"bench": name, "budget": 40.0, "host_kind": "cpu2", "tune": "seed0", "methods": ["exact@512", "projected"],
             "runs": {str(k): {"exact@512": base, "projected": p} for k, p in enumerate(runs)}}
        bt.analyse(r)
        results.append(r)
    points = bt.crossover_points(results)
    assert sorted(points) == ["classes", "dim", "size"] and [p["value"] for p in points["classes"]] == [2, 32]  # sorted
    assert [p["value"] for p in points["dim"]] == [512]  # mix64 (not on an axis) left out
    assert [p["value"] for p in points["size"]] == [5000] and points["size"][0]["median"] == 0.0
    low, high = points["classes"]
    assert low["ratios"][0] == 0.0 and low["median"] == pytest.approx(0.5 * high["median"])  # (0, r) against (r, r)
    assert high["equal_budget"] == pytest.approx(4.0) and high["baseline"] == "exact@512"
    assert bt.plot_crossover(results, tmp_path / "x.png") and read_png(tmp_path / "x.png").shape == (640, 1000, 3)
    assert not bt.plot_crossover(results[-1:], tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_positives_axis_table_and_figure(bt, tmp_path):
    """DriftXpress against the exact field at every count run, not only the baseline's: per-count medians over the
    seeds where both ran (seed 0 only for the counts ``--tune seed0`` did not choose), the table, the figure."""
    good = _run([5, 10, 20, 40], [0.9, 0.25, 0.1, 0.05])
    e256 = _run([5, 10, 20, 40], [1.0, 0.5, 0.3, 0.2])
    e1024 = _run([5, 10, 20, 40], [1.0, 0.4, 0.08, 0.04], steps=[1, 2, 3, 6])  # twice the steps in the same time
    result = {"bench": "mix64-32d", "budget": 40.0, "host_kind": "cpu2", "tune": "seed0",
              "methods": ["exact@1024", "exact@256", "exact@512", "projected"],
              "runs": {"0": {"exact@256": e256, "exact@1024": e1024, "exact@512": {"error": "x"}, "projected": good},
                       "1": {"exact@1024": e1024, "projected": _run([5, 10, 20, 40], [1, 1, 1, 0.1])},
                       "2": {"exact@1024": e1024, "projected": good}}}
    bt.analyse(result)
    assert result["baseline"] == "exact@1024"
    pts = bt.positives_points(result)
    assert [p["positives"] for p in pts] == [256, 1024]  # sorted by count; the failed exact@512 left out
    low, high = pts
    assert low["seeds"] == 1 and not low["baseline"] and low["equal_budget"] == pytest.approx(0.2 / 0.05)
    assert low["ratio"] == pytest.approx(40 / (10 + 10 * 0.05 / 0.15)) and low["exact_final"] == pytest.approx(0.2)
    assert high["seeds"] == 3 and high["baseline"] and low["step_time"] == pytest.approx(1.0)
    assert high["equal_budget"] == pytest.approx(0.8)  # median of 0.8, 0.4, 0.8
    assert high["ratio"] == 0.0 and high["step_time"] == pytest.approx(0.5)  # 0.04 never reached
    lines = bt.render_suite([result], "cpu2").splitlines()
    header = lines.index("| bench | exact@256 | exact@1024 | same step cost |")
    assert lines[header + 2] == f"| mix64-32d | 4.00; {low['ratio']:.2f}x (1) | 0.80; nr (3) * | 256 |"
    # the count whose step costs DriftXpress's: interpolated in log count where the step-time ratio crosses 1
    at = [{"positives": 256, "step_time": 0.5}, {"positives": 1024, "step_time": 1.5}]
    assert bt.cost_equivalent(at) == "512" and bt.cost_equivalent(at[:1]) == "> 256"
    assert bt.cost_equivalent(at[1:]) == "< 1024" and bt.cost_equivalent([]) == "n/a"
    one = dict(result, methods=["exact@1024", "projected"])  # one count: no axis, no table, no figure
    assert "positives per step" not in bt.render_suite([one], "cpu2")
    assert not bt.plot_positives([one], tmp_path / "none.png") and not (tmp_path / "none.png").exists()
    assert bt.plot_positives([one, result], tmp_path / "p.png") and read_png(tmp_path / "p.png").shape == (640, 1000, 3)


# --------------------------------------------------------------------------- command line


def _cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_help_list_and_bad_arguments():
    r = _cli("--help")
    assert r.returncode == 0 and "--budget" in r.stdout and "--variant" in r.stdout and "mix64-32d" in r.stdout
    r = _cli("--list")
    assert r.returncode == 0 and "shapes-12px" in r.stdout and "digits" in r.stdout
    for args, needle in ((["--budget", "-1"], "--budget"), (["--budget", "inf"], "--budget"),
                         (["--seeds", "0"], "--seeds"), (["--first-seed", "-1"], "--first-seed"),
                         (["--first-seed", "1.5"], "--first-seed"), (["--bench", "cifar"], "--bench"),
                         (["--variant", "corr"], "--variant"), (["--variant", "x=nosuchfield=1"], "nosuchfield"),
                         (["--variant", "projected=correction=true"], "--variant")):
        r = _cli(*args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)


def test_variants_parse_to_train_settings(bt):
    assert bt.parse_variant("c=correction=false,landmarks=512,landmark_method=uniform") == (
        "c", {"correction": False, "landmarks": 512, "landmark_method": "uniform"})
    assert bt.parse_variant("t=temperatures=[0.05,0.2]") == ("t", {"temperatures": [0.05, 0.2]})
    assert bt.parse_settings("generator=unet,gen_width=32") == {"generator": "unet", "gen_width": 32}
    with pytest.raises(Exception, match="--common: 'nope=1'"):
        bt.parse_settings("nope=1")


def test_settings_reach_the_run_configs(bt, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(bt, "run_one", lambda job: seen.append(job) or {"error": "skipped"})
    assert bt.main(["--bench", "mix8-2d", "--quick", "--in-process", "--out", str(tmp_path),
                    "--positives", "256", "1024", "--variant", "big=landmarks=64,correction=false",
                    "--common", "gen_width=16,lr=0.002"]) == 0
    configs = {j["method"]: j["config"] for j in seen}
    assert set(configs) == {"exact@256", "exact@1024", "projected", "big"}
    assert configs["exact@1024"]["field"] == "exact" and configs["exact@1024"]["positives"] == 1024
    assert configs["projected"]["field"] == "projected" and "correction" not in configs["projected"]
    assert configs["big"]["landmarks"] == 64 and configs["big"]["correction"] is False
    assert all(j["config"]["data"].endswith("mix8-2d.npz") for j in seen)
    assert all(j["config"]["gen_width"] == 16 and j["config"]["lr"] == 0.002 for j in seen)  # --common: every run
    assert (tmp_path / f"train-mix8-2d-cpu{os.cpu_count()}-quick.json").exists()


def test_first_seed_tunes_the_baseline_and_later_seeds_run_it(bt, tmp_path, monkeypatch):
    seen = []

    def fake(job):
        seen.append((job["seed"], job["method"], job["config"]["seed"]))
        final = {"exact@256": 0.5, "exact@1024": 0.2}.get(job["method"], 0.1)
        return _run([1, 2], [1.0, final])

    monkeypatch.setattr(bt, "run_one", fake)
    assert bt.main(["--bench", "mix8-2d", "--quick", "--in-process", "--out", str(tmp_path), "--seeds", "2",
                    "--first-seed", "3", "--positives", "256", "1024", "--tag", "fs"]) == 0
    assert sorted(seen) == [(3, "exact@1024", 3), (3, "exact@256", 3), (3, "projected", 3),
                            (4, "exact@1024", 4), (4, "projected", 4)]  # seed 3 tunes; seed 4 runs the best
    with open(tmp_path / f"train-mix8-2d-cpu{os.cpu_count()}-fs-quick.json") as fh:
        saved = json.load(fh)
    assert sorted(saved["runs"]) == ["3", "4"] and saved["baseline"] == "exact@1024"
    assert sorted(saved["comparisons"]["projected"]) == ["3", "4"]


def test_quick_interleaved_run_writes_results(bt, tmp_path, capsys):
    out = tmp_path / "res"
    # as a user runs it (the spawned workers import the script as a module by its path)
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--bench", "mix8-2d", "--positives", "256",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "## mix8-2d:" in r.stdout and "median bench" in r.stdout
    kind = f"cpu{os.cpu_count()}"
    path = out / f"train-mix8-2d-{kind}-quick.json"
    with open(path) as fh:
        data = json.load(fh, parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))
    assert data["baseline"] == "exact@256" and data["budget"] == 3.0
    for method in ("exact@256", "projected"):
        run = data["runs"]["0"][method]
        assert "error" not in run, run
        assert run["records"][-1]["time"] >= 3.0 and all(r["quality"] is not None for r in run["records"])
        assert run["turns"] >= 5  # each took turns (slices of 0.2 s), interleaved with the other
    assert "0" in data["comparisons"]["projected"] and data["png"] == path.with_suffix(".png").name
    assert read_png(path.with_suffix(".png")).shape[1] == 1000
    suite_md = (out / f"train-suite-{kind}-quick.md").read_text()
    assert "| mix8-2d | 3 | 1 | exact@256 |" in suite_md
    assert not list(out.glob("*.tmp"))
    # --replot recomputes the analysis of saved results without training
    before = json.loads(path.read_text())
    capsys.readouterr()
    assert bt.main(["--replot", str(out / f"train-suite-{kind}-quick.json")]) == 0
    after = json.loads(path.read_text())
    assert after["runs"] == before["runs"] and after["comparisons"] == before["comparisons"]
    assert "replotted" in after and "## mix8-2d:" in capsys.readouterr().out
    (tmp_path / "junk.json").write_text("{}")
    assert bt.main(["--replot", str(tmp_path / "junk.json")]) == 2


def test_code_revision_in_a_work_tree_and_in_a_copy(bt, tmp_path, monkeypatch):
    """A run records the commit it measured; a copy outside git (``git archive``) says its commit is
    unknown unless DX_GIT_COMMIT names it, and never claims to be clean."""
    from _measure import code_revision

    if subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip() == str(ROOT):
        rev = code_revision(ROOT, ("dxfield", "dxtrain"))
        assert len(rev["git_commit"]) == 40 and isinstance(rev["dirty"], bool)
    copy = tmp_path / "copy"
    copy.mkdir()
    monkeypatch.delenv("DX_GIT_COMMIT", raising=False)
    assert code_revision(copy, ("dxfield",)) == {"git_commit": None, "dirty": None}
    monkeypatch.setenv("DX_GIT_COMMIT", "0123abc")
    assert code_revision(copy, ("dxfield",)) == {"git_commit": "0123abc", "dirty": None}
    info = bt.machine_info()
    assert "git_commit" in info and "dirty" in info
