"""Benchmark: dxfield's exact drifting field against the peers' full-matrix Algorithm 2.

What is compared
----------------
* ``dxfield`` -- ``dxfield.drift_field(x, pos)`` with its defaults: bidirectional
  normalisation (Algorithm 2 of the drifting paper), temperatures
  (0.02, 0.05, 0.2), ``feature_scale="auto"``, ``drift_norm=True``, negatives =
  the queries with self pairs masked.  NumPy float32 inputs; tiled, memory
  bounded by ``memory_budget`` (default 64 MiB).  ``dxfield@24MiB`` is the same
  call with ``memory_budget="24MiB"`` (smaller tiles, two passes per target
  tile) to show the memory/time trade-off.
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
2. Time: in-process, one warm-up call, then ``--repeats`` timed calls
   (``time.perf_counter``); best and median are reported.  Effective GFLOP/s
   uses one flop count for every method,
   ``2*G*(G+P)*D`` (distances) ``+ n_temps * 2*G*(G+P)*D`` (weighted sums);
   work a method does beyond that (dxfield's extra distance sweep for the mean
   distance, for instance) is not credited.
3. Peak extra memory: each method runs once in a fresh subprocess
   (``python bench/field.py --_child METHOD ...``).  The child imports
   everything, builds the inputs, runs the method once on a tiny problem (so
   thread pools and lazily loaded kernels exist), trims the allocator, then
   resets the kernel's resident-set high-water mark by writing ``5`` to
   ``/proc/self/clear_refs`` (Linux >= 4.0) and checks the reset took; it then
   runs the method once and reads ``VmHWM`` from ``/proc/self/status``.
   extra = VmHWM after - VmRSS before.  The child runs with
   ``MALLOC_MMAP_THRESHOLD_=131072`` so freed large blocks go back to the OS and
   cannot be silently reused.  If ``clear_refs`` cannot be written the child
   falls back to sampling VmRSS from a thread every 1 ms.  For NumPy methods the
   child also reports the ``tracemalloc`` peak of a second call as a cross-check
   (NumPy reports its buffers to tracemalloc; torch does not).  The extra
   includes the output V (G x D) in every row.
4. Reference rates: NumPy (and torch) sgemm at (G x D) @ (D x P) on this machine.

Output: a markdown table on stdout, and the same data as JSON in
``bench/results/field-<host-kind>.json`` (written atomically).  Benchmarks print
and save figures; they never assert.

Run::

    python bench/field.py                    # G=1024, P=16384, D=512 (~1-2 min on 2 cores)
    python bench/field.py --quick            # tiny smoke run (seconds)
    python bench/field.py -G 512 -P 8192 -D 256 --repeats 3
    python bench/field.py --methods peer dxfield dxfield@32MiB --memory-budget 48MiB
    python bench/field.py --profile          # also cProfile one dxfield call
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TEMPERATURES = (0.02, 0.05, 0.2)
DEFAULT_METHODS = ("peer", "dxfield", "dxfield@24MiB")
MiB = 2 ** 20


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
    raise SystemExit(f"unknown method {name!r}: use peer, peer-f64, dxfield or dxfield@<budget> (e.g. dxfield@24MiB)")


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
# memory measurement (child process)
# --------------------------------------------------------------------------------------
def _status_kib(*keys):
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in keys:
                out[k] = int(rest.split()[0])
    return out


def _malloc_trim():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True if the kernel took it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    s = _status_kib("VmHWM", "VmRSS")
    return s["VmHWM"] <= s["VmRSS"] + 1024  # within 1 MiB of current RSS


class _RssSampler:
    """Fallback: sample VmRSS every ``period`` s from a thread (misses sub-ms peaks)."""

    def __init__(self, period=1e-3):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        page = os.sysconf("SC_PAGE_SIZE") // 1024
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
                time.sleep(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def child_main(args) -> None:
    """Run one method once in this fresh process and print its peak extra memory as JSON."""
    import torch  # noqa: F401  (import everything before the baseline)
    import dxfield  # noqa: F401

    name = args._child
    result = {"method": name}
    try:
        # Tiny warm-up: thread pools, lazily loaded kernels, first-call caches.
        xs, ps = make_data(16, 64, args.D, seed=args.seed + 1)
        prepare(name, xs, ps, args.memory_budget)()
        x, pos = make_data(args.G, args.P, args.D, seed=args.seed)
        fn = prepare(name, x, pos, args.memory_budget)
        del xs, ps
        gc.collect()
        _malloc_trim()
        base = _status_kib("VmRSS", "VmHWM")
        if _reset_hwm():
            base = _status_kib("VmRSS")["VmRSS"]
            v = fn()
            peak = _status_kib("VmHWM")["VmHWM"]
            result["mechanism"] = "VmHWM after clear_refs=5"
        else:
            base = base["VmRSS"]
            with _RssSampler() as s:
                v = fn()
            peak = s.peak
            result["mechanism"] = "VmRSS sampled every 1 ms (clear_refs unavailable)"
        result["baseline_rss_mib"] = base / 1024
        result["peak_rss_mib"] = peak / 1024
        result["extra_mib"] = (peak - base) / 1024
        del v
        if is_numpy_method(name):
            import tracemalloc

            gc.collect()
            tracemalloc.start()
            v = fn()
            result["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / MiB
            tracemalloc.stop()
            del v
    except Exception as e:  # benchmarks report, never raise
        result["error"] = f"{type(e).__name__}: {e}"
    print("@@CHILD@@" + json.dumps(result), flush=True)


def measure_memory(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", name,
           "-G", str(args.G), "-P", str(args.P), "-D", str(args.D), "--seed", str(args.seed)]
    if args.memory_budget:
        cmd += ["--memory-budget", str(args.memory_budget)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    except subprocess.TimeoutExpired:
        return {"method": name, "error": "child timed out"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@CHILD@@"):
            return json.loads(line[len("@@CHILD@@"):])
    return {"method": name, "error": f"child exited {proc.returncode}: {proc.stderr.strip()[-400:]}"}


# --------------------------------------------------------------------------------------
# timing and references
# --------------------------------------------------------------------------------------
def time_it(fn, repeats: int):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def gemm_rates(G: int, P: int, D: int, repeats: int = 3) -> dict:
    """sgemm GFLOP/s at (G x D) @ (D x P): NumPy (its BLAS) and torch."""
    import torch

    rng = np.random.default_rng(123)
    a = rng.standard_normal((G, D), dtype=np.float32)
    b = rng.standard_normal((D, P), dtype=np.float32)
    flops = 2.0 * G * D * P
    out = {"shape": f"({G}x{D})@({D}x{P})", "flops": flops}
    t_np = min(time_it(lambda: a @ b, repeats))
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    t_t = min(time_it(lambda: at @ bt, repeats))
    out["numpy_gflops"] = flops / t_np / 1e9
    out["torch_gflops"] = flops / t_t / 1e9
    return out


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
    return info


def host_kind() -> str:
    return f"cpu{os.cpu_count()}"


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        lines += ["", f"reference sgemm {g['shape']}: numpy {g['numpy_gflops']:.1f} GFLOP/s, "
                      f"torch {g['torch_gflops']:.1f} GFLOP/s"]
    tm = [r for r in rows if r.get("tracemalloc_peak_mib") is not None]
    if tm:
        lines += ["", "cross-check, tracemalloc peak of one call (NumPy buffers only): " + "; ".join(
            f"{r['label']}: {r['tracemalloc_peak_mib']:.1f} MiB" for r in tm)]
    return "\n".join(lines)


def profile_dxfield(x, pos, budget, top: int = 18) -> str:
    import cProfile
    import io
    import pstats

    import dxfield

    pr = cProfile.Profile()
    pr.enable()
    dxfield.drift_field(x, pos, memory_budget=budget)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-G", type=int, default=1024, help="generated samples (queries), default 1024")
    p.add_argument("-P", type=int, default=16384, help="positives, default 16384")
    p.add_argument("-D", type=int, default=512, help="feature dimension, default 512")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method after one warm-up (default 5)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="peer, peer-f64, dxfield, dxfield@<budget>; default: %(default)s")
    p.add_argument("--memory-budget", default=None,
                   help="memory_budget for the plain 'dxfield' method (e.g. 48MiB); default: dxfield's own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run: G=64, P=512, D=32, 2 repeats")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--no-f64", action="store_true", help="skip the float64 peer used as ground truth")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of one dxfield call")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/field-<host-kind>.json)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args._child:
        child_main(args)
        return 0
    if args.quick:
        args.G, args.P, args.D, args.repeats = 64, 512, 32, 2
    for name in args.methods:
        parse_method(name, args.memory_budget)
    G, P, D = args.G, args.P, args.D
    nt = len(TEMPERATURES)
    flops = 2.0 * G * (G + P) * D * (1 + nt)
    print(f"# bench/field.py: G={G} P={P} D={D} repeats={args.repeats} methods={args.methods}", flush=True)

    x, pos = make_data(G, P, D, seed=args.seed)
    rows = [{"method": m, "label": method_label(m, args.memory_budget)} for m in args.methods]

    # 1. correctness first
    print("# agreement ...", flush=True)
    v_peer = to_numpy(prepare("peer", x, pos, None)())
    v_f64 = None if args.no_f64 else to_numpy(prepare("peer-f64", x, pos, None)())
    fns = {}
    for r in rows:
        try:
            fns[r["method"]] = fn = prepare(r["method"], x, pos, args.memory_budget)
            v = to_numpy(fn())
            a = agreement(v, v_peer)
            r["max_rel_vs_peer"], r["fro_rel_vs_peer"] = a["max_rel"], a["fro_rel"]
            if v_f64 is not None:
                a = agreement(v, v_f64)
                r["max_rel_vs_f64"], r["fro_rel_vs_f64"] = a["max_rel"], a["fro_rel"]
            del v
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"
    del v_peer, v_f64

    # 2. time
    for r in rows:
        if r.get("error"):
            continue
        print(f"# timing {r['label']} ...", flush=True)
        ts = time_it(fns[r["method"]], args.repeats)
        r["times_ms"] = [t * 1e3 for t in ts]
        r["time_best_ms"] = min(ts) * 1e3
        r["time_median_ms"] = statistics.median(ts) * 1e3
        r["gflops_eff"] = flops / min(ts) / 1e9
    fns.clear()
    gc.collect()

    # 3. memory, each method in a fresh process
    mechanism = "skipped"
    if not args.no_memory:
        for r in rows:
            print(f"# memory {r['label']} (fresh process) ...", flush=True)
            m = measure_memory(r["method"], args)
            if m.get("error"):
                r.setdefault("memory_error", m["error"])
                continue
            r["peak_extra_mib"] = m["extra_mib"]
            r["baseline_rss_mib"] = m["baseline_rss_mib"]
            r["tracemalloc_peak_mib"] = m.get("tracemalloc_peak_mib")
            mechanism = m["mechanism"]

    peer = next((r for r in rows if r["method"] == "peer" and not r.get("error")), None)
    for r in rows:
        if peer is None or r.get("error"):
            continue
        if r.get("time_best_ms") and peer.get("time_best_ms"):
            r["time_ratio_vs_peer"] = r["time_best_ms"] / peer["time_best_ms"]
        if r.get("peak_extra_mib") is not None and peer.get("peak_extra_mib"):
            r["mem_ratio_vs_peer"] = r["peak_extra_mib"] / peer["peak_extra_mib"]

    # 4. reference gemm rate
    print("# reference sgemm ...", flush=True)
    gemm = gemm_rates(G, P, D)

    meta = {
        "G": G, "P": P, "D": D, "dtype": "float32", "seed": args.seed,
        "temperatures": list(TEMPERATURES), "n_temperatures": nt,
        "repeats": args.repeats, "memory_budget": args.memory_budget,
        "flops": flops, "flops_formula": "2*G*(G+P)*D * (1 + n_temps)",
        "memory_mechanism": mechanism, "gemm": gemm,
        "agreement_metric": "max|V - V_ref| / max|V_ref| (max_rel); ||V - V_ref||_F / ||V_ref||_F (fro_rel)",
    }
    print()
    print(render(rows, meta))

    if args.profile:
        print("\n## cProfile of one dxfield call (default budget), by tottime\n")
        print(profile_dxfield(x, pos, args.memory_budget))

    out = Path(args.out) if args.out else HERE / "results" / f"field-{host_kind()}{'-quick' if args.quick else ''}.json"
    write_json_atomic(out, {"benchmark": "bench/field.py", "meta": meta, "machine": machine_info(), "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
