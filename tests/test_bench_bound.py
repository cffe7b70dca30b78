"""bench/bound.py: the speed-up bound of a bench from the suite's JSON and an ``exact@all`` run.

* the arithmetic: per-step bound = baseline steps / exact@all's (interpolated) steps to the
  baseline's final; step-time bound = step / (step - field); their product; not reached in the steps
  run gives an upper bound (baseline steps / steps run);
* the cut: exact@all runs only as far as reaching the target could still lift the bound to the goal;
* the table names the benches below the goal;
* a real (tiny) ``exact@all`` run scores at exactly the baseline's evaluation steps and at the end, and
  stops once it reaches the target.
"""

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bb():
    spec = importlib.util.spec_from_file_location("bench_bound", ROOT / "bench" / "bound.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _suite(base_records, main_records, steps_ratio=1.2):
    base = {"records": base_records, "steps": 1000, "train_s": 10.0, "field_s": 0.004}
    main = {"records": main_records, "steps": 800, "train_s": 10.0, "field_s": 0.006}
    return {"baseline": "exact@256", "runs": {"0": {"exact@256": base, "projected": main}},
            "comparisons": {"projected": {"0": {"ratio": 1.5, "steps_ratio": steps_ratio, "step_time_ratio": 0.8}}}}


def test_bound_arithmetic(bb):
    suite = _suite([{"step": 100, "quality": 1.0}, {"step": 1000, "quality": 0.2}],
                   [{"step": 800, "quality": 0.1}])
    # exact@all crosses 0.2 halfway between steps 200 (0.3) and 300 (0.1): at step 250
    oracle = {"records": [{"step": 100, "quality": 0.9}, {"step": 200, "quality": 0.3},
                          {"step": 300, "quality": 0.1}, {"step": 1000, "quality": 0.05}], "wall_s": 1.0}
    row = bb.bound_row("mix8-2d", suite, 0, oracle)
    assert row["target"] == 0.2 and row["all_final"] == 0.05
    assert math.isclose(row["all_steps_to_target"], 250.0)
    assert math.isclose(row["steps_ratio_bound"], 1000 / 250)
    t_step = 10.0 / 1000
    assert math.isclose(row["field_share"], 0.004 / t_step)
    assert math.isclose(row["step_time_bound"], t_step / (t_step - 0.004))
    assert math.isclose(row["speedup_bound"], 4.0 * t_step / (t_step - 0.004))
    assert row["main_ratio"] == 1.5 and row["main_final"] == 0.1 and row["per_step_from"] == "exact@all"
    text = bb.render([row], "cpu2")
    assert "| mix8-2d | 0 | exact@256 | 1000 |" in text and "**6.67x**" in text
    assert text.rstrip().endswith("none")  # 6.67x is above the 3x goal
    # DriftXpress's own steps ratio above exact@all's takes its place: the bound is at least that
    suite["comparisons"]["projected"]["0"]["steps_ratio"] = 5.0
    row = bb.bound_row("mix8-2d", suite, 0, oracle)
    assert row["per_step_from"] == "DriftXpress" and math.isclose(row["speedup_bound"], 5.0 * t_step / (t_step - 0.004))
    assert "**>= 8.33x**" in bb.render([row], "cpu2")


def test_bound_not_reached_is_an_upper_bound_and_listed(bb):
    suite = _suite([{"step": 1000, "quality": 0.2}], [{"step": 800, "quality": 0.3}])
    base = suite["runs"]["0"]["exact@256"]
    stb = bb.step_time_bound(base)
    assert math.isclose(stb, 0.01 / 0.006)
    cut = bb.cut_step(base)
    assert cut == math.ceil(1000 * stb / bb.GOAL) == 556
    oracle = {"records": [{"step": 100, "quality": 0.4}, {"step": cut, "quality": 0.25}], "steps_run": cut,
              "wall_s": 1.0}
    row = bb.bound_row("digits", suite, 0, oracle)
    assert row["steps_ratio_bound"] is None and row["per_step_from"] == "exact@all, upper"
    assert math.isclose(row["steps_ratio_below"], 1000 / cut)  # 1.8, above DriftXpress's own 1.2
    assert row["speedup_bound"] <= bb.GOAL and math.isclose(row["speedup_bound"], 1000 / cut * stb)
    text = bb.render([row], "cpu2")
    assert f"< {1000 / cut:.2f} ({cut} steps)" in text and "**< 3.00x**" in text
    assert text.rstrip().endswith("digits")


def test_oracle_run_scores_at_the_baseline_steps(bb, tmp_path):
    base = {"records": [{"step": 2}, {"step": 4}, {"step": 9}], "steps": 9}
    out = bb.oracle_run(bb.ALL["mix8-2d"], base, seed=0, quick=True, work=tmp_path, steps=5)
    assert [r["step"] for r in out["records"]] == [2, 4, 5] and out["steps_run"] == 5
    assert all(math.isfinite(r["quality"]) and r["quality"] > 0 for r in out["records"])
    # a target it meets at once: it stops at the first evaluation
    out = bb.oracle_run(bb.ALL["mix8-2d"], base, seed=0, quick=True, work=tmp_path, steps=5, target=math.inf)
    assert [r["step"] for r in out["records"]] == [2] and out["steps_run"] == 2


def test_replot_from_saved_runs(bb, tmp_path):
    import json

    suite = _suite([{"step": 100, "quality": 1.0}, {"step": 1000, "quality": 0.2}], [{"step": 800, "quality": 0.1}])
    (tmp_path / "train-mix8-2d-cpu2.json").write_text(json.dumps(suite))
    oracle = {"records": [{"step": 200, "quality": 0.3}, {"step": 300, "quality": 0.1}], "steps_run": 300,
              "wall_s": 1.0}
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"oracles": {"mix8-2d": oracle}}))
    assert bb.main(["--replot", str(saved), "--results", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "bound-cpu2.json").read_text())
    assert out["oracles"] == {"mix8-2d": oracle} and math.isclose(out["rows"][0]["all_steps_to_target"], 250.0)
    assert "| mix8-2d |" in (tmp_path / "bound-cpu2.md").read_text()
