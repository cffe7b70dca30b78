"""Benchmark: dxfield's exact drifting field against the peers' full-matrix Algorithm 2.

What is compared
----------------
* ``dxfield`` -- ``dxfield.drift_field(x, pos)`` with its defaults: bidirectional
  normalisation (Algorithm 2 of the drifting paper), temperatures
  (0.02, 0.05, 0.2), ``feature_scale="auto"``, ``drift_norm=True``, negatives =
  the queries with self pairs masked.  NumPy float32 inputs; tiled, memory
  bounded by ``memory_budget`` (default 64 MiB).  ``dxfield@16MiB`` is the same
  call with ``memory_budget="16MiB"`` to show the memory/time trade-off: at the
  default shape its tiles can no longer span all 1024 queries, so each target
  tile is swept twice (column sums, then row sums).  A budget below what
  dxfield's per-query accumulators need makes it raise ValueError; such a row
  is reported as an error, not raised.
* ``peer`` -- :func:`peer_field` below: the same field written in torch the way
  the public reimplementations of the drifting paper write it: one
  ``torch.cdist`` over the concatenated targets ``[pos, x]``, the self pairs
  pushed away by +1e6, then per temperature a row softmax and a column softmax
  of the full G x (P + G) logits, ``A = sqrt(row * col)``, the W+/W- weighting and
  two matmuls.  float32, ``torch.no_grad()``.

What is measured
----------------
1. Agreement (first, before any timing): max |V_method - V_peer| / max |V_peer|
   over all entries, and the same against the peer run in float64 (the closest
   thing to ground truth at this size; ``--no-f64`` skips it).
2. Each method gets its own spawned worker process (``bench/_measure.py``):
   separate processes because torch's OpenMP pool and NumPy's OpenBLAS pool
   spin-wait after each call, and on 2 cores a call of one library right after
   the other's runs 2-3x slower.
3. Peak extra memory: the worker imports, builds the inputs, runs the method
   once on a tiny problem (thread pools, lazily loaded code), frees it,
   ``gc.collect()`` + ``malloc_trim(0)``, resets the resident high-water mark
   (``5`` > ``/proc/self/clear_refs``, Linux >= 4.0; checked), runs the real call
   once and reads ``VmHWM``: extra = VmHWM - VmRSS before the call.  Fallback
   where ``clear_refs`` is not writable: VmRSS sampled every 1 ms.  The extra
   includes the output V (G x D).  For NumPy methods the worker also reports
   the ``tracemalloc`` peak of one more call as a cross-check (NumPy reports
   its buffers to tracemalloc; torch does not).
4. Time: that first call is the warm-up; then ``--repeats`` rounds, each timing
   one call per method (``time.perf_counter`` inside the worker), the order
   rotated every round and ``--pause`` s idle before each call, so a slow spell
   of the machine hits all methods alike.  Best and median are reported (CPU
   time per call goes to the JSON).  Effective GFLOP/s uses one flop count for
   every method, ``2*G*(G+P)*D`` (distances) ``+ n_temps * 2*G*(G+P)*D``
   (weighted sums); work a method does beyond that (dxfield's extra distance
   sweep for the mean distance, for instance) is not credited.
5. Reference rates: NumPy and torch sgemm at (G x D) @ (D x P) on this machine,
   each in its own process.

Output: a markdown table on stdout, and the same data as JSON in
``bench/results/field-<host-kind>.json`` (written atomically).  Benchmarks print
and save figures; they never assert.

Run::

    python bench/field.py                    # G=1024, P=16384, D=512 (~1-2 min on 2 cores)
    python bench/field.py --quick            # tiny smoke run (seconds; its times are
                                             # thread wake-up latency, not throughput)
    python bench/field.py -G 512 -P 8192 -D 256 --repeats 3
    python bench/field.py --methods peer dxfield dxfield@32MiB --memory-budget 48MiB
    python bench/field.py --profile          # also cProfile one dxfield call
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import MiB, Worker, run_isolated, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
TEMPERATURES = (0.02, 0.05, 0.2)
DEFAULT_METHODS = ("peer", "dxfield", "dxfield@16MiB")


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
def make_data(G: int, P: int, D: int, seed: int = 0, n_modes: int = 16):
    """Queries Gaussian; positives from a Gaussian mixture.  float32, no float64 temporaries."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_modes, D), dtype=np.float32)
    labels = rng.integers(n_modes, size=P)
    pos = rng.standard_normal((P, D), dtype=np.float32)
    pos *= 0.5
    pos += centers[labels]
    x = rng.standard_normal((G, D), dtype=np.float32)
    x *= 1.2
    return x, pos


# --------------------------------------------------------------------------------------
# the peer: full-matrix Algorithm 2 in torch, as the public reimplementations write it
# --------------------------------------------------------------------------------------
def peer_field(x, pos, temperatures=TEMPERATURES):
    """Bidirectional drifting field with full G x (P + G) matrices (torch).

    Mirrors dxfield.drift_field(x, pos) defaults: feature_scale="auto",
    drift_norm=True, negatives = queries with self pairs masked.
    """
    import torch

    with torch.no_grad():
        G, D = x.shape
        P = pos.shape[0]
        targets = torch.cat([pos, x], dim=0)                      # (P + G, D)
        dist = torch.cdist(x, targets)                             # (G, P + G)
        self_d = dist[:, P:].diagonal()                            # view: self pairs
        mean_d = (dist.sum() - self_d.sum()) / (G * (P + G) - G)   # mean over non-self pairs
        self_d.add_(1e6)                                           # mask self pairs
        S = mean_d / math.sqrt(D)                                  # feature scale
        dist = dist / S
        pos_s, x_s = pos / S, x / S
        total = torch.zeros_like(x)
        for tau in temperatures:
            logits = -dist / (tau * math.sqrt(D))
            A = torch.sqrt(torch.softmax(logits, dim=1) * torch.softmax(logits, dim=0))
            A_pos, A_neg = A[:, :P], A[:, P:]
            W_pos = A_pos * A_neg.sum(1, keepdim=True)
            W_neg = A_neg * A_pos.sum(1, keepdim=True)
            V = W_pos @ pos_s - W_neg @ x_s
            V = V / torch.sqrt((V * V).sum(1).mean() / D)          # drift normalisation
            total += V
        return total


# --------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------
def parse_method(name: str, default_budget):
    """``peer``, ``peer-f64``, ``dxfield`` or ``dxfield@<budget>`` -> (kind, budget)."""
    if name in ("peer", "peer-f64"):
        return name, None
    if name == "dxfield":
        return "dxfield", default_budget
    if name.startswith("dxfield@"):
        return "dxfield", name.split("@", 1)[1]
    raise SystemExit(f"unknown method {name!r}: use peer, peer-f64, dxfield or dxfield@<budget> (e.g. dxfield@16MiB)")


def method_label(name: str, default_budget) -> str:
    kind, budget = parse_method(name, default_budget)
    if kind == "peer":
        return "peer (torch, full matrices)"
    if kind == "peer-f64":
        return "peer (torch, float64)"
    return f"dxfield ({budget or 'default 64MiB'} budget)"


def prepare(name: str, x, pos, default_budget):
    """Return a zero-argument callable that runs the method and returns its V (native type)."""
    kind, budget = parse_method(name, default_budget)
    if kind.startswith("peer"):
        import torch

        xt, pt = torch.from_numpy(x), torch.from_numpy(pos)
        if kind == "peer-f64":
            xt, pt = xt.double(), pt.double()
        return lambda: peer_field(xt, pt)
    import dxfield

    return lambda: dxfield.drift_field(x, pos, memory_budget=budget)


def to_numpy(v):
    return v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else np.asarray(v)


def is_numpy_method(name: str) -> bool:
    return name.startswith("dxfield")


# --------------------------------------------------------------------------------------
# work done in isolated processes (module level, so spawn can find it)
# --------------------------------------------------------------------------------------
def make_method(name: str, G: int, P: int, D: int, seed: int, default_budget):
    """Build the inputs and return the zero-argument call of ``name`` (a Worker's setup)."""
    x, pos = make_data(G, P, D, seed=seed)
    return prepare(name, x, pos, default_budget)


def gemm_rate(lib: str, G: int, P: int, D: int, repeats: int = 5) -> dict:
    """Best-of sgemm GFLOP/s at (G x D) @ (D x P) with NumPy's BLAS or torch's."""
    rng = np.random.default_rng(123)
    a = rng.standard_normal((G, D), dtype=np.float32)
    b = rng.standard_normal((D, P), dtype=np.float32)
    if lib == "torch":
        import torch

        a, b = torch.from_numpy(a), torch.from_numpy(b)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2.0 * G * D * P / best / 1e9}


def profile_dxfield(G: int, P: int, D: int, seed: int, budget, top: int = 18) -> str:
    """cProfile text of one dxfield call (after a warm-up call), sorted by own time."""
    import cProfile
    import io
    import pstats

    fn = make_method("dxfield", G, P, D, seed, budget)
    fn()
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def agreement(v, ref) -> dict:
    v = np.asarray(v, np.float64)
    ref = np.asarray(ref, np.float64)
    diff = np.abs(v - ref)
    return {
        "max_rel": float(diff.max() / np.abs(ref).max()),
        "fro_rel": float(np.linalg.norm(v - ref) / np.linalg.norm(ref)),
        "max_abs": float(diff.max()),
    }


def machine_info() -> dict:
    import torch

    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": None,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:
        pass
    try:
        for tok in torch.__config__.show().replace(",", "\n").splitlines():
            tok = tok.strip()
            if tok.startswith(("BLAS_INFO=", "LAPACK_INFO=")):
                info["torch_" + tok.split("=")[0].lower()] = tok.split("=", 1)[1]
    except Exception:
        pass
    try:
        import dxfield

        info["dxfield"] = getattr(dxfield, "__version__", None)
    except Exception:
        pass
    try:  # which dxfield was measured: commit, and whether dxfield/ had local edits
        import subprocess

        root = HERE.parent
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dxfield"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["dxfield_dirty"] = bool(dirty)
    except Exception:
        pass
    return info


def host_kind() -> str:
    return f"cpu{os.cpu_count()}"


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def render(rows, meta) -> str:
    G, P, D, nt = meta["G"], meta["P"], meta["D"], meta["n_temperatures"]
    lines = [
        f"## Exact drifting field: G={G} queries, P={P} positives, D={D}, float32, "
        f"{nt} temperatures {meta['temperatures']}",
        "",
        f"flops counted: 2*G*(G+P)*D * (1 + n_temps) = {meta['flops'] / 1e9:.2f} GFLOP "
        "(distances + one weighted sum per temperature; extra sweeps are not credited)",
        f"memory: peak RSS above baseline in a fresh process ({meta['memory_mechanism']}); "
        f"one G x (G+P) float32 matrix = {G * (G + P) * 4 / MiB:.1f} MiB; output V = {G * D * 4 / MiB:.1f} MiB",
        f"agreement: max|V - V_ref| / max|V_ref| over all entries; ref = peer float32 and peer float64",
        "",
        "| method | time best (ms) | time median (ms) | GFLOP/s eff. | peak extra mem (MiB) "
        "| time / peer | mem / peer | max rel diff vs peer | max rel diff vs float64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['label']} | error: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {_f(r.get('time_best_ms'), '.1f')} | {_f(r.get('time_median_ms'), '.1f')} "
            f"| {_f(r.get('gflops_eff'), '.1f')} | {_f(r.get('peak_extra_mib'), '.1f')} "
            f"| {_f(r.get('time_ratio_vs_peer'), '.2f')} | {_f(r.get('mem_ratio_vs_peer'), '.3f')} "
            f"| {_f(r.get('max_rel_vs_peer'), '.2e')} | {_f(r.get('max_rel_vs_f64'), '.2e')} |"
        )
    g = meta.get("gemm")
    if g:
        lines += ["", f"reference sgemm {g['shape']} (best of 5, own process each): "
                      f"numpy {_f(g.get('numpy_gflops'), '.1f')} GFLOP/s, torch {_f(g.get('torch_gflops'), '.1f')} GFLOP/s"]
    spread = [r["time_median_ms"] / r["time_best_ms"] for r in rows if r.get("time_best_ms")]
    if spread:
        lines += ["", f"timing spread, median/best: max {max(spread):.2f} over methods"
                  + (" -- the machine was noisy or throttled during the run; compare best times"
                     if max(spread) > 1.3 else "")]
    cpu = [r for r in rows if r.get("cpu_best_ms") is not None]
    if cpu:
        lines += ["", "CPU time per call, best (all threads; spin-waiting included): " + "; ".join(
            f"{r['label']}: {r['cpu_best_ms']:.0f} ms" for r in cpu)]
    tm = [r for r in rows if r.get("tracemalloc_peak_mib") is not None]
    if tm:
        lines += ["", "cross-check, tracemalloc peak of one call (NumPy buffers only): " + "; ".join(
            f"{r['label']}: {r['tracemalloc_peak_mib']:.1f} MiB" for r in tm)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-G", type=int, default=1024, help="generated samples (queries), default 1024")
    p.add_argument("-P", type=int, default=16384, help="positives, default 16384")
    p.add_argument("-D", type=int, default=512, help="feature dimension, default 512")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per method after the warm-up (default 7)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="peer, peer-f64, dxfield, dxfield@<budget>; default: %(default)s")
    p.add_argument("--memory-budget", default=None,
                   help="memory_budget for the plain 'dxfield' method (e.g. 48MiB); default: dxfield's own (64 MiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pause", type=float, default=0.3,
                   help="seconds of idle before each timed call, so the previous worker's threads stop spinning")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: G=64, P=512, D=32, 3 repeats")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-f64", action="store_true", help="skip the float64 peer used as ground truth")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of one dxfield call")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/field-<host-kind>.json)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.G, args.P, args.D, args.repeats = 64, 512, 32, 3
    for name in args.methods:
        parse_method(name, args.memory_budget)
    G, P, D = args.G, args.P, args.D
    nt = len(TEMPERATURES)
    flops = 2.0 * G * (G + P) * D * (1 + nt)
    print(f"# bench/field.py: G={G} P={P} D={D} repeats={args.repeats} methods={args.methods}", flush=True)
    rows = [{"method": m, "label": method_label(m, args.memory_budget)} for m in args.methods]

    # 1. correctness first (in this process; nothing here is timed)
    print("# agreement ...", flush=True)
    x, pos = make_data(G, P, D, seed=args.seed)
    v_peer = to_numpy(prepare("peer", x, pos, None)())
    v_f64 = None if args.no_f64 else to_numpy(prepare("peer-f64", x, pos, None)())
    for r in rows:
        try:
            v = to_numpy(prepare(r["method"], x, pos, args.memory_budget)())
            a = agreement(v, v_peer)
            r["max_rel_vs_peer"], r["fro_rel_vs_peer"] = a["max_rel"], a["fro_rel"]
            if v_f64 is not None:
                a = agreement(v, v_f64)
                r["max_rel_vs_f64"], r["fro_rel_vs_f64"] = a["max_rel"], a["fro_rel"]
            del v
        except Exception as e:  # benchmarks report, never raise
            r["error"] = f"{type(e).__name__}: {e}"
    del x, pos, v_peer, v_f64
    gc.collect()

    # 2. one spawned worker per method: peak memory of its first call (also the warm-up)
    workers = {}
    mechanism = "skipped"
    for r in rows:
        if r.get("error"):
            continue
        print(f"# start worker: {r['label']} (memory of the first call) ...", flush=True)
        w = Worker(make_method, (r["method"], G, P, D, args.seed, args.memory_budget),
                   warmup_args=(r["method"], 16, 64, D, args.seed + 1, args.memory_budget),
                   measure_memory=not args.no_memory, traced=is_numpy_method(r["method"]))
        if w.ready.get("error"):
            r["error"] = w.ready["error"]
            w.close()
            continue
        workers[r["method"]] = w
        r["first_call_ms"] = w.ready["first_call_ms"]
        if not args.no_memory:
            r["peak_extra_mib"] = w.ready["extra_mib"]
            r["baseline_rss_mib"] = w.ready["baseline_rss_mib"]
            mechanism = w.ready["mechanism"]

    # 3. timed calls, round robin over the workers (order rotated every round)
    print(f"# timing: {args.repeats} rounds over {len(workers)} worker(s) ...", flush=True)
    times = {m: [] for m in workers}
    cpu = {m: [] for m in workers}
    order = list(workers)
    try:
        for k in range(args.repeats):
            for m in order[k % len(order):] + order[:k % len(order)] if order else []:
                time.sleep(args.pause)
                t = workers[m].ask("time")
                if t.get("error"):
                    next(r for r in rows if r["method"] == m).setdefault("time_error", t["error"])
                    continue
                times[m].append(t["wall_ms"])
                cpu[m].append(t["cpu_ms"])
        if not args.no_memory:
            for m, w in workers.items():
                if is_numpy_method(m):
                    next(r for r in rows if r["method"] == m).update(w.ask("tracemalloc"))
    finally:
        for w in workers.values():
            w.close()
    for r in rows:
        ts = times.get(r["method"])
        if ts:
            r["times_ms"], r["cpu_times_ms"] = ts, cpu[r["method"]]
            r["time_best_ms"] = min(ts)
            r["time_median_ms"] = statistics.median(ts)
            r["cpu_best_ms"] = min(cpu[r["method"]])
            r["gflops_eff"] = flops / (min(ts) / 1e3) / 1e9

    peer = next((r for r in rows if r["method"] == "peer" and not r.get("error")), None)
    for r in rows:
        if peer is None or r.get("error"):
            continue
        if r.get("time_best_ms") and peer.get("time_best_ms"):
            r["time_ratio_vs_peer"] = r["time_best_ms"] / peer["time_best_ms"]
        if r.get("peak_extra_mib") is not None and peer.get("peak_extra_mib"):
            r["mem_ratio_vs_peer"] = r["peak_extra_mib"] / peer["peak_extra_mib"]

    # 4. reference sgemm rates, each library in its own process
    print("# reference sgemm ...", flush=True)
    gemm = {"shape": f"({G}x{D})@({D}x{P})", "flops": 2.0 * G * D * P}
    for lib in ("numpy", "torch"):
        gemm[f"{lib}_gflops"] = run_isolated(gemm_rate, lib, G, P, D).get("gflops")

    meta = {
        "G": G, "P": P, "D": D, "dtype": "float32", "seed": args.seed,
        "temperatures": list(TEMPERATURES), "n_temperatures": nt,
        "repeats": args.repeats, "pause_s": args.pause, "memory_budget": args.memory_budget,
        "flops": flops, "flops_formula": "2*G*(G+P)*D * (1 + n_temps)",
        "memory_mechanism": mechanism, "gemm": gemm,
        "agreement_metric": "max|V - V_ref| / max|V_ref| (max_rel); ||V - V_ref||_F / ||V_ref||_F (fro_rel)",
        "timing": "one spawned process per method; its first call (memory run) is the warm-up; "
                  "timed calls round robin over methods",
    }
    print()
    print(render(rows, meta))

    if args.profile:
        print("\n## cProfile of one dxfield call (default budget, own process), by own time\n")
        text = run_isolated(profile_dxfield, G, P, D, args.seed, args.memory_budget)
        print(text if isinstance(text, str) else text)

    suffix = "-quick" if args.quick else ""
    out = Path(args.out) if args.out else HERE / "results" / f"field-{host_kind()}{suffix}.json"
    write_json_atomic(out, {"benchmark": "bench/field.py", "argv": sys.argv[1:], "meta": meta,
                            "machine": machine_info(), "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
