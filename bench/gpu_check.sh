#!/usr/bin/env bash
# bench/gpu_check.sh -- one-shot check of DriftXpress on a lent GPU machine (H100 / H200).
#
# Meant to be run ONCE, from a copy of the repository, on a machine that has torch, CuPy (any
# CUDA), pytest and no internet; nothing is installed: PYTHONPATH is set to the repository root.
# Under 8 minutes in all (a deadline, GPU_CHECK_DEADLINE=465 s, caps every step's `timeout`):
#
#   (a) the GPU (nvidia-smi -L) and the versions of Python, NumPy, torch, CuPy, CUDA, and which
#       optional imports (hypothesis, h5py, click) are present                   (~10 s)
#   (b) the dxfield tests on CuPy with the GPU required:
#       DXFIELD_BACKEND=cupy DXFIELD_REQUIRE_GPU=1 python -m pytest -q -x -p no:cacheprovider
#       over tests/test_*.py except dxtrain's (a file whose imports are missing is left out,
#       with a line saying so)                                                 (<= 170 s)
#   (b2) the dxtrain tests whose imports are present (GPU_CHECK_DXTRAIN=0 skips) (<= 75 s)
#   (c) the GPU benchmark grid: bench/field.py --suite grid --device cuda, i.e. the issue's goal
#       shape G=4096, P=65536, D=512, m=1024, one temperature 0.05 (peer, dxfield composed,
#       fused, fused-tf32; projected and attraction in float32/tf32/bf16; matmul references),
#       then 1024x16384x512; 5 repeats; -> bench/results/field-grid-<gpu>.json, written after
#       each shape                                                             (<= 200 s)
#   (d) the JSON and the logs copied to $OUT when that variable is set
#   (e) the key figures, printed LAST: fused vs peer speed-up, fused-tf32 vs peer, memory
#       peaks, attraction share of the matmul rate, fused vs composed relative error
#
# Without a usable GPU (a dry run on a CPU machine) every GPU step prints why it is skipped, a
# tiny CPU grid stands in for (c) so that (d) and (e) run too (GPU_CHECK_CPU_SMOKE=0 skips it;
# its JSON goes to the log folder, not bench/results), and the exit status is 0.
#
#   bash bench/gpu_check.sh
#   GPU_CHECK_BENCH_TIMEOUT=240 GPU_CHECK_DXTRAIN=0 bash bench/gpu_check.sh
#
# Environment: PYTHON (default python3), OUT, GPU_CHECK_DEADLINE, GPU_CHECK_TEST_TIMEOUT,
# GPU_CHECK_DXTRAIN_TIMEOUT, GPU_CHECK_BENCH_TIMEOUT, GPU_CHECK_DXTRAIN, GPU_CHECK_CPU_SMOKE.
# Exit status: 0 when every step that ran passed (skipped steps included), 1 otherwise.

set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_DEADLINE:-465}
T_TESTS=${GPU_CHECK_TEST_TIMEOUT:-170}
T_DXTRAIN=${GPU_CHECK_DXTRAIN_TIMEOUT:-75}
T_BENCH=${GPU_CHECK_BENCH_TIMEOUT:-200}
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
FAILED=0
STATUS=()
RES=""

step() { printf '\n=== (%s) %s  [%ds]\n' "$1" "$2" "$SECONDS"; }
status() { STATUS+=("$1"); echo "--- $1"; }

# seconds a step may take: its own limit, capped so that `reserve` seconds stay before the deadline
allow() {
    local want=$1 reserve=$2 left=$((DEADLINE - SECONDS - $2))
    if [ "$left" -lt "$want" ]; then want=$left; fi
    echo "$want"
}

# run_timed NAME SECONDS CMD...: CMD under `timeout`, output shown and kept in $LOGDIR/NAME.log; sets RC
run_timed() {
    local name=$1 secs=$2
    shift 2
    timeout -k 10 "$secs" "$@" 2>&1 | tee "$LOGDIR/$name.log"
    RC=${PIPESTATUS[0]}
    if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
        echo "--- $name: TIMED OUT after ${secs} s"
    fi
}

# pytest_verdict LABEL NAME SECONDS: a status line from RC and the summary line of $LOGDIR/NAME.log
pytest_verdict() {
    local line
    line=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$LOGDIR/$2.log" | tail -n 1 | tr -s '= ' ' ' | sed 's/^ //')
    if [ "$RC" = 0 ]; then
        status "$1: PASSED ($line)"
    elif [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
        FAILED=1
        status "$1: TIMED OUT after $3 s (progress in $2.log)"
    else
        FAILED=1
        status "$1: FAILED, exit $RC (${line:-see $2.log})"
    fi
}

# ------------------------------------------------------------------------------------------
step a "GPU and versions"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 10 nvidia-smi -L
    timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
else
    echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
fi
GPU=0 GPU_KIND=gpu HAVE_PYTEST=0 HAVE_HYPOTHESIS=0 HAVE_H5PY=0 HAVE_CLICK=0 HAVE_TORCH=0
probe=$(timeout 60 "$PY" - 2>"$LOGDIR/probe.err" <<'EOF'
import importlib.metadata as md, importlib.util, platform, sys
flags = {}
print(f"python {platform.python_version()} ({sys.executable})", file=sys.stderr)
dists = {d.metadata["Name"].lower(): d.version for d in md.distributions() if d.metadata["Name"]}
for name in ("numpy", "torch", "cupy", "dxfield", "pytest", "hypothesis", "h5py", "click"):
    found = importlib.util.find_spec(name) is not None  # present; importing waits for who needs it
    flags[f"HAVE_{name.upper()}"] = int(found)
    versions = [f"{d} {v}" for d, v in sorted(dists.items()) if d == name or d.startswith(name + "-cuda")]
    print(f"{name}: {', '.join(versions) or ('present' if found else 'MISSING')}", file=sys.stderr)
gpu = 0
try:
    import dxfield
    gpu = int(bool(dxfield.cuda_available()))
    print(f"dxfield.cuda_available() = {bool(gpu)}", file=sys.stderr)
except Exception as e:  # report whatever keeps dxfield from checking
    print(f"dxfield: cannot check the GPU ({type(e).__name__}: {e})", file=sys.stderr)
kind = "gpu"
if gpu:
    import cupy
    rt = cupy.cuda.runtime
    print(f"cupy: CUDA runtime {rt.runtimeGetVersion()}, driver {rt.driverGetVersion()}, "
          f"{rt.getDeviceCount()} device(s)", file=sys.stderr)
    try:
        import torch
        print(f"torch: CUDA {torch.version.cuda}, torch.cuda.is_available() = {torch.cuda.is_available()}",
              file=sys.stderr)
    except Exception as e:
        print(f"torch: does not import ({type(e).__name__}: {e})", file=sys.stderr)
    sys.path.insert(0, "bench")
    try:
        import field
        kind = field.host_kind("cuda")
        print(f"GPU: {field.gpu_name()} -> results name field-grid-{kind}.json", file=sys.stderr)
    except Exception as e:
        print(f"bench/field.py does not import: {type(e).__name__}: {e}", file=sys.stderr)
flags["GPU"] = gpu
flags["GPU_KIND"] = "".join(c for c in kind if c.isalnum() or c in "._-") or "gpu"
for k, v in flags.items():
    print(f"{k}={v}")
EOF
)
cat "$LOGDIR/probe.err"
while IFS='=' read -r key value; do  # only the flags the probe is meant to set
    case $key in
        GPU|GPU_KIND|HAVE_PYTEST|HAVE_HYPOTHESIS|HAVE_H5PY|HAVE_CLICK|HAVE_TORCH) printf -v "$key" '%s' "$value" ;;
    esac
done <<<"$probe"
if [ "$GPU" = 1 ]; then status "GPU: usable ($GPU_KIND)"; else status "GPU: none usable -- GPU steps are skipped"; fi

# ------------------------------------------------------------------------------------------
step b "dxfield tests on the GPU (DXFIELD_BACKEND=cupy DXFIELD_REQUIRE_GPU=1)"
if [ "$GPU" != 1 ]; then
    status "tests: SKIPPED (no usable CUDA GPU: dxfield.cuda_available() is False)"
elif [ "$HAVE_PYTEST" != 1 ]; then
    status "tests: SKIPPED (pytest does not import)"
else
    files=()
    for f in tests/test_*.py; do
        case $f in
            tests/test_dxtrain_*) continue ;;
            # CPU-only checks (kernel emulation, nvcc/NVRTC builds, benchmark smoke runs): CI runs them
            tests/test_cuda_kernels.py|tests/test_bench_*) continue ;;
            tests/test_invariants.py) if [ "$HAVE_HYPOTHESIS" != 1 ]; then echo "left out: $f (hypothesis missing)"; continue; fi ;;
        esac
        files+=("$f")
    done
    secs=$(allow "$T_TESTS" $((T_BENCH + 25)))
    if [ "$secs" -lt 20 ]; then
        status "tests: SKIPPED (too little time left before the deadline)"
    else
        run_timed tests "$secs" env DXFIELD_BACKEND=cupy DXFIELD_REQUIRE_GPU=1 \
            "$PY" -m pytest -q -x -p no:cacheprovider "${files[@]}"
        pytest_verdict tests tests "$secs"
    fi
fi

step b2 "dxtrain tests whose imports are present"
if [ "$GPU" != 1 ]; then
    status "dxtrain tests: SKIPPED (no usable CUDA GPU)"
elif [ "${GPU_CHECK_DXTRAIN:-1}" = 0 ]; then
    status "dxtrain tests: SKIPPED (GPU_CHECK_DXTRAIN=0)"
elif [ "$HAVE_PYTEST" != 1 ] || [ "$HAVE_TORCH" != 1 ]; then
    status "dxtrain tests: SKIPPED (pytest or torch does not import)"
else
    files=()
    for f in tests/test_dxtrain_*.py; do
        if [ "$f" = tests/test_dxtrain_cli.py ] && [ "$HAVE_CLICK" != 1 ]; then echo "left out: $f (click missing)"; continue; fi
        files+=("$f")
    done
    [ "$HAVE_H5PY" = 1 ] || echo "h5py missing: the tests that read HDF5 skip themselves"
    secs=$(allow "$T_DXTRAIN" $((T_BENCH + 25)))
    if [ "$secs" -lt 20 ]; then
        status "dxtrain tests: SKIPPED (too little time left before the deadline)"
    else
        run_timed dxtrain "$secs" "$PY" -m pytest -q -x -p no:cacheprovider "${files[@]}"
        pytest_verdict "dxtrain tests" dxtrain "$secs"
    fi
fi

# ------------------------------------------------------------------------------------------
step c "benchmark grid (bench/field.py --suite grid)"
if [ "$GPU" = 1 ]; then
    RES="$LOGDIR/field-grid-$GPU_KIND.json"  # fresh: an older bench/results file cannot pass for this run's
    secs=$(allow "$T_BENCH" 15)
    run_timed bench "$secs" "$PY" bench/field.py --suite grid --device cuda --out "$RES"
    if [ -f "$RES" ]; then cp -f "$RES" bench/results/; fi
    if [ "$RC" = 0 ]; then status "benchmark: done -> bench/results/$(basename "$RES")"
    elif [ -f "$RES" ]; then FAILED=1; status "benchmark: exit $RC; the shapes it finished are in bench/results/$(basename "$RES")"
    else FAILED=1; status "benchmark: FAILED, exit $RC, no results (see bench.log)"; RES=""; fi
elif [ "${GPU_CHECK_CPU_SMOKE:-1}" = 0 ]; then
    status "benchmark: SKIPPED (no usable CUDA GPU; GPU_CHECK_CPU_SMOKE=0)"
else
    echo "no usable CUDA GPU: the GPU grid is skipped; a tiny CPU grid checks the pipeline instead (dry run)"
    RES="$LOGDIR/field-grid-cpu-dryrun.json"
    secs=$(allow 120 15)
    run_timed bench "$secs" "$PY" bench/field.py --suite grid --device cpu --grid 32x256x16x32 \
        --methods peer dxfield fused projected attraction-bf16 --repeats 1 --no-memory --pause 0 --out "$RES"
    if [ "$RC" = 0 ]; then status "benchmark: SKIPPED on the GPU; CPU dry run done (fused and bf16 rows are errors on a CPU)"
    else FAILED=1; status "benchmark: CPU dry run FAILED, exit $RC"; RES=""; fi
fi

# ------------------------------------------------------------------------------------------
step d "copy results to \$OUT"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    copied=()
    for f in "$RES" "$LOGDIR/tests.log" "$LOGDIR/dxtrain.log" "$LOGDIR/bench.log"; do
        if [ -n "$f" ] && [ -f "$f" ]; then cp -f "$f" "$OUT/" && copied+=("$(basename "$f")"); fi
    done
    status "copied to \$OUT: ${copied[*]:-nothing}"
else
    echo "OUT is not set: nothing to copy (logs in $LOGDIR)"
fi

# ------------------------------------------------------------------------------------------
step e "summary"
for line in "${STATUS[@]}"; do echo "- $line"; done
echo "- logs: $LOGDIR; total ${SECONDS} s; exit $FAILED"
echo
if [ -n "$RES" ] && [ -f "$RES" ]; then
    timeout 30 "$PY" bench/field.py --summarize "$RES" || echo "(the summary could not be printed)"
else
    echo "(no benchmark results to summarise)"
fi
exit "$FAILED"
