"""Benchmark: wall-clock to quality over a suite of benches -- standard drifting vs DriftXpress at dxtrain's defaults.

Every bench of :mod:`suite` (mixtures from 8 to 200 modes in 2 to 128
dimensions, equal and skewed weights, conditional and not, two manifolds, the
digits, synthetic images through the builtin encoder) is trained by dxtrain
with its defaults -- one set for every bench, no per-bench flag -- by:

* ``exact@P`` -- standard drifting (``--field exact``): Algorithm 2 against
  ``P`` fresh real samples per step, for every ``P`` of ``--positives``
  (256, 512, 1024, 2048).  The baseline of a bench is the ``P`` with the
  lowest final quality at seed 0 (``--tune all``: the lowest median over the
  seeds, every ``P`` run at every seed), so DriftXpress is compared with a
  fairly tuned standard drifting;
* ``projected`` -- DriftXpress, ``dxtrain train``'s defaults;
* any ``--variant NAME=key=value,...`` -- DriftXpress with other
  :class:`dxtrain.train.TrainConfig` settings (for studying the defaults).

Interleaved in time: the runs of one (bench, seed) live in their own spawned
processes side by side, and take turns -- each trains for a slice of
``--slice`` seconds of training time, then hands the machine to the next
(blocking inside :func:`dxtrain.train.train`'s callback, outside the
training clock).  A slow spell of the machine (this one drifts up to 3x
within minutes) then hits every method alike, and only one run uses the cores
at a time.

Quality is measured by the callback on the EMA generator at ``--evals`` points
of training time (geometric from budget/64, and at the end); the training
clock is dxtrain's (``StepInfo.elapsed``: steps only; evaluation, waiting for
the turn and the set-up are not in it; the set-up is reported).

What is reported, per bench and seed: the target = the baseline's final
quality; the time DriftXpress first reaches it (interpolated between
evaluations); the time-to-target ratio = budget / that time (with set-up
added to both sides too, and in optimiser steps next to the step-time ratio);
the equal-budget finals.  Over seeds the median ratio ("not reached" counts
as 0); over benches, the median bench.  The positives-per-step axis:
DriftXpress against the exact field at every ``P`` run, not only the
baseline's (a table in the suite's markdown, ``train-positives-<host>.png``).
Curves as PNG per bench, the crossover benches' figure
(``train-crossover-<host>.png``), the table in markdown (stdout and
``train-suite-<host>.md``), everything in JSON.

Run::

    python bench/train.py                               # the whole suite, 3 seeds (~70 min on 2 cores)
    python bench/train.py --bench mix64-32d rings-2d --seeds 1 --budget 40
    python bench/train.py --bench mix64-32d --positives 512 --variant corr=correction=true
    python bench/train.py --quick                       # smoke run, seconds per bench (numbers mean nothing)
    python bench/train.py --replot bench/results/train-suite-cpu2.json   # table and PNGs again from saved runs
    python bench/train.py --list                        # the benches

Measured results and what they mean: ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import dxtrain  # noqa: E402,F401  (before torch and NumPy: sleep-waiting thread pools, see dxtrain/__init__.py)
import numpy as np  # noqa: E402

from _measure import code_revision, exit_with_parent, gpu_kind, write_json_atomic  # noqa: E402
from suite import ALL, BENCHES, CROSSOVER, score, write_data  # noqa: E402

POSITIVES = (256, 512, 1024, 2048)
EXACT = re.compile(r"^exact@(\d+)$")  # the exact field at --positives P, as the benches name it
DEFAULT_SEEDS = 3
DEFAULT_EVALS = 12
SLICES = 15  # turns per run: the default slice is budget / SLICES
QUICK = {"budget": 3.0, "evals": 3, "landmarks": 16}  # --quick: a smoke run; its numbers mean nothing
MAIN = "projected"  # DriftXpress at dxtrain's defaults: the method the goals are about


# --------------------------------------------------------------------------------------
# one run (in its own process), taking turns with the others
# --------------------------------------------------------------------------------------
def eval_times(budget: float, n: int) -> list[float]:
    """Training times (s) at which to evaluate: ``n - 1`` geometric points from budget/64 to the budget
    (the final evaluation always happens too, at the step that ends the run)."""
    if n < 2:
        return [float(budget)]
    return [float(t) for t in np.geomspace(budget / 64.0, budget, n - 1)]


class Turn:
    """Takes turns with the other runs: after each ``slice_s`` seconds of training, hand over and wait."""

    def __init__(self, conn, slice_s: float):
        self.conn, self.slice_s = conn, float(slice_s)
        self.until = self.slice_s

    def after_step(self, elapsed: float, final: bool) -> bool:
        """True when it handed over (and got the machine back)."""
        if final or elapsed < self.until:
            return False
        while self.until <= elapsed:
            self.until += self.slice_s
        self.conn.send(("yield", elapsed))
        self.conn.recv()  # "go"
        return True


class Evaluator:
    """The :func:`dxtrain.train.train` callback: scores at the scheduled training times and at the end,
    and takes turns with the other runs (``turn``)."""

    def __init__(self, bench, times, seed: int, quick: bool, tag: str, turn: Turn | None = None):
        self.bench, self.times, self.seed, self.quick, self.tag, self.turn = bench, list(times), seed, quick, tag, turn
        self.next = 0
        self.records: list[dict] = []
        self.floor: dict = {}
        self.eval_s = 0.0
        self.turns = 0
        self._cpu = self._wall = None  # CPU and wall marks of the current training segment

    def __call__(self, info) -> None:
        if self._cpu is None:  # segments start after the first step, so the set-up is not in them
            self._mark()
        due = self.next < len(self.times) and info.elapsed >= self.times[self.next]
        if due or info.final:
            self._evaluate(info)
        if self.turn is not None and self.turn.after_step(info.elapsed, info.final):
            self.turns += 1
            self._mark()

    def _mark(self) -> None:
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def _evaluate(self, info) -> None:
        while self.next < len(self.times) and info.elapsed >= self.times[self.next]:
            self.next += 1
        cpu, wall = time.process_time() - self._cpu, time.perf_counter() - self._wall
        t0 = time.perf_counter()
        scores, self.floor = score(self.bench, info, self.seed, quick=self.quick)
        eval_s = time.perf_counter() - t0
        self.eval_s += eval_s
        util = cpu / wall if wall > 1e-3 else None
        value = scores[self.bench.metric]
        self.records.append({"step": info.step, "time": info.elapsed, "quality": value, "scores": scores,
                             "eval_s": eval_s, "cpu_util": util})
        print(f"  [{self.tag}] t={info.elapsed:7.1f}s step {info.step:6d}  {self.bench.metric} {_fmt(value, '.5g')}"
              f"  (eval {eval_s:.1f}s)", flush=True)
        self._mark()


def run_one(job: dict, turn: Turn | None = None) -> dict:
    """Train one (bench, method, seed) with the evaluation callback; JSON-ready results or ``{"error"}``."""
    try:
        import torch

        from dxtrain.train import TrainConfig, train

        tag = f"{job['bench']}/{job['method']} seed {job['seed']}"
        cfg = TrainConfig(**job["config"])
        ev = Evaluator(ALL[job["bench"]], job["eval_times"], job["seed"], job["quick"], tag, turn)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        result = train(cfg, callback=ev, log=lambda msg: print(f"  [{tag}] {msg}", flush=True))
        return {"records": ev.records, "floor": ev.floor, "setup_s": result["setup_s"], "steps": result["step"],
                "train_s": result["wall"], "steps_per_s": result["step"] / max(result["wall"], 1e-9),
                "field_s": result.get("field_s"), "eval_s": ev.eval_s, "turns": ev.turns,
                "process_wall_s": time.perf_counter() - t0, "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(), "torch_threads": torch.get_num_threads()}
    except Exception as exc:  # a benchmark reports, it does not raise
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


def _worker(job: dict, conn) -> None:
    exit_with_parent()
    conn.recv()  # the first turn: the set-up runs in it, so set-ups never overlap either
    result = run_one(job, Turn(conn, job["slice"]))
    conn.send(("done", result))


def run_interleaved(jobs: list[dict], timeout: float) -> list[dict]:
    """Every job in its own spawned process, taking turns (round robin, one at a time) until all end."""
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for job in jobs:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(job, child), name=f"{job['bench']}-{job['method']}")
        p.start()
        procs.append(p)
        conns.append(parent)
    results: list[dict | None] = [None] * len(jobs)
    live = list(range(len(jobs)))
    try:
        while live:
            for i in list(live):
                conns[i].send("go")
                try:
                    if not conns[i].poll(timeout):
                        raise TimeoutError(f"no answer within {timeout:.0f} s")
                    kind, payload = conns[i].recv()
                except (EOFError, OSError, TimeoutError) as exc:
                    procs[i].kill()
                    results[i] = {"error": f"worker ended without a result ({type(exc).__name__}: {exc}; "
                                           f"exit code {procs[i].exitcode})"}
                    live.remove(i)
                    continue
                if kind == "done":
                    results[i] = payload
                    live.remove(i)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return results


# --------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------
def time_to_target(times, values, target: float) -> dict:
    """When a (lower-is-better) curve first reaches ``target``.

    Returns ``{"time", "bound", "between"}``: ``time`` linearly interpolated between the
    last evaluation above the target and the first at or below it; ``bound`` is
    ``"at_first_eval"`` when the first evaluation is already at or below the target (``time``
    is then that evaluation's time: an upper bound), ``"not_reached"`` (``time`` None) when
    no evaluation reaches it, else ``"interpolated"``; ``between`` the bracketing points.
    """
    times = [float(t) for t in times]
    values = [float(v) if v is not None else math.nan for v in values]
    if len(times) != len(values):
        raise ValueError(f"times has {len(times)} entries but values has {len(values)}")
    if not math.isfinite(target):
        return {"time": None, "bound": "not_reached", "between": None}
    prev = None
    for t, v in zip(times, values):
        if not math.isfinite(v):
            continue
        if v <= target:
            if prev is None:
                return {"time": t, "bound": "at_first_eval", "between": [[t, v]]}
            (t0, v0) = prev
            frac = (v0 - target) / (v0 - v) if v0 != v else 1.0
            return {"time": t0 + frac * (t - t0), "bound": "interpolated", "between": [[t0, v0], [t, v]]}
        prev = (t, v)
    return {"time": None, "bound": "not_reached", "between": None}


def final_quality(run: dict | None) -> float:
    if not run or "error" in run or not run.get("records") or run["records"][-1]["quality"] is None:
        return math.nan
    return float(run["records"][-1]["quality"])


def compare(base: dict, run: dict) -> dict:
    """Time-to-target and equal-budget figures of one run against the baseline run of the same seed."""
    pr = run["records"]
    target = final_quality(base)
    t_base = base["train_s"]
    hit = time_to_target([r["time"] for r in pr], [r["quality"] for r in pr], target)
    out = {"target": target, "base_train_s": t_base, "time_to_target": hit["time"], "bound": hit["bound"],
           "between": hit["between"], "ratio": None, "ratio_with_setup": None, "base_final": target,
           "final": final_quality(run), "base_setup_s": base["setup_s"], "setup_s": run["setup_s"]}
    if hit["time"] is not None and hit["time"] > 0:
        out["ratio"] = t_base / hit["time"]
        out["ratio_with_setup"] = (t_base + base["setup_s"]) / (hit["time"] + run["setup_s"])
    # the same in steps: how much better each step is, whatever the machine's speed at the time
    hit_steps = time_to_target([r["step"] for r in pr], [r["quality"] for r in pr], target)
    out["steps_to_target"], out["base_steps"] = hit_steps["time"], base["steps"]
    out["steps_ratio"] = (base["steps"] / hit_steps["time"]) if hit_steps["time"] else None
    out["step_time_ratio"] = ((t_base / base["steps"]) / (run["train_s"] / run["steps"])
                              if base["steps"] and run["steps"] else None)
    out["final_ratio"] = None  # baseline final / this final: > 1 means lower (better) at equal budget
    if math.isfinite(out["final"]) and math.isfinite(target) and out["final"] > 0 and target > 0:
        out["final_ratio"] = target / out["final"]
    out["better_at_budget"] = (out["final"] <= target) if math.isfinite(out["final"]) and math.isfinite(
        target) else None
    return out


def choose_baseline(runs: dict, tune: str) -> str | None:
    """The ``exact@P`` with the lowest final quality: at seed 0, or (``tune="all"``) the lowest median."""
    finals: dict[str, list[float]] = {}
    seeds = sorted(runs, key=int)
    for seed in (seeds if tune == "all" else seeds[:1]):
        for method, run in runs[seed].items():
            if EXACT.match(method):
                finals.setdefault(method, []).append(final_quality(run))
    scored = {m: float(np.median(v)) for m, v in finals.items() if all(math.isfinite(x) for x in v)}
    return min(scored, key=scored.get) if scored else None


def _usable(run: dict | None) -> bool:
    """A run that finished with evaluations (not missing, not failed)."""
    return bool(run) and "error" not in run and bool(run.get("records"))


def analyse(result: dict) -> None:
    """Fill ``result["baseline"]``, ``["comparisons"]`` (method -> seed -> figures) and ``["summary"]``."""
    runs = result["runs"]
    base = result.get("baseline_fixed") or choose_baseline(runs, result.get("tune", "seed0"))
    result["baseline"] = base
    result["comparisons"], result["summary"] = {}, {}
    if base is None:
        return
    for method in result["methods"]:
        if EXACT.match(method):
            continue
        comps = {seed: compare(runs[seed][base], runs[seed][method]) for seed in sorted(runs, key=int)
                 if _usable(runs[seed].get(base)) and _usable(runs[seed].get(method))}
        result["comparisons"][method] = comps
        result["summary"][method] = summarize(comps)


def _median(comps: list[dict], key: str, missing=None) -> float | None:
    """The median of ``key`` over per-seed comparisons; a None value counts as ``missing`` (None: left out),
    non-finite values are left out; None when nothing is left."""
    vals = [c[key] if c[key] is not None else missing for c in comps]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.median(vals)) if vals else None


def summarize(comps: dict) -> dict:
    """Over seeds: the median time-to-target ratio ("not reached" counts as 0) and median finals."""
    cs = [comps[k] for k in sorted(comps, key=int)]
    if not cs:
        return {}
    med = _median(cs, "ratio", missing=0.0)
    return {"ratio_median": med if med > 0 else None, "ratios": [c["ratio"] for c in cs],
            "bounds": [c["bound"] for c in cs], "ratio_text": ("not reached" if med == 0 else f"{med:.2f}x")
            + " (" + ", ".join(_ratio_text(c) for c in cs) + ")",
            "base_final_median": _median(cs, "base_final"), "final_median": _median(cs, "final"),
            "final_ratio_median": _median(cs, "final_ratio"), "steps_ratio_median": _median(cs, "steps_ratio"),
            "step_time_ratio_median": _median(cs, "step_time_ratio"),
            "never_worse": all(c["better_at_budget"] for c in cs)}


def jsonable(obj):
    """``obj`` with tuples as lists and non-finite floats as None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def _fmt(v, spec=".4g", none="n/a"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def _ratio_text(c: dict, key: str = "ratio") -> str:
    if c["bound"] == "not_reached":
        return "not reached"
    return (">= " if c["bound"] == "at_first_eval" else "") + _fmt(c[key], ".2f") + "x"


def method_title(method: str, results: list[dict]) -> str:
    """``method`` as the tables name it: a ``--variant`` that sets ``field=exact`` is standard drifting, not
    DriftXpress, and says so."""
    exact = any(r.get("configs", {}).get(method, {}).get("field") == "exact" for r in results)
    return f"{method} (standard drifting, --field exact)" if exact and not EXACT.match(method) else method


def render_bench(result: dict) -> str:
    bench = ALL[result["bench"]]
    m, base = bench.metric, result.get("baseline")
    lines = [f"## {bench.name}: {bench.about}", "",
             f"{bench.metric_label} ({m}, lower is better) vs training wall-clock, budget {result['budget']:g} s "
             f"per run, host {result['host_kind']}; baseline (best --positives): {base or 'n/a'}", "",
             "| seed | method | steps | steps/s | set-up (s) | final | floor |" + "".join(
                 f" {k} |" for k in bench.extras),
             "|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(bench.extras)]
    for seed in sorted(result["runs"], key=int):
        for method in result["methods"]:
            r = result["runs"][seed].get(method)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {seed} | {method} | error: {r['error']} |")
                continue
            last = r["records"][-1] if r["records"] else {"scores": {}}
            lines.append(f"| {seed} | {method}{' (baseline)' if method == base else ''} | {r['steps']} | "
                         f"{r['steps_per_s']:.2f} | {r['setup_s']:.1f} | {_fmt(final_quality(r))} | "
                         f"{_fmt(r['floor'].get(m))} |" + "".join(f" {_fmt(last['scores'].get(k))} |"
                                                                  for k in bench.extras))
    for method, comps in result.get("comparisons", {}).items():
        lines += ["", f"{method_title(method, [result])} against {base}:", "",
                  "| seed | target = baseline final | reached at (s) | baseline total (s) | time-to-target ratio "
                  "| with set-up | in steps | step-time ratio | final | equal budget |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for seed, c in sorted(comps.items(), key=lambda kv: int(kv[0])):
            when = {"not_reached": "not reached", "at_first_eval": f"<= {_fmt(c['time_to_target'], '.1f')}"}
            verdict = "n/a"
            if c["better_at_budget"] is not None and c["final_ratio"]:
                verdict = (f"{method} {c['final_ratio']:.2f}x lower" if c["better_at_budget"]
                           else f"baseline {1 / c['final_ratio']:.2f}x lower")
            lines.append(f"| {seed} | {_fmt(c['target'])} | {when.get(c['bound'], _fmt(c['time_to_target'], '.1f'))} "
                         f"| {c['base_train_s']:.1f} | {_ratio_text(c)} | {_ratio_text(c, 'ratio_with_setup')} | "
                         f"{_fmt(c['steps_ratio'], '.2f')} | {_fmt(c['step_time_ratio'], '.2f')} | "
                         f"{_fmt(c['final'])} | {verdict} |")
    return "\n".join(lines)


def render_suite(results: list[dict], host: str) -> str:
    methods = sorted({m for r in results for m in r.get("summary", {})}, key=lambda m: (m != MAIN, m))
    lines = [f"# bench/train.py suite, host {host}", "",
             "time-to-target ratio = baseline's training time / the time the method first reaches the baseline's "
             "final quality (median over seeds, per seed in brackets; 'not reached' counts as 0); equal budget = "
             "baseline final / method final (> 1: the method ends lower, better).", ""]
    for method in methods:
        lines += [f"## {method_title(method, results)}", "",
                  "| bench | budget (s) | seeds | baseline | time-to-target ratio | in steps | step-time ratio "
                  "| baseline final | final | equal budget | never worse |",
                  "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
        medians = []
        for r in results:
            s = r.get("summary", {}).get(method)
            if not s:
                continue
            medians.append(s["ratio_median"] or 0.0)
            lines.append(f"| {r['bench']} | {r['budget']:g} | {len(r['comparisons'][method])} | {r['baseline']} | "
                         f"{s['ratio_text']} | {_fmt(s['steps_ratio_median'], '.2f')} | "
                         f"{_fmt(s['step_time_ratio_median'], '.2f')} | {_fmt(s['base_final_median'])} | "
                         f"{_fmt(s['final_median'])} | {_fmt(s['final_ratio_median'], '.2f')} | "
                         f"{'yes' if s['never_worse'] else 'no'} |")
        if medians:
            lines += ["", f"median bench: {float(np.median(medians)):.2f}x; worst bench: {min(medians):.2f}x", ""]
    return "\n".join(lines + render_positives(results))


METHOD_COLOURS = [(31, 119, 180), (44, 160, 44), (148, 103, 189), (140, 86, 75), (255, 127, 14), (214, 39, 40),
                  (227, 119, 194), (23, 190, 207)]


def method_colours(methods) -> dict:
    """A colour per method: DriftXpress at the defaults orange, the others (up to 7) each their own."""
    main_colour = (255, 127, 14)
    others = [c for c in METHOD_COLOURS if c != main_colour]
    colours = {m: others[i % len(others)] for i, m in enumerate(x for x in methods if x != MAIN)}
    colours[MAIN] = main_colour
    return colours


def plot(result: dict, path: Path) -> None:
    from dxtrain.pictures import line_plot, write_png

    bench = ALL[result["bench"]]
    series, values = [], []
    colours = method_colours(result["methods"])
    seeds = sorted(result["runs"], key=int)
    for seed in seeds:
        for method in result["methods"]:
            r = result["runs"][seed].get(method)
            if not r or not r.get("records"):
                continue
            q = [x["quality"] if x["quality"] is not None else math.nan for x in r["records"]]
            values += [v for v in q if math.isfinite(v)]
            label = method + (" (baseline)" if method == result.get("baseline") else "")
            series.append({"x": [x["time"] for x in r["records"]], "y": q, "colour": colours[method],
                           "dash": 0 if seed == seeds[0] else 8, "width": 3 if method == MAIN else 2,
                           "label": label + (f", seed {seed}" if len(seeds) > 1 else "")})
    floor = next((r["floor"].get(bench.metric) for runs in result["runs"].values() for r in runs.values()
                  if r.get("floor")), None)
    hlines = [{"y": floor, "label": "floor (held-out real data)", "colour": (160, 160, 160), "dash": 3}] if (
        floor is not None and floor > 0) else []
    logy = bool(values) and min(values) > 0
    picture = line_plot(series, hlines=hlines, logx=True, logy=logy, size=(1000, 640),
                        title=f"{bench.name}: {bench.metric_label} ({result['host_kind']}; solid: seed {seeds[0]})",
                        xlabel="training wall-clock (s, log scale; evaluation, turns and set-up not counted)",
                        ylabel=f"{bench.metric} (lower is better{', log scale' if logy else ''})")
    write_png(path, picture)


# a crossover bench: its family and the value on its axis
CROSSOVER_AXIS = re.compile(r"^(modes|classes|dim|size)(\d+)-")


def crossover_points(results: list[dict]) -> dict:
    """The crossover study's figures by family (``modes``, ``classes``, ``dim``, ``size``): per bench its axis
    value, the time-to-target ratio per seed ("not reached": 0), their median and the median equal-budget ratio."""
    out: dict[str, list[dict]] = {}
    for r in results:
        hit, s = CROSSOVER_AXIS.match(r.get("bench", "")), r.get("summary", {}).get(MAIN)
        if not hit or not s:
            continue
        out.setdefault(hit.group(1), []).append({
            "value": int(hit.group(2)), "ratios": [x or 0.0 for x in s["ratios"]],
            "median": s["ratio_median"] or 0.0, "equal_budget": s["final_ratio_median"],
            "in_steps": s["steps_ratio_median"], "step_time": s["step_time_ratio_median"],
            "baseline": r["baseline"]})
    return {k: sorted(v, key=lambda p: p["value"]) for k, v in out.items()}


def plot_crossover(results: list[dict], path: Path) -> bool:
    """One figure of the crossover study: DriftXpress's time-to-target ratio (each seed and the median) and
    its equal-budget ratio against the value on each family's axis, with the goal (3x) and parity drawn;
    False when no crossover bench is among ``results``."""
    from dxtrain.pictures import line_plot, write_png

    families = crossover_points(results)
    if not families:
        return False
    series = []
    for i, (family, pts) in enumerate(sorted(families.items())):
        colour = METHOD_COLOURS[2 * i % len(METHOD_COLOURS)]
        xs = [p["value"] for p in pts]
        series.append({"x": xs, "y": [max(p["median"], 0.05) for p in pts], "colour": colour, "width": 3,
                       "label": f"{family}: time-to-target ratio, median (not reached drawn at 0.05)"})
        seeds = max(len(p["ratios"]) for p in pts)
        for k in range(seeds):
            series.append({"x": xs, "y": [max(p["ratios"][k], 0.05) if k < len(p["ratios"]) else math.nan
                                          for p in pts],
                           "colour": colour, "width": 1, "dash": 3, "label": f"{family}: each seed" if k == 0 else None})
        others = (("equal_budget", "equal budget (baseline final / DriftXpress final)", 8),
                  ("in_steps", "the time-to-target ratio in steps (per-step gain)", 4),
                  ("step_time", "step-time ratio (baseline s/step / DriftXpress s/step)", 12))
        for j, (key, label, dash) in enumerate(others):
            series.append({"x": xs, "y": [p[key] or math.nan for p in pts], "dash": dash, "width": 2,
                           "colour": METHOD_COLOURS[(2 * i + 1 + j) % len(METHOD_COLOURS)], "label": f"{family}: {label}"})
    for s in series:
        if s["label"] is None:
            del s["label"]
    picture = line_plot(series, logx=True, logy=True, size=(1000, 640),
                        hlines=[{"y": 1.0, "label": "parity", "colour": (120, 120, 120)},
                                {"y": 3.0, "label": "goal: 3x", "colour": (214, 39, 40)}],
                        title="crossover: DriftXpress at the defaults against the tuned standard drifting",
                        xlabel="value on the family's axis (modes; classes of 4 modes each; dimension; data points; "
                               "log scale)",
                        ylabel="ratio (> 1: DriftXpress ahead; log scale)")
    write_png(path, picture)
    return True


def positives_points(result: dict, method: str = MAIN) -> list[dict]:
    """The positives-per-step axis of one bench: ``method`` against the exact field at each ``--positives``
    that was run, over the seeds where both ran (with ``--tune seed0`` the counts other than the baseline's ran
    at seed 0 only). Per count: the seeds, the medians of the equal-budget, time-to-target ("not reached": 0)
    and step-time ratios, the exact field's median final, and whether it is the baseline."""
    runs, pts = result["runs"], []
    for name in result["methods"]:
        hit = EXACT.match(name)
        comps = [compare(runs[s][name], runs[s][method]) for s in sorted(runs, key=int)
                 if hit and _usable(runs[s].get(name)) and _usable(runs[s].get(method))]
        if comps:
            pts.append({"positives": int(hit.group(1)), "seeds": len(comps),
                        "equal_budget": _median(comps, "final_ratio"), "ratio": _median(comps, "ratio", missing=0.0),
                        "step_time": _median(comps, "step_time_ratio"), "exact_final": _median(comps, "base_final"),
                        "baseline": name == result.get("baseline")})
    return sorted(pts, key=lambda p: p["positives"])


def cost_equivalent(points: list[dict]) -> str:
    """The exact field's ``--positives`` whose step costs what DriftXpress's does: where the step-time ratio
    crosses 1 between two counts (interpolated in log count), or a bound past the counts run."""
    pts = [p for p in points if p["step_time"]]
    if not pts:
        return "n/a"
    for a, b in zip(pts, pts[1:]):
        if (a["step_time"] - 1) * (b["step_time"] - 1) <= 0 and a["step_time"] != b["step_time"]:
            frac = (1 - a["step_time"]) / (b["step_time"] - a["step_time"])
            return f"{math.exp(math.log(a['positives']) + frac * math.log(b['positives'] / a['positives'])):.0f}"
    return f"> {pts[-1]['positives']}" if pts[-1]["step_time"] < 1 else f"< {pts[0]['positives']}"


def render_positives(results: list[dict]) -> list[str]:
    """The suite's positives-per-step table: per bench and ``--positives``, DriftXpress's equal-budget ratio
    and time-to-target ratio against the exact field at that count; no lines when no bench ran two counts."""
    axis = {r["bench"]: positives_points(r) for r in results}
    axis = {b: pts for b, pts in axis.items() if len(pts) > 1}
    if not axis:
        return []
    counts = sorted({p["positives"] for pts in axis.values() for p in pts})
    lines = ["## positives per step: DriftXpress against the exact field at each --positives", "",
             "Per cell: equal budget (exact final / DriftXpress final; > 1: DriftXpress ends lower), then the "
             "time-to-target ratio (nr: not reached) and the seeds; * marks the baseline. The last column: the "
             "exact field's positives whose step costs what DriftXpress's does.", "",
             "| bench |" + "".join(f" exact@{n} |" for n in counts) + " same step cost |",
             "|---|" + "---|" * len(counts) + "---:|"]
    for bench, pts in axis.items():
        by = {p["positives"]: p for p in pts}
        cells = [(f"{_fmt(p['equal_budget'], '.2f')}; {_fmt(p['ratio'] or None, '.2f', 'nr')}"
                  + ("x" if p["ratio"] else "") + f" ({p['seeds']}){' *' if p['baseline'] else ''}")
                 if (p := by.get(n)) else "" for n in counts]
        lines.append(f"| {bench} |" + "".join(f" {c} |" for c in cells) + f" {cost_equivalent(pts)} |")
    return lines + [""]


def plot_positives(results: list[dict], path: Path) -> bool:
    """One figure of the positives-per-step axis: per bench, DriftXpress's equal-budget ratio against the exact
    field at each ``--positives`` (above 1: DriftXpress ends lower); False when no bench ran two counts."""
    from dxtrain.pictures import line_plot, write_png

    series = []
    for r in results:
        pts = positives_points(r)
        if len(pts) > 1:
            series.append({"x": [p["positives"] for p in pts], "y": [p["equal_budget"] or math.nan for p in pts],
                           "colour": METHOD_COLOURS[len(series) % len(METHOD_COLOURS)],
                           "dash": 0 if len(series) < len(METHOD_COLOURS) else 6, "label": r["bench"]})
    if not series:
        return False
    picture = line_plot(series, logx=True, logy=True, size=(1000, 640),
                        hlines=[{"y": 1.0, "label": "parity", "colour": (120, 120, 120)}],
                        title="positives per step: DriftXpress at the defaults against the exact field at each count",
                        xlabel="the exact field's --positives per step (log scale)",
                        ylabel="equal budget: exact final / DriftXpress final (> 1: DriftXpress ahead; log)")
    write_png(path, picture)
    return True


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def host_kind(device: str) -> str:
    """``cpu<N>`` on the CPU; on a CUDA device the GPU's model as bench/field.py names it (``h100``, ``h200``)."""
    if device.startswith("cuda"):
        import torch

        return gpu_kind(torch.cuda.get_device_name(torch.device(device) if ":" in device else 0))
    return f"cpu{os.cpu_count()}"


def machine_info() -> dict:
    import torch

    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "dxtrain": dxtrain.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    info.update(code_revision(HERE.parent, ("dxfield", "dxtrain")))
    return info


def _positive(kind, name, strict=True):
    """An argparse type: a finite ``kind`` above 0 (at least 0 where not ``strict``)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a {kind.__name__}, got {text!r}")
        if not ((v > 0 if strict else v >= 0) and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number {'>' if strict else '>='} 0, "
                                             f"got {text!r}")
        return v
    return parse


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=key=value,key=value`` -> (NAME, {key: value}) with values parsed as JSON where they can be
    (``true``, ``512``, ``[0.05, 0.2]``), else kept as text; keys must be TrainConfig fields."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest or name == MAIN or name.startswith("exact@"):
        raise argparse.ArgumentTypeError(f"--variant expects NAME=key=value[,key=value...] with a new NAME, "
                                         f"got {text!r}")
    return name, parse_settings(rest, f"--variant {name}")


def parse_settings(text: str, what: str = "--common") -> dict:
    """``key=value,key=value`` -> {key: value}: TrainConfig fields, values parsed as JSON where they can be."""
    from dataclasses import fields

    from dxtrain.train import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    settings = {}
    for item in re.split(r",(?=[A-Za-z_]\w*=)", text):  # commas inside a value ([0.05,0.2]) stay
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise argparse.ArgumentTypeError(f"{what}: {item!r} is not key=value with a TrainConfig "
                                             f"field as key (e.g. correction=true, landmarks=512)")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Run::"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", nargs="+", choices=(*ALL, "all", "crossover", "images"), default=["all"],
                   help="benches (default all: the suite; crossover: the crossover study's benches; images: the "
                        "32x32 image bench)")
    p.add_argument("--list", action="store_true", help="list the benches and exit")
    p.add_argument("--budget", type=_positive(float, "--budget"), default=None,
                   help="seconds of training per run (default: each bench's own, 20-45 s for vectors, 60 s for images; --list)")
    p.add_argument("--seeds", type=_positive(int, "--seeds"), default=None,
                   help=f"how many training seeds (default {DEFAULT_SEEDS}; --quick 1)")
    p.add_argument("--first-seed", type=_positive(int, "--first-seed", strict=False), default=0,
                   help="the first training seed: seeds N, N+1, ... (default 0); the first one tunes the baseline")
    p.add_argument("--evals", type=_positive(int, "--evals"), default=None,
                   help=f"evaluations per run (default {DEFAULT_EVALS}; --quick {QUICK['evals']})")
    p.add_argument("--positives", type=_positive(int, "--positives"), nargs="+", default=list(POSITIVES),
                   help="the baseline's --positives tried (default %(default)s); the best is the baseline")
    p.add_argument("--tune", choices=("seed0", "all"), default="seed0",
                   help="seed0: every --positives at the first seed only, the best one at the other seeds (default); "
                        "all: every --positives at every seed, the best median")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=key=value,...",
                   help="also run DriftXpress with these TrainConfig settings (repeatable)")
    p.add_argument("--common", type=parse_settings, default={}, metavar="key=value,...",
                   help="TrainConfig settings for every run, both methods (e.g. generator=unet,gen_width=32 or an "
                        "encoder: encoder=timm:resnet10t,encoder_weights=w.safetensors)")
    p.add_argument("--no-default", action="store_true", help="leave out DriftXpress at the defaults (variants only)")
    p.add_argument("--slice", type=_positive(float, "--slice"), default=None,
                   help=f"seconds of training per turn (default budget / {SLICES})")
    p.add_argument("--device", default="cpu", help="torch device of the runs (default cpu; e.g. cuda)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budget, 1 seed; its numbers mean nothing")
    p.add_argument("--out", default=None, help="folder for the JSON, PNG and markdown results (default bench/results)")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. 'corr' -> train-suite-cpu2-corr.json)")
    p.add_argument("--in-process", action="store_true",
                   help="run every training in this process, one after another, not interleaved (tests)")
    p.add_argument("--replot", nargs="+", metavar="JSON", default=None,
                   help="recompute the analysis, tables and plots of saved bench or suite results")
    p.add_argument("--keep-runs", default=None, help="keep the dxtrain run folders under this folder")
    return p


def jobs_for(bench, seed: int, methods: dict, budget: float, args, work: Path, data: str) -> list[dict]:
    times = eval_times(budget, args.evals)
    jobs = []
    for method, settings in methods.items():
        run_dir = work / f"{bench.name}-{method.replace('@', '')}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = {"data": data, "out": str(run_dir), "steps": 10 ** 9, "time_budget": budget, "seed": seed,
                  "device": args.device, "evaluate": False, "progress": False, "log_every": 50,
                  "sample_every": 10 ** 9, "checkpoint_every": 10 ** 9, "fidelity_every": 10 ** 9,
                  **getattr(args, "common", {}), **settings}
        if args.quick and config["field"] == "projected" and "landmarks" not in settings:
            config["landmarks"] = QUICK["landmarks"]
        jobs.append({"bench": bench.name, "method": method, "seed": seed, "config": config, "eval_times": times,
                     "quick": args.quick, "slice": args.slice or budget / SLICES})
    return jobs


def run_bench(bench, args, work: Path, host: str) -> dict:
    budget = args.budget or (QUICK["budget"] if args.quick else bench.budget)
    data = write_data(bench, work / f"{bench.name}.npz")
    baselines = {f"exact@{p}": {"field": "exact", "positives": int(p)} for p in args.positives}
    own = {} if args.no_default else {MAIN: {"field": "projected"}}
    own.update({name: {"field": "projected", **s} for name, s in args.variant})
    result = {"benchmark": "bench/train.py", "bench": bench.name, "budget": budget, "host_kind": host,
              "metric": bench.metric, "quick": args.quick, "tune": args.tune, "methods": [*baselines, *own],
              "configs": {**baselines, **own}, "runs": {}, "argv": args.argv}
    print(f"# {bench.name}: {bench.about}; {budget:g} s per run, {args.seeds} seed(s)", flush=True)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        methods = dict(own)
        if seed == args.first_seed or args.tune == "all" or len(baselines) == 1:
            methods = {**baselines, **methods}
        else:
            best = choose_baseline(result["runs"], "seed0")
            if best is None:
                print(f"  no baseline finished at seed {args.first_seed}: seed {seed} skipped", flush=True)
                continue
            methods = {best: baselines[best], **methods}
        names = list(methods)
        if seed % 2:  # who goes first alternates between seeds
            names.reverse()
        jobs = jobs_for(bench, seed, {m: methods[m] for m in names}, budget, args, work, data)
        print(f"- seed {seed}: {', '.join(names)} taking turns", flush=True)
        t0 = time.perf_counter()
        out = ([run_one(j) for j in jobs] if args.in_process
               else run_interleaved(jobs, timeout=max(600.0, 4 * budget)))
        result["runs"][str(seed)] = dict(zip(names, out))
        for name, r in zip(names, out):
            if "error" in r:
                print(f"  {name}: ERROR {r['error']}", flush=True)
        print(f"  seed {seed} done in {time.perf_counter() - t0:.0f} s", flush=True)
        if not args.keep_runs:
            for j in jobs:
                shutil.rmtree(j["config"]["out"], ignore_errors=True)
    analyse(result)
    result["machine"] = machine_info()
    return result


def finish_bench(result: dict, out_dir: Path, tag: str) -> Path:
    print("\n" + render_bench(result) + "\n", flush=True)
    path = out_dir / f"train-{result['bench']}-{result['host_kind']}{tag}.json"
    result.pop("png", None)
    if any(r.get("records") for runs in result["runs"].values() for r in runs.values()):
        try:
            plot(result, path.with_suffix(".png"))
            result["png"] = path.with_suffix(".png").name
        except Exception as exc:  # the figures matter more than the picture
            print(f"plot failed: {type(exc).__name__}: {exc}", flush=True)
    write_json_atomic(path, jsonable(result))
    return path


def finish_suite(paths: list[Path], out_dir: Path, host: str, tag: str) -> None:
    results = []
    for p in paths:
        with open(p) as fh:
            results.append(json.load(fh))
    text = render_suite(results, host)
    print(text, flush=True)
    (out_dir / f"train-suite-{host}{tag}.md").write_text(text + "\n")
    for kind, draw in (("crossover", plot_crossover), ("positives", plot_positives)):
        figure = out_dir / f"train-{kind}-{host}{tag}.png"
        try:
            if draw(results, figure):
                print(f"{kind} figure: {figure}", flush=True)
        except Exception as exc:  # the figures matter more than the picture
            print(f"{kind} plot failed: {type(exc).__name__}: {exc}", flush=True)
    write_json_atomic(out_dir / f"train-suite-{host}{tag}.json",
                      {"benches": [str(Path(p).name) for p in paths], "host_kind": host,
                       "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})


def replot(paths) -> int:
    """``--replot``: recompute the analysis, tables and plots of saved results (runs are not repeated)."""
    for path in map(Path, paths):
        try:
            with open(path) as fh:
                saved = json.load(fh)
            if "benches" in saved:  # a suite file: its benches, then the suite table again
                bench_paths = [path.parent / name for name in saved["benches"]]
                for bp in bench_paths:
                    replot([bp])
                tag = path.stem[len(f"train-suite-{saved['host_kind']}"):]
                finish_suite(bench_paths, path.parent, saved["host_kind"], tag)
                continue
            if saved.get("bench") not in ALL or "runs" not in saved:
                raise ValueError("not a bench/train.py result")
        except (OSError, ValueError, KeyError) as exc:
            print(f"--replot {path}: not a bench/train.py result ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        analyse(saved)
        saved["replotted"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        tag = path.stem[len(f"train-{saved['bench']}-{saved['host_kind']}"):]
        finish_bench(saved, path.parent, tag)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.list:
        for b in ALL.values():
            print(f"{b.name:14s} {b.about} (budget {b.budget:g} s; {b.metric})")
        return 0
    if args.replot:
        return replot(args.replot)
    named = {"all": list(BENCHES), "crossover": list(CROSSOVER), "images": ["shapes-32px"]}  # -cifar: GPU
    benches = list(dict.fromkeys(b for name in args.bench for b in named.get(name, [name])))
    args.evals = args.evals or (QUICK["evals"] if args.quick else DEFAULT_EVALS)
    args.seeds = args.seeds or (1 if args.quick else DEFAULT_SEEDS)
    out_dir = Path(args.out) if args.out else HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.keep_runs) if args.keep_runs else Path(tempfile.mkdtemp(prefix="dx-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    host = host_kind(args.device)
    tag = ("-" + args.tag if args.tag else "") + ("-quick" if args.quick else "")
    paths = []
    try:
        for name in benches:
            paths.append(finish_bench(run_bench(ALL[name], args, work, host), out_dir, tag))
            finish_suite(paths, out_dir, host, tag)  # after every bench: nothing lost if stopped
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
