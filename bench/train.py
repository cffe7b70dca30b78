"""Benchmark: wall-clock to quality -- standard drifting vs DriftXpress, trained with dxtrain.

Each method trains the same generator with the same batch, optimiser, EMA,
temperatures and seed for the same budget of *training* wall-clock, through
the dxtrain API (:func:`dxtrain.train.train` with a :class:`TrainConfig`);
the only difference is the field:

* ``exact`` -- standard drifting: Algorithm 2 (bidirectional) against
  ``positives`` real samples drawn afresh every step (dxtrain's default 512;
  per class when conditional);
* ``projected`` -- DriftXpress: Nystrom summaries of the WHOLE training set,
  built once before the first step, plus exact repulsion within the batch;
  bidirectional like ``exact`` (dxtrain's default ``--normalization``), so it
  is Algorithm 2 against the whole data with the positives' column sums taken
  at the landmarks.  ``--correction`` adds dxtrain's residual correction: the
  same ``positives`` fresh real samples per step as ``exact`` draws, used as a
  control variate (``ProjectedField.field(pos_sample=...)``), which makes the
  attraction an unbiased estimate of the whole-data sums.

Both methods' normalisation (``--normalization``) and the projected field's
landmarks, selection, repulsion and correction can be set; results of
non-default settings get their own file-name suffix.

Quality is measured at about ``--evals`` points of training time (a
geometric schedule from budget/64 to the budget, and always at the end) by a
:func:`train` callback on the EMA generator, as dxtrain's own final
evaluation does.  The training clock (``StepInfo.elapsed``, the one
``time_budget`` and ``metrics.jsonl`` use) covers the steps only: evaluation,
sampling, checkpoints and the set-up before the first step (data, models, and
for ``projected`` the summaries) are not in it.  The set-up is reported
separately, and the time-to-target ratio is also given with it included.

Benchmarks
----------
``digits``
    The embedded 8x8 digits, dxtrain's defaults (class-conditional conv
    generator, the builtin frozen conv encoder's feature groups, batch 256,
    512 positives per step for ``exact``, 128 k-means landmarks per class for
    ``projected``, temperatures 0.02, 0.05, 0.2).  Quality: ``FD_digits``
    exactly as ``dxtrain eval`` computes it (Frechet distance in the features
    of the digits classifier, ``2 x n_test`` samples, classes cycled; lower is
    better); extras precision, recall.
``mixture``
    The embedded ``mixture`` (:func:`dxtrain.data.mixture_truth`): 64
    isotropic Gaussian modes in 32 dimensions with Zipf weights (heaviest
    21 %, lightest 0.33 %), about 51000 training points; unconditional (the
    mode is not given to the generator, so it has to find every mode and its
    mass itself).  MLP generator, no encoder (the field acts on the 32
    coordinates), batch 256, 512 positives per step for ``exact`` (dxtrain's
    default: the rarest mode shows up ~1.7 times per mini-batch), 512 k-means
    landmarks for ``projected`` (dxtrain's default is 128 per class; the one
    tuning given to the projected method, since one unlabelled shard must
    cover 64 modes), the same temperatures for both.  Quality:
    ``truth_energy_distance`` of 4000 generated samples against 8000 fresh
    samples of the known mixture (:func:`dxtrain.evaluate.mixture_quality`;
    lower is better, ~0 for the truth); extras ``mode_tv`` (total variation
    between the generated and true mode masses, nearest-mode assignment),
    ``modes_covered`` (of 64, at least half the true mass),
    ``in_mode_fraction`` (inside the 99 % radius of a mode; 0.99 for the
    truth), ``rare_mode_mass_ratio`` (mass on the lightest 16 modes over its
    true value).

What is reported
----------------
* the curves (quality vs training seconds) as a PNG per benchmark and in the
  JSON;
* time to target: target = the ``exact`` run's final quality (same seed);
  the time at which ``projected`` first reaches it, linearly interpolated
  between the two evaluations that bracket the crossing (or "<= t" when it is
  already there at its first evaluation, making the ratio a lower bound; "not
  reached" when it never is); ratio = the exact run's total training time /
  that time; also with each method's set-up time added to both sides, and
  in optimiser steps ("in steps": exact steps / projected steps to the
  target) next to the step-time ratio (exact s/step / projected s/step), so
  how much of a ratio comes from better steps and how much from cheaper
  ones (or from a machine slowed by other jobs during one run) is visible;
  over seeds, the lower median ("not reached" counts as 0);
* final quality at equal budget, and the extras at the end;
* ``cpu_util``: process CPU seconds per wall second during training
  segments, and the load average before and after each run: a machine shared
  with other jobs shows up there (runs of the two methods alternate order
  between repeats so a slow spell does not always hit the same one).

Every run is a fresh spawned process (no thread pool or allocator state
carries over between methods; ``--in-process`` for tests and debugging).  Output: a markdown table on stdout, JSON at
``bench/results/train-<bench>-<host-kind>.json`` and the plot at
``bench/results/train-<bench>-<host-kind>.png`` (``-quick`` for smoke runs),
written atomically.  Benchmarks print and save figures; they never assert.

Measured results and what they mean: ``bench/README.md``.

Run::

    python bench/train.py                          # both benches, 2 seeds, digits 180 s, mixture 240 s (~30 min)
    python bench/train.py --bench mixture --budget 240 --repeats 2
    python bench/train.py --bench digits --budget 180 --repeats 1
    python bench/train.py --bench mixture --temperatures 0.2    # both methods at one temperature
    python bench/train.py --bench mixture --correction          # projected with the residual correction
    python bench/train.py --bench mixture --normalization row   # both methods row-normalised
    python bench/train.py --quick                  # smoke run, ~20 s (its numbers mean nothing)
    python bench/train.py --replot bench/results/train-mixture-cpu2.json   # re-analyse saved runs
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
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import dxtrain  # noqa: E402,F401  (before torch and NumPy: sleep-waiting thread pools, see dxtrain/__init__.py)
import numpy as np  # noqa: E402

from _measure import call_in_worker, write_json_atomic  # noqa: E402
from dxfield import NORMALIZATIONS  # noqa: E402
from dxfield.landmarks import METHODS as LANDMARK_METHODS  # noqa: E402
from dxfield.projected import REPULSIONS  # noqa: E402

METHODS = ("exact", "projected")
METHOD_LABELS = {"exact": "exact (standard drifting)", "projected": "projected (DriftXpress)"}
METHOD_COLOURS = {"exact": (31, 119, 180), "projected": (255, 127, 14)}

# Settings shared by both methods of a benchmark (the rest are dxtrain's TrainConfig defaults);
# "projected" adds `landmarks`.  The field is the only other difference.
BENCHES = {
    "digits": {
        "data": "digits",
        "metric": "FD_digits",
        "metric_label": "FD_digits",
        "extras": ("precision", "recall"),
        "budget": 180.0,
        "config": {},
        "landmarks": None,  # dxtrain's default (128 per class)
    },
    "mixture": {
        "data": "mixture",
        "metric": "truth_energy_distance",
        "metric_label": "energy distance to the truth",
        "extras": ("mode_tv", "modes_covered", "in_mode_fraction", "rare_mode_mass_ratio"),
        "budget": 240.0,
        "config": {},
        "landmarks": 512,
    },
}
DEFAULT_EVALS = 16
MIXTURE_EVAL_SAMPLES = 4000
MIXTURE_TRUTH_SAMPLES = 8000
QUICK = {"budget": 2.0, "evals": 3, "landmarks": 32}  # --quick: a smoke run; its numbers mean nothing


# --------------------------------------------------------------------------------------
# one run (in its own process)
# --------------------------------------------------------------------------------------
def eval_times(budget: float, n: int) -> list[float]:
    """Training times (s) at which to evaluate: ``n - 1`` geometric points from budget/64 to the budget
    (the final evaluation always happens too, at the step that ends the run)."""
    if n < 2:
        return [float(budget)]
    return [float(t) for t in np.geomspace(budget / 64.0, budget, n - 1)]


def _score(bench: str, info, seed: int, quick: bool) -> tuple[dict, dict]:
    """The benchmark's scores of the EMA generator now, and the floor (a perfect generator's scores)."""
    from dxtrain.train import classifier_cache, generate

    spec = BENCHES[bench]
    if bench == "digits":
        from dxtrain.evaluate import evaluate_samples

        # exactly dxtrain's final evaluation (train.py, `dxtrain eval`): 2 x n_test samples, seed + 7
        x = generate(info.ema_model, 2 * len(info.test_ds), info.num_classes, info.device, seed=seed + 7)
        report = evaluate_samples(x, info.train_ds, info.test_ds, classifier_cache=classifier_cache(), seed=seed)
        keys = (spec["metric"],) + spec["extras"]
        return ({k: report.get(k) for k in keys}, {k: report["floor"].get(k) for k in keys})
    from dxtrain.evaluate import mixture_quality

    n = 1000 if quick else MIXTURE_EVAL_SAMPLES
    x = generate(info.ema_model, n, info.num_classes, info.device, seed=seed + 7)
    # the reference (truth samples) is the same for every run and seed: seed 0
    q = mixture_quality(x, info.train_ds.truth, n_truth=2000 if quick else MIXTURE_TRUTH_SAMPLES, seed=0)
    keys = (spec["metric"],) + spec["extras"]
    return {k: q[k] for k in keys}, {k: q["floor"][k] for k in keys}


class _Evaluator:
    """The :func:`dxtrain.train.train` callback: evaluates at the scheduled training times and at the end."""

    def __init__(self, bench: str, times, seed: int, quick: bool, tag: str):
        self.bench, self.times, self.seed, self.quick, self.tag = bench, list(times), seed, quick, tag
        self.next = 0
        self.records: list[dict] = []
        self.floor: dict = {}
        self.eval_s = 0.0
        self._cpu = self._wall = None  # CPU and wall marks of the current training segment

    def __call__(self, info) -> None:
        due = self.next < len(self.times) and info.elapsed >= self.times[self.next]
        if self._cpu is None:  # segments start after the first step, so the set-up is not in them
            self._cpu, self._wall = time.process_time(), time.perf_counter()
            if not (due or info.final):
                return
        if not (due or info.final):
            return
        while self.next < len(self.times) and info.elapsed >= self.times[self.next]:
            self.next += 1
        cpu, wall = time.process_time() - self._cpu, time.perf_counter() - self._wall
        t0 = time.perf_counter()
        scores, floor = _score(self.bench, info, self.seed, self.quick)
        eval_s = time.perf_counter() - t0
        self.eval_s += eval_s
        self.floor = floor
        metric = BENCHES[self.bench]["metric"]
        util = cpu / wall if wall > 1e-3 else None
        self.records.append({"step": info.step, "time": info.elapsed, "quality": scores[metric], "scores": scores,
                             "eval_s": eval_s, "cpu_util": util})
        print(f"  [{self.tag}] t={info.elapsed:7.1f}s step {info.step:6d}  {metric} {_fmt(scores[metric], '.5g')}"
              f"  (eval {eval_s:.1f}s, cpu/wall {_fmt(util, '.2f')})", flush=True)
        self._cpu, self._wall = time.process_time(), time.perf_counter()


def run_one(job: dict) -> dict:
    """Train one (bench, method, seed) with the evaluation callback; JSON-ready results or ``{"error"}``."""
    try:
        import torch

        from dxtrain.train import TrainConfig, train

        tag = f"{job['bench']}/{job['method']} seed {job['seed']}"
        cfg = TrainConfig(**job["config"])
        ev = _Evaluator(job["bench"], job["eval_times"], job["seed"], job["quick"], tag)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        result = train(cfg, callback=ev, log=lambda msg: print(f"  [{tag}] {msg}", flush=True))
        total = time.perf_counter() - t0
        return {"records": ev.records, "floor": ev.floor, "setup_s": result["setup_s"], "steps": result["step"],
                "train_s": result["wall"], "steps_per_s": result["step"] / max(result["wall"], 1e-9),
                "eval_s": ev.eval_s, "process_wall_s": total, "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(), "torch_threads": torch.get_num_threads(),
                "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")
                              if cfg.device == "auto" else cfg.device)}
    except Exception as exc:  # a benchmark reports, it does not raise
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_isolated(job: dict, timeout: float) -> dict:
    """:func:`run_one` in a fresh spawned process."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            return ex.submit(call_in_worker, run_one, job).result(timeout=timeout)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


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


def compare(exact: dict, projected: dict) -> dict:
    """Time-to-target and equal-budget figures of one seed's pair of runs."""
    ex, pr = exact["records"], projected["records"]
    target = ex[-1]["quality"] if ex and ex[-1]["quality"] is not None else math.nan
    t_exact = exact["train_s"]
    hit = time_to_target([r["time"] for r in pr], [r["quality"] for r in pr], target)
    out = {"target": target, "exact_train_s": t_exact, "projected_time_to_target": hit["time"],
           "bound": hit["bound"], "between": hit["between"], "ratio": None, "ratio_with_setup": None,
           "exact_final": target, "projected_final": pr[-1]["quality"] if pr else None,
           "exact_setup_s": exact["setup_s"], "projected_setup_s": projected["setup_s"]}
    if hit["time"] is not None and hit["time"] > 0:
        out["ratio"] = t_exact / hit["time"]
        out["ratio_with_setup"] = (t_exact + exact["setup_s"]) / (hit["time"] + projected["setup_s"])
    # the same in steps: how much better each projected step is, whatever the machine's speed at the time
    hit_steps = time_to_target([r["step"] for r in pr], [r["quality"] for r in pr], target)
    out["projected_steps_to_target"] = hit_steps["time"]
    out["exact_steps"] = exact["steps"]
    out["steps_ratio"] = (exact["steps"] / hit_steps["time"]) if hit_steps["time"] else None
    out["step_time_ratio"] = ((t_exact / exact["steps"]) / (projected["train_s"] / projected["steps"])
                              if exact["steps"] and projected["steps"] else None)
    out["projected_final_lower"] = out["final_ratio"] = None
    if out["projected_final"] is not None and math.isfinite(target):
        out["projected_final_lower"] = out["projected_final"] < target
        if out["projected_final"] > 0 and target > 0:  # ratios of scores at (or below) 0 mean nothing
            out["final_ratio"] = target / out["projected_final"]
    return out


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
    prefix = ">= " if c["bound"] == "at_first_eval" else ""
    return prefix + _fmt(c[key], ".2f") + "x"


def _steps_text(c: dict) -> str:
    if c.get("steps_ratio") is None:
        return "not reached" if c["bound"] == "not_reached" else "n/a"
    return (">= " if c["bound"] == "at_first_eval" else "") + f"{c['steps_ratio']:.2f}x"


def summarize(comparisons: dict) -> dict:
    """Across seeds: the LOWER median of the time-to-target ratios ("not reached" counts as 0, so with
    two seeds this is the worse one) and the median final qualities."""
    comps = [comparisons[k] for k in sorted(comparisons, key=int)]
    if not comps:
        return {}
    ratios = sorted(c["ratio"] if c["ratio"] is not None else 0.0 for c in comps)
    low = ratios[(len(ratios) - 1) // 2]
    finals = [c["exact_final"] for c in comps], [c["projected_final"] for c in comps]
    med = [float(np.median([v for v in f if v is not None and math.isfinite(v)])) if any(
        v is not None and math.isfinite(v) for v in f) else None for f in finals]
    return {"ratio_lower_median": low if low > 0 else None,
            "ratio_text": ("not reached" if low == 0 else f"{low:.2f}x")
            + f" (per seed: {', '.join(_ratio_text(c) for c in comps)})",
            "exact_final_median": med[0], "projected_final_median": med[1]}


def render(bench: str, result: dict) -> str:
    spec = BENCHES[bench]
    m = spec["metric"]
    lines = [f"## {bench}: {spec['metric_label']} ({m}, lower is better) vs training wall-clock, "
             f"budget {result['budget']:g} s per method, host {result['host_kind']}", ""]
    lines += ["| seed | method | steps | steps/s | set-up (s) | final " + m + " | floor | "
              + " | ".join(spec["extras"]) + " | cpu/wall |",
              "|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(spec["extras"]) + "---:|"]
    for seed, runs in sorted(result["runs"].items(), key=lambda kv: int(kv[0])):
        for method in METHODS:
            r = runs.get(method)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {seed} | {method} | error: {r['error']} |")
                continue
            last = r["records"][-1] if r["records"] else {"quality": None, "scores": {}}
            utils = [x["cpu_util"] for x in r["records"] if x.get("cpu_util")]
            lines.append(f"| {seed} | {method} | {r['steps']} | {r['steps_per_s']:.2f} | {r['setup_s']:.1f} | "
                         f"{_fmt(last['quality'])} | {_fmt(r['floor'].get(m))} | "
                         + " | ".join(_fmt(last["scores"].get(k)) for k in spec["extras"])
                         + f" | {_fmt(float(np.median(utils)) if utils else None, '.2f')} |")
    lines += ["", "| seed | target = exact final | projected reaches it at (s) | exact total (s) "
              "| time-to-target ratio | with set-up | in steps | step-time ratio | projected final | equal budget |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for seed, c in sorted(result["comparisons"].items(), key=lambda kv: int(kv[0])):
        when = {"not_reached": "not reached", "at_first_eval": f"<= {_fmt(c['projected_time_to_target'], '.1f')}"}
        verdict = "n/a"
        if c["projected_final_lower"] is not None:
            ratio = c["final_ratio"] if c["projected_final_lower"] else (
                1 / c["final_ratio"] if c["final_ratio"] else None)
            verdict = ("projected" if c["projected_final_lower"] else "exact") + " better" + (
                f" ({ratio:.2f}x lower)" if ratio else "")
        lines.append(f"| {seed} | {_fmt(c['target'])} | "
                     f"{when.get(c['bound'], _fmt(c['projected_time_to_target'], '.1f'))} | "
                     f"{c['exact_train_s']:.1f} | {_ratio_text(c)} | {_ratio_text(c, 'ratio_with_setup')} | "
                     f"{_steps_text(c)} | {_fmt(c.get('step_time_ratio'), '.2f')} | "
                     f"{_fmt(c['projected_final'])} | {verdict} |")
    lines += ["", "time-to-target ratio = exact total training time / time projected first reaches the exact "
                  "final quality (interpolated between evaluations); 'with set-up' adds each run's set-up "
                  "(data, models, summaries) to both; 'in steps' = exact steps / projected steps to the target; "
                  "step-time ratio = exact s/step / projected s/step (> 1: projected steps are faster)."]
    s = result.get("summary", {})
    if s:
        lines += ["", f"over seeds: time-to-target ratio {s['ratio_text']} (lower median); median final {m}: "
                      f"exact {_fmt(s['exact_final_median'])}, projected {_fmt(s['projected_final_median'])}"]
    lines += ["", "curves (training seconds: quality), seed " + str(min(int(k) for k in result["runs"])) + ":"]
    first = result["runs"][min(result["runs"], key=int)]
    for method in METHODS:
        r = first.get(method)
        if r and "records" in r:
            lines.append(f"- {method}: " + ", ".join(f"{x['time']:.1f}: {_fmt(x['quality'], '.4g')}"
                                                     for x in r["records"]))
    return "\n".join(lines)


def plot(bench: str, result: dict, path: Path) -> None:
    from dxtrain.pictures import line_plot, write_png

    spec = BENCHES[bench]
    series, values = [], []
    for seed, runs in sorted(result["runs"].items(), key=lambda kv: int(kv[0])):
        for method in METHODS:
            r = runs.get(method)
            if not r or "records" not in r:
                continue
            t = [x["time"] for x in r["records"]]
            q = [x["quality"] if x["quality"] is not None else math.nan for x in r["records"]]
            values += [v for v in q if math.isfinite(v)]
            series.append({"x": t, "y": q, "colour": METHOD_COLOURS[method], "dash": 0 if seed == "0" else 8,
                           "label": method_label(result, method) + (f" seed {seed}" if len(result["runs"]) > 1 else "")})
    hlines = []
    comps = result["comparisons"]
    for seed in sorted(comps, key=int):
        if comps[seed]["target"] is not None:
            hlines.append({"y": comps[seed]["target"], "colour": (90, 90, 90), "dash": 8 if seed == "0" else 3,
                           "label": "target = exact final" + (f" seed {seed}" if len(comps) > 1 else "")})
    floor = next((r["floor"].get(spec["metric"]) for runs in result["runs"].values() for r in runs.values()
                  if r.get("floor")), None)
    if floor is not None:
        hlines.append({"y": floor, "label": "floor (real vs real)", "colour": (160, 160, 160), "dash": 3})
    logy = bool(values) and min(values) > 0
    picture = line_plot(series, hlines=hlines, logx=True, logy=logy,
                        title=f"{bench}: {spec['metric_label']} vs training time ({result['host_kind']})",
                        xlabel="training wall-clock (s, log scale; evaluation and set-up not counted)",
                        ylabel=f"{spec['metric']} (lower is better{', log scale' if logy else ''})")
    write_png(path, picture)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def host_kind(device: str) -> str:
    """``cpu<N>`` on the CPU; on a CUDA device the GPU's model as bench/field.py names it (``h100``, ``h200``)."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device) if ":" in device else 0)
        toks = re.findall(r"[a-z]*\d+[a-z0-9]*", name.lower().replace("nvidia", ""))
        return toks[0] if toks else "gpu"
    return f"cpu{os.cpu_count()}"


def machine_info() -> dict:
    import torch

    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "dxtrain": dxtrain.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        root = HERE.parent
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
        info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--", "dxfield", "dxtrain"], cwd=root,
                                            capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:
        pass
    return info


def _positive(kind, name):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a {kind.__name__}, got {text!r}")
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text!r}")
        return v
    return parse


def method_label(result: dict, method: str) -> str:
    """The legend label of a method, with its non-default field settings (from the saved configs)."""
    cfg = result.get("configs", {}).get(method, {})
    extra = [f"m={cfg['landmarks']}"] if method == "projected" and cfg.get("landmarks") else []
    if cfg.get("correction"):
        extra.append("corrected")
    if cfg.get("repulsion", "exact") != "exact":
        extra.append(f"{cfg['repulsion']} repulsion")
    if cfg.get("normalization", "bidirectional") != "bidirectional":
        extra.append(cfg["normalization"])
    label = METHOD_LABELS[method]
    return label[:-1] + ", " + ", ".join(extra) + ")" if extra else label


def variant_suffix(args) -> str:
    """File-name suffix of a run with non-default settings, so it never overwrites the default results:
    ``-tau0.2``, ``-m2048``, ``-uniform``, ``-row``, ``-nystrom``, ``-p4096``, ``-b1024``, ``-quick``
    (a budget other than the bench's default adds ``-<seconds>s`` before them)."""
    parts = []
    if args.temperatures:
        parts.append("tau" + "_".join(f"{t:g}" for t in args.temperatures))
    if args.landmarks:
        parts.append(f"m{args.landmarks}")
    for value in (args.landmark_method, args.normalization, args.repulsion):
        if value:
            parts.append(value)
    if args.correction:
        parts.append("corrected")
    if args.positives:
        parts.append(f"p{args.positives}")
    if args.batch:
        parts.append(f"b{args.batch}")
    if args.quick:
        parts.append("quick")
    return "".join("-" + p for p in parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__[__doc__.index("Benchmarks\n"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", choices=(*BENCHES, "all"), default="all", help="which benchmark (default: all)")
    p.add_argument("--budget", type=_positive(float, "--budget"), default=None,
                   help="seconds of training per method and seed (default: digits "
                        f"{BENCHES['digits']['budget']:g}, mixture {BENCHES['mixture']['budget']:g}; --quick: "
                        f"{QUICK['budget']:g})")
    p.add_argument("--repeats", type=_positive(int, "--repeats"), default=None,
                   help="seeds per method (0, 1, ...); the two methods alternate order between seeds "
                        "(default 2; --quick: 1)")
    p.add_argument("--evals", type=_positive(int, "--evals"), default=None,
                   help=f"evaluations per run: geometric in training time from budget/64, plus the end (default "
                        f"{DEFAULT_EVALS}; --quick: {QUICK['evals']})")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to run (the comparison needs both)")
    p.add_argument("--landmarks", type=_positive(int, "--landmarks"), default=None,
                   help="landmarks of the projected field (default: digits 128 per class, mixture 512)")
    p.add_argument("--landmark-method", choices=LANDMARK_METHODS, default=None,
                   help="landmark selection of the projected field (default: dxtrain's, kmeans)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default=None,
                   help="normalisation of both fields (default: dxtrain's, bidirectional)")
    p.add_argument("--repulsion", choices=REPULSIONS, default=None,
                   help="repulsion of the projected field (default: dxtrain's, exact)")
    p.add_argument("--correction", action="store_true",
                   help="projected: correct the Nystrom sums with the step's real mini-batch (dxtrain --correction)")
    p.add_argument("--positives", type=_positive(int, "--positives"), default=None,
                   help="real samples per step of the exact field (default: dxtrain's, 512)")
    p.add_argument("--batch", type=_positive(int, "--batch"), default=None,
                   help="generated samples per step, both methods (default: dxtrain's, 256)")
    p.add_argument("--temperatures", type=_positive(float, "--temperatures"), nargs="+", default=None,
                   help="kernel temperatures of BOTH methods (default: dxtrain's 0.02 0.05 0.2); results of "
                        "non-default settings get a suffix ('-tau0.2', '-m2048', '-nystrom', ...)")
    p.add_argument("--device", default="cpu", help="torch device of the runs (default cpu; e.g. cuda)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['budget']:g} s per method, {QUICK['evals']} evaluations, small "
                        "evaluation samples; for tests, its numbers mean nothing")
    p.add_argument("--out", default=None,
                   help="folder for the JSON and PNG results (default bench/results)")
    p.add_argument("--in-process", action="store_true",
                   help="run every training in this process instead of a fresh spawned one (tests and debugging; "
                        "thread pools and allocator state then carry over between methods)")
    p.add_argument("--replot", nargs="+", metavar="JSON", default=None,
                   help="recompute the comparisons, table and plot of saved result files (rewritten in place) "
                        "instead of running anything")
    p.add_argument("--keep-runs", default=None,
                   help="keep the dxtrain run folders under this folder (default: a temporary folder, removed)")
    return p


def finish(bench: str, result: dict, json_path: Path) -> None:
    """Print the report, draw the plot next to the JSON and write the JSON (atomically)."""
    print()
    print(render(bench, result), flush=True)
    png_path = json_path.with_suffix(".png")
    result.pop("png", None)
    if any("records" in r for runs in result["runs"].values() for r in runs.values()):
        try:
            plot(bench, result, png_path)
            result["png"] = png_path.name
        except Exception as exc:  # the figures matter more than the picture
            print(f"plot failed: {type(exc).__name__}: {exc}", flush=True)
    write_json_atomic(json_path, jsonable(result))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if "png" in result else ""), flush=True)


def replot(paths) -> int:
    """``--replot``: recompute the comparisons, table and plot of saved results (the runs are not repeated)."""
    for path in paths:
        path = Path(path)
        try:
            with open(path) as fh:
                result = json.load(fh)
            bench = result["bench"]
            if bench not in BENCHES:
                raise ValueError(f"unknown bench {bench!r}")
            runs = result["runs"]
        except (OSError, ValueError, KeyError) as exc:
            print(f"--replot {path}: not a bench/train.py result ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        result["comparisons"] = {seed: compare(r["exact"], r["projected"]) for seed, r in runs.items()
                                 if all(m in r and "error" not in r[m] for m in METHODS)}
        result["summary"] = summarize(result["comparisons"])
        result["replotted"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        finish(bench, result, path)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        return replot(args.replot)
    if set(args.methods) != set(METHODS):
        print("note: only " + ", ".join(args.methods) + " selected: no time-to-target comparison", flush=True)
    benches = list(BENCHES) if args.bench == "all" else [args.bench]
    evals = args.evals or (QUICK["evals"] if args.quick else DEFAULT_EVALS)
    args.repeats = args.repeats or (1 if args.quick else 2)
    out_dir = Path(args.out) if args.out else HERE / "results"
    work = Path(args.keep_runs) if args.keep_runs else Path(tempfile.mkdtemp(prefix="dx-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    hk = host_kind(args.device)
    suffix = variant_suffix(args)
    try:
        for bench in benches:
            spec = BENCHES[bench]
            budget = args.budget or (QUICK["budget"] if args.quick else spec["budget"])
            times = eval_times(budget, evals)
            result = {"benchmark": "bench/train.py", "bench": bench, "argv": sys.argv[1:] if argv is None else argv,
                      "budget": budget, "eval_times": times, "host_kind": hk, "metric": spec["metric"],
                      "quick": args.quick, "runs": {}, "comparisons": {}, "configs": {}}
            print(f"# {bench}: {len(args.methods)} method(s) x {args.repeats} seed(s), {budget:g} s of training each, "
                  f"{evals} evaluations per run", flush=True)
            for seed in range(args.repeats):
                order = list(args.methods) if seed % 2 == 0 else list(reversed(args.methods))
                runs = result["runs"].setdefault(str(seed), {})
                for method in order:
                    run_dir = work / f"{bench}-{method}-seed{seed}"
                    if run_dir.exists():
                        shutil.rmtree(run_dir)
                    config = {"data": spec["data"], "out": str(run_dir), "field": method, "steps": 10 ** 9,
                              "time_budget": budget, "seed": seed, "device": args.device, "evaluate": False,
                              "progress": False, "log_every": 50, "sample_every": 10 ** 9,
                              "checkpoint_every": 10 ** 9, "fidelity_every": 10 ** 9, **spec["config"]}
                    if args.batch:
                        config["batch"] = args.batch
                    if args.positives:
                        config["positives"] = args.positives
                    if args.temperatures:
                        config["temperatures"] = tuple(args.temperatures)
                    landmarks = args.landmarks or spec["landmarks"]
                    if args.quick and not args.landmarks:
                        landmarks = min(landmarks or QUICK["landmarks"], QUICK["landmarks"])
                    if landmarks and method == "projected":
                        config["landmarks"] = landmarks
                    if args.landmark_method and method == "projected":
                        config["landmark_method"] = args.landmark_method
                    if args.normalization:
                        config["normalization"] = args.normalization
                    if args.repulsion and method == "projected":
                        config["repulsion"] = args.repulsion
                    if args.correction and method == "projected":
                        config["correction"] = True
                    result["configs"][method] = {k: v for k, v in config.items() if k not in ("out", "seed")}
                    print(f"- {bench}/{method} seed {seed}: training for {budget:g} s ...", flush=True)
                    job = {"bench": bench, "method": method, "seed": seed, "config": config, "eval_times": times,
                           "quick": args.quick}
                    t0 = time.perf_counter()
                    r = run_one(job) if args.in_process else run_isolated(job, timeout=3 * budget + 900)
                    runs[method] = r
                    print(f"  done in {time.perf_counter() - t0:.0f} s" + (f": ERROR {r['error']}" if "error" in r
                                                                          else ""), flush=True)
                    if not args.keep_runs:
                        shutil.rmtree(run_dir, ignore_errors=True)
                if all(m in runs and "error" not in runs[m] for m in METHODS):
                    result["comparisons"][str(seed)] = compare(runs["exact"], runs["projected"])
            result["summary"] = summarize(result["comparisons"])
            result["machine"] = machine_info()
            budget_tag = f"-{budget:g}s" if args.budget and not args.quick and budget != spec["budget"] else ""
            finish(bench, result, out_dir / f"train-{bench}-{hk}{budget_tag}{suffix}.json")
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
