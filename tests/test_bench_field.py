"""bench/field.py and bench/gpu_check.sh: option parsing, the flop counts, and smoke runs on the CPU.

Benchmarks never assert on timings; these tests check that the harness runs
and reports: the --quick CPU paths of the three suites (one subprocess each,
started side by side), the grid's JSON and its key-figure summary, a method
the device cannot run reported as an error row, and the GPU check script's
dry run on a machine without a GPU (every GPU step skipped, exit status 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import field as bench  # noqa: E402  (bench/field.py)
from _measure import CupyPeak, to_host  # noqa: E402


def parse(*argv):
    args = bench.build_parser().parse_args(list(argv))
    return bench.resolve_args(args)


# -- parsing ---------------------------------------------------------------------------------
def test_parse_shape_with_and_without_landmarks():
    assert bench.parse_shape("4096x65536x512x1024") == (4096, 65536, 512, 1024)
    assert bench.parse_shape("1024x16384x512", default_landmarks=256) == (1024, 16384, 512, 256)
    assert bench.parse_shape("64,512,32,8") == (64, 512, 32, 8)
    for bad in ("64x512", "64x512x32x8x1", "64x0x32", "64xPx32", ""):
        with pytest.raises(SystemExit, match="--grid"):
            bench.parse_shape(bad)


def test_parse_method_families_precisions_and_engines():
    pm = bench.parse_method
    assert pm("peer") == bench.Method("peer", "peer")
    assert pm("peer-f64").precision == "float64"
    d = pm("dxfield@16MiB")
    assert (d.family, d.engine, d.budget, d.precision) == ("dxfield", "composed", "16MiB", "float32")
    f = pm("fused-tf32", default_budget="1GiB")
    assert (f.family, f.engine, f.precision, f.budget) == ("fused", "fused", "tf32", "1GiB")
    p = pm("projected-bf16@m=512", default_landmarks=1024)
    assert (p.family, p.precision, p.m, p.engine) == ("projected", "bf16", 512, "composed")
    a = pm("attraction", default_landmarks=256, device="cuda")
    assert (a.family, a.m, a.engine, a.product) == ("attraction", 256, "fused", "m=256")
    assert pm("projected@300").m == 300
    for bad in ("peer-tf32", "peer@1MiB", "projected@m=0", "projected@m=x", "fused-fp16", "dxfield-"):
        with pytest.raises(SystemExit, match="unknown method"):
            pm(bad)


def test_grid_defaults_per_device_and_quick():
    cpu = parse("--suite", "grid")
    assert cpu.shapes == bench.GRIDS["cpu"] and cpu.repeats == 3 and cpu.temperatures == (0.05,)
    assert not any(m.startswith("fused") or "-" in m for m in cpu.methods)  # GPU-only methods left out
    assert cpu.no_f64 and cpu.pause == 0.3
    gpu = parse("--suite", "grid", "--device", "cuda")
    assert gpu.shapes[0] == bench.GOAL_SHAPE == (4096, 65536, 512, 1024)
    assert {"peer", "dxfield", "fused", "fused-tf32", "projected-bf16", "attraction-tf32"} <= set(gpu.methods)
    assert gpu.repeats == 5 and gpu.pause == 0.05
    quick = parse("--suite", "grid", "--quick", "-m", "16")
    assert quick.shapes == [(G, P, D, 16) for G, P, D, _ in bench.GRIDS["quick"]] and quick.repeats == 3
    given = parse("--suite", "grid", "--grid", "8x64x4", "16x128x8x32", "--repeats", "1", "-m", "8")
    assert given.shapes == [(8, 64, 4, 8), (16, 128, 8, 32)] and given.repeats == 1


def test_suite_option_conflicts_and_old_suites_unchanged():
    with pytest.raises(SystemExit, match="--grid"):
        parse("--suite", "grid", "-G", "64")
    with pytest.raises(SystemExit, match="--suite grid"):
        parse("--grid", "8x64x4")
    with pytest.raises(SystemExit, match="unknown method"):
        parse("--methods", "peer", "nope")
    exact = parse()
    assert exact.shapes == [(1024, 16384, 512, 1024)] and exact.repeats == 7
    assert exact.methods == list(bench.DEFAULT_METHODS) and exact.temperatures == bench.TEMPERATURES
    proj = parse("--suite", "projected", "--quick")
    assert proj.shapes == [(64, 512, 32, 128)] and proj.no_f64 and proj.temperatures == (0.05,)


def test_flop_counts_match_the_issue():
    G, P, D, m = bench.GOAL_SHAPE
    exact = bench.method_flops(bench.parse_method("fused"), G, P, D, nt=1)
    assert exact == 2 * G * (P + G) * D * 2 and round(exact / 1e9) == 584
    attraction = bench.method_flops(bench.parse_method("attraction", default_landmarks=m), G, P, D, nt=1)
    assert attraction == 2 * G * m * D + 2 * G * m * (D + 1) and round(attraction / 1e9, 1) == 8.6
    projected = bench.method_flops(bench.parse_method("projected", default_landmarks=m), G, P, D, nt=1)
    assert projected == attraction + 2 * G * G * D * 2
    # m is capped at the positives
    assert bench.method_flops(bench.parse_method("attraction@m=64"), 8, 32, 4, 1) == \
        bench.method_flops(bench.parse_method("attraction@m=32"), 8, 32, 4, 1)


def test_reference_methods():
    ms = [bench.parse_method(n, default_landmarks=64) for n in
          ("peer", "dxfield@16MiB", "dxfield", "fused", "fused-tf32", "projected", "projected-bf16",
           "projected-tf32@m=32", "attraction", "attraction-tf32")]
    ref = {m.name: (bench.reference_of(m, ms) or bench.Method("-", "-")).name for m in ms}
    assert ref["fused"] == ref["fused-tf32"] == "dxfield"  # composed, default budget
    assert ref["projected-bf16"] == "projected" and ref["attraction-tf32"] == "attraction"
    assert ref["projected-tf32@m=32"] == "-"  # no float32 method with m=32
    assert ref["peer"] == ref["dxfield"] == ref["projected"] == "-"


def test_gpu_kind_names_results_files():
    assert bench.gpu_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.gpu_kind("NVIDIA H200") == "h200"
    assert bench.gpu_kind("Tesla V100-SXM2-16GB") == "v100"
    assert bench.gpu_kind(None) == "gpu"


def test_cupy_peak_records_the_pools_high_water_mark():
    class Pool:  # the two methods of cupy.cuda.MemoryPool the tracker uses
        def __init__(self):
            self.used = 100

        def used_bytes(self):
            return self.used

        def malloc(self, size):
            self.used += size
            return size

    pool = Pool()
    peak = CupyPeak(pool)
    assert peak.malloc(50) == 50 and peak.peak == 150
    pool.used -= 120  # frees go back to the pool
    peak.malloc(30)
    assert peak.peak == 150 and pool.used == 60
    peak.malloc(200)
    assert peak.peak == 260


def test_to_host():
    a = np.ones((2, 3), np.float32)
    assert to_host(a) is a
    torch = pytest.importorskip("torch")
    h = to_host(torch.ones(2, 3, dtype=torch.bfloat16))
    assert isinstance(h, np.ndarray) and h.dtype == np.float32 and h.sum() == 6


# -- smoke runs ------------------------------------------------------------------------------
RUNS = {  # name -> argv; all tiny, one timed call, started side by side
    "grid": ["--suite", "grid", "--quick", "--grid", "32x256x16x32",
             "--methods", "peer", "dxfield", "fused", "attraction", "--repeats", "2", "--pause", "0"],
    "exact": ["--quick", "--methods", "peer", "dxfield", "--repeats", "1", "--pause", "0"],
    "projected": ["--suite", "projected", "--quick", "--methods", "peer", "projected", "-m", "32",
                  "--repeats", "1", "--pause", "0", "--no-memory"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("torch")  # the peer
    tmp = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, str(BENCH / "field.py"), *argv,
                                     "--out", str(tmp / f"{name}.json")],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, argv in RUNS.items()}
    out = {}
    for name, p in procs.items():
        text, _ = p.communicate(timeout=300)
        path = tmp / f"{name}.json"
        out[name] = (p.returncode, text, json.loads(path.read_text()) if path.exists() else None, path)
    return out


def _ok(run):
    rc, text, data, _ = run
    assert rc == 0, text[-3000:]
    return text, data


def test_grid_quick_run_reports_every_method(runs):
    text, data = _ok(runs["grid"])
    assert data["complete"] and data["meta"]["device"] == "cpu" and len(data["shapes"]) == 1
    shape = data["shapes"][0]
    assert (shape["G"], shape["P"], shape["D"], shape["m"]) == (32, 256, 16, 32)
    rows = {r["method"]: r for r in shape["rows"]}
    assert list(rows) == RUNS["grid"][RUNS["grid"].index("--methods") + 1:RUNS["grid"].index("--repeats")]
    assert rows["peer"]["max_rel_vs_peer"] == 0.0 and len(rows["peer"]["times_ms"]) == 2
    assert rows["dxfield"]["max_rel_vs_peer"] < 1e-4 and rows["dxfield"]["peak_extra_mib"] >= 0
    assert "ValueError" in rows["fused"]["error"]  # GPU only: an error row, not a crash
    att = rows["attraction"]
    assert att["flops"] == 2 * 32 * 32 * 16 + 2 * 32 * 32 * 17 and att["share_f32"] > 0
    assert set(shape["gemm"]) == {"P", "m=32"} and shape["gemm"]["m=32"]["gflops"]["numpy float32"] > 0
    assert "| 32 | 256 | 16 |" in text and "### Key figures" in text


def test_summarize_prints_the_key_figures(runs):
    _, data = _ok(runs["grid"])
    text = subprocess.run([sys.executable, str(BENCH / "field.py"), "--summarize", str(runs["grid"][3])],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert text.startswith("### Key figures") and "32x256x16 m=32" in text
    assert "peer time, best (ms)" in text and "fused: ValueError" in text
    assert bench.summarize({"shapes": [], "complete": False}).endswith("(run cut short)")


def test_exact_and_projected_quick_runs_still_work(runs):
    text, data = _ok(runs["exact"])
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["dxfield"]["max_rel_vs_f64"] < 1e-4 and rows["dxfield"]["label"].startswith("dxfield composed")
    assert "## Exact drifting field" in text
    text, data = _ok(runs["projected"])
    row = next(r for r in data["rows"] if r["method"] == "projected")
    assert row["m"] == 32 and 0 < row["fro_rel_vs_row"] < 1 and len(row["cancellation"]) == 1
    assert data["meta"]["context"]["row_vs_peer"]["fro_rel"] > 0
    assert "### Projected cache and accuracy" in text


def test_gpu_check_dry_run_skips_the_gpu_steps():
    script = BENCH / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    env = dict(os.environ, GPU_CHECK_CPU_SMOKE="0")
    env.pop("OUT", None)
    p = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, env=env, cwd="/")
    if "dxfield.cuda_available() = True" in p.stdout:
        pytest.skip("a GPU is usable here: the dry run is for machines without one")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "tests: SKIPPED (no usable CUDA GPU" in p.stdout
    assert "benchmark: SKIPPED" in p.stdout
    assert p.stdout.rstrip().endswith("(no benchmark results to summarise)")
