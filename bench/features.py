"""Benchmark: the real data's feature file and summaries against data size -- throughput and peak memory.

For each size in ``--sizes`` it writes a synthetic CIFAR-10 folder (32x32x3 uint8 images of 10
classes in the CIFAR Python format: ``data_batch_1..5`` and ``test_batch``), then, in a fresh
process, does what ``dxtrain train`` does before its first step, one phase after the other:

1. ``features`` -- the feature file of the training split through the encoder (``--encoder``,
   ``--encoder-weights``, ``--encoder-size``), chunk by chunk (``dxtrain.realfeats``);
2. ``summaries`` -- the projected field's summaries, streamed from the file (``--feature-ram 1KiB``
   by default: nothing is read into RAM whole);
3. ``train`` -- ``--train-steps`` steps of ``dxtrain train`` with that file and those summaries
   (positives and the correction's sample read from the file by rows).

It reports the images per second of the feature build, each phase's time, and the process's peak
resident memory (``VmHWM``) after each phase, so that growth with the data size shows.  Results
go to ``bench/results/features-<host>.json`` and a markdown table next to it.

Examples::

    python bench/features.py                                   # 10k and 50k images, builtin encoder
    python bench/features.py --sizes 2000 --train-steps 2      # a quick look
    python bench/features.py --encoder timm:resnet10t --encoder-weights w.safetensors --encoder-size 32
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import run_isolated, status_kib, write_json_atomic  # noqa: E402

PER_BATCH = 5  # CIFAR-10's five training batches
TEST_IMAGES = 1000  # the test batch (small: only the training split is measured)


def write_cifar(folder: Path, n_train: int, seed: int = 0) -> None:
    """A synthetic CIFAR-10 folder: per class a colour and a stripe pattern, plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(40, 216, (10, 3))
    per = [n_train // PER_BATCH + (i < n_train % PER_BATCH) for i in range(PER_BATCH)]
    yy, xx = np.mgrid[:32, :32]
    for name, n in [(f"data_batch_{i + 1}", k) for i, k in enumerate(per)] + [("test_batch", TEST_IMAGES)]:
        labels = rng.integers(0, 10, n)
        stripes = ((xx[None] * (1 + labels[:, None, None] % 4) + yy[None] * (labels[:, None, None] // 4)) % 8 < 4)
        img = colours[labels][:, :, None, None] * (0.6 + 0.4 * stripes[:, None])
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels.tolist(),
                         b"data": img.reshape(n, 3072)}, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, fh, protocol=2)


def peak_mib() -> float:
    return status_kib("VmHWM")["VmHWM"] / 1024


def measure(data: str, work: str, opts: dict) -> dict:
    """The three phases in this (fresh) process; times and peak RSS after each."""
    import dxtrain  # noqa: F401  (thread-pool settings before torch)
    import torch

    from dxtrain.train import TrainConfig, build_summaries, make_feature_groups, real_features, setup, train

    torch.set_num_threads(os.cpu_count() or 1)
    out = {"rss_start_mib": peak_mib()}
    cfg = TrainConfig(data=data, out=os.path.join(work, "run"), features=os.path.join(work, "features.h5"),
                      feature_ram=opts["feature_ram"], encoder=opts["encoder"],
                      encoder_weights=opts["encoder_weights"], encoder_size=opts["encoder_size"],
                      steps=opts["train_steps"], device="cpu", evaluate=False, progress=False,
                      sample_every=10 ** 6, checkpoint_every=10 ** 6, fidelity_every=10 ** 6,
                      cache=os.path.join(work, "summaries"))
    train_ds, _, cond = setup(cfg)
    groups = make_feature_groups(cfg, train_ds, torch.device("cpu"))
    out.update(n=len(train_ds), groups=len(groups.names), group_sizes=groups.describe())
    t0 = time.perf_counter()
    real = real_features(cfg, groups, train_ds, torch.device("cpu"))
    out["features_s"] = time.perf_counter() - t0
    out["images_per_s"] = len(train_ds) / out["features_s"]
    out["features_in_ram"] = real.in_ram
    out["feature_file_mib"] = os.path.getsize(cfg.features) / 2 ** 20
    out["rss_after_features_mib"] = peak_mib()
    t0 = time.perf_counter()
    build_summaries(cfg, real.arrays, train_ds.labels if cond else None, log=None).save(cfg.cache)
    out["summaries_s"] = time.perf_counter() - t0
    out["rss_after_summaries_mib"] = peak_mib()
    real.close()
    if opts["train_steps"]:
        t0 = time.perf_counter()
        result = train(cfg, log=lambda m: None)
        out["train_s"] = time.perf_counter() - t0
        out["train_steps"] = int(result["step"])
        out["rss_after_train_mib"] = peak_mib()
    return out


def render(rows: list[dict], args) -> str:
    head = (f"# bench/features.py: feature file and summaries against data size\n\n"
            f"encoder `{args.encoder}`" + (f" at {args.encoder_size} px" if args.encoder_size else "")
            + f", feature RAM {args.feature_ram}, {args.train_steps} training steps; synthetic CIFAR-10 "
              "folders (32x32x3 uint8, 10 classes, CIFAR Python format). Peak RSS is the process's VmHWM "
              "after each phase.\n\n")
    lines = ["| training images | groups | feature build (s) | images/s | file (MiB) | summaries (s) | "
             "train (s) | peak RSS: start | after features | after summaries | after training (MiB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('size')} | error: {r['error']} |" + " |" * 9)
            continue
        lines.append(f"| {r['n']} | {r['groups']} | {r['features_s']:.1f} | {r['images_per_s']:.0f} | "
                     f"{r['feature_file_mib']:.0f} | {r['summaries_s']:.1f} | {r.get('train_s', float('nan')):.1f} | "
                     f"{r['rss_start_mib']:.0f} | {r['rss_after_features_mib']:.0f} | "
                     f"{r['rss_after_summaries_mib']:.0f} | {r.get('rss_after_train_mib', float('nan')):.0f} |")
    groups = next((r["group_sizes"] for r in rows if "group_sizes" in r), "")
    return head + "\n".join(lines) + (f"\n\nFeature groups: {groups}.\n" if groups else "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000], help="training images per folder")
    p.add_argument("--encoder", default="builtin")
    p.add_argument("--encoder-weights", default=None)
    p.add_argument("--encoder-size", type=int, default=None)
    p.add_argument("--feature-ram", default="1KiB", help="features read into RAM up to this (default 1KiB: none)")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--work", default=None, help="folder for the data and files (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if any(s < 10 * PER_BATCH for s in args.sizes):
        p.error("--sizes: at least 50 images per folder")
    work = Path(args.work or tempfile.mkdtemp(prefix="dx-bench-features-"))
    opts = {"encoder": args.encoder, "encoder_weights": args.encoder_weights, "encoder_size": args.encoder_size,
            "feature_ram": args.feature_ram, "train_steps": args.train_steps}
    rows = []
    try:
        for size in args.sizes:
            folder, run = work / f"cifar-{size}", work / f"run-{size}"
            write_cifar(folder, size)
            run.mkdir(parents=True, exist_ok=True)
            r = run_isolated(measure, str(folder), str(run), opts)
            r["size"] = size
            rows.append(r)
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    table = render(rows, args)
    print(table)
    out = Path(args.out)
    name = f"features-cpu{os.cpu_count()}{args.tag}"
    write_json_atomic(out / f"{name}.json", {"benchmark": "features", "argv": sys.argv[1:], "rows": rows})
    (out / f"{name}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
