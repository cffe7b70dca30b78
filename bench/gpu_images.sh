#!/usr/bin/env bash
# bench/gpu_images.sh -- the image bench at CIFAR-10's size on a lent GPU (H100 / H200), one shot.
#
# Standard drifting (--field exact, --positives 1024) against DriftXpress (--field projected) at equal
# wall-clock, interleaved in time, on the synthetic 32x32 image bench at CIFAR-10's size (50,000 training
# images of 3x32x32, class-conditional; bench/suite.py "shapes-32px-cifar"), with the UNet generator under
# bf16 autocast (the fields stay float32) and the builtin encoder; nothing is installed or downloaded
# (PYTHONPATH is the repository root).  It reports, for both methods:
#
#   * steps/s and the share of a step's time spent in the field (field_s x steps/s of each run);
#   * time-to-quality: the time DriftXpress needs to reach standard drifting's final quality (energy
#     distance per class to held-out images), its ratio, and the final qualities at equal budget;
#   * the curves (PNG) and the JSON in bench/results/, copied to $OUT when it is set.
#
#   bash bench/gpu_images.sh                         # ~8 min: 2 x 100 s of training, set-up, 2 x 6 evaluations
#   GPU_IMAGES_BUDGET=60 GPU_IMAGES_WIDTH=32 bash bench/gpu_images.sh
#
# Without a GPU it says so and runs the CPU smoke version (--quick, tiny UNet) so the script itself is
# checked; its numbers mean nothing.  Each evaluation scores 4000 samples on the CPU (energy distance per
# class, 3072-D), about 15 s.  Environment: PYTHON, OUT, GPU_IMAGES_BUDGET (100),
# GPU_IMAGES_WIDTH (UNet width, 64), GPU_IMAGES_POSITIVES (1024), GPU_IMAGES_TIMEOUT (560 s).
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
BUDGET=${GPU_IMAGES_BUDGET:-100}
WIDTH=${GPU_IMAGES_WIDTH:-64}
POSITIVES=${GPU_IMAGES_POSITIVES:-1024}
LIMIT=${GPU_IMAGES_TIMEOUT:-560}

nvidia-smi -L 2>/dev/null || echo "nvidia-smi: no GPU listed"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    ARGS=(--bench shapes-32px-cifar --device cuda --seeds 1 --budget "$BUDGET" --evals 6 --positives "$POSITIVES"
          --common "generator=unet,gen_width=$WIDTH,precision=bf16" --tag gpu)
else
    echo "no CUDA device: a CPU smoke run of the script (--quick); its numbers mean nothing"
    ARGS=(--bench shapes-32px --device cpu --quick --positives 256 --common "generator=unet,gen_width=8,gen_depth=1"
          --tag gpu-smoke)
fi
timeout "$LIMIT" "$PY" bench/train.py "${ARGS[@]}"
status=$?
"$PY" - <<'PY'
import glob, json, os
for path in sorted(glob.glob("bench/results/train-shapes-32px*-gpu*.json")):
    r = json.load(open(path))
    print(f"\n== {os.path.basename(path)} ({r.get('host_kind')}, baseline {r.get('baseline')})")
    for seed, runs in sorted(r.get("runs", {}).items()):
        for method, run in runs.items():
            if "error" in run or not run.get("steps"):
                print(f"  {method}: {run.get('error', 'no steps')}")
                continue
            step_s = run["train_s"] / run["steps"]
            share = (run.get("field_s") or 0.0) / step_s
            print(f"  seed {seed} {method:12s} {run['steps']:6d} steps  {run['steps_per_s']:7.2f} steps/s  "
                  f"field {100 * share:4.1f}% of a step  final {run['records'][-1]['quality']:.4g}")
    for method, s in r.get("summary", {}).items():
        print(f"  {method}: time-to-quality ratio {s.get('ratio_text')}, equal budget {s.get('final_ratio_median')}")
PY
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && cp bench/results/train-shapes-32px*-gpu* "$OUT"/ 2>/dev/null
fi
exit $status
