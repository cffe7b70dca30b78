"""The run folder: every file a training run writes or reads back, each written atomically.

A run folder holds ``config.json`` (the :class:`dxtrain.train.TrainConfig`),
``metrics.jsonl`` (one JSON object per logged step: step, wall-clock seconds of
training, loss, drift norm, seconds in the field, steps/s, fidelity
diagnostics), ``samples/step-*.png`` (the EMA generator at fixed noise),
``checkpoint.pt`` (weights, optimiser, EMA, every random stream, step and
elapsed time), ``summaries/`` (the projected field's, from
:class:`dxtrain.fields.ProjectedFieldSet`) and ``eval.json``.  Every write goes
through :mod:`dxfield.atomic`, so an interrupted run never leaves a
half-written file; on resume, metrics logged after the checkpoint are dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from dxfield.atomic import atomic_write

from .models import sample_noise

CONFIG, METRICS, CHECKPOINT, EVAL = "config.json", "metrics.jsonl", "checkpoint.pt", "eval.json"
SAMPLES, SUMMARIES = "samples", "summaries"


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON (NumPy scalars as floats), atomically."""
    atomic_write(path, lambda fh: json.dump(obj, fh, indent=1, default=float), "w")


def write_config(folder: str, cfg) -> None:
    """``config.json``: the run's configuration dataclass."""
    write_json(os.path.join(folder, CONFIG), asdict(cfg))


def write_eval(folder: str, report: dict) -> None:
    write_json(os.path.join(folder, EVAL), report)


# --------------------------------------------------------------------------- checkpoint


def read_checkpoint(folder: str) -> dict:
    """The folder's ``checkpoint.pt``, loaded on the CPU."""
    return torch.load(os.path.join(folder, CHECKPOINT), map_location="cpu", weights_only=False)


def start(folder: str, resume: bool) -> dict | None:
    """Create the run folder; the checkpoint to resume from, or None for a fresh run.

    A fresh run refuses a folder that already holds one, and ``resume`` a folder without a checkpoint.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CHECKPOINT)
    if resume and not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    if not resume and os.path.exists(path):
        raise FileExistsError(f"{folder} already holds a run (checkpoint.pt); pass --resume to continue it "
                              "or choose another --out")
    return read_checkpoint(folder) if resume else None


def save_checkpoint(folder: str, cfg, model, ema, opt, step: int, elapsed: float, rng, noise_rng, ds) -> None:
    """``checkpoint.pt``: everything :func:`restore_checkpoint` needs to continue exactly."""
    atomic_torch_save({
        "config": asdict(cfg), "generator": model.state_dict(), "ema": ema.state_dict(),
        "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
        "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state, "noise": noise_rng.get_state()},
        "data": {"name": ds.name, "kind": ds.kind, "shape": list(ds.shape), "num_classes": ds.num_classes},
    }, os.path.join(folder, CHECKPOINT))


def restore_checkpoint(ckpt: dict, model, ema, opt, rng=None, noise_rng=None) -> tuple[int, float]:
    """Load a checkpoint's weights, EMA, optimiser and torch RNG state, and the streams ``rng``
    (positives) and ``noise_rng`` where given; returns ``(step, elapsed)``."""
    model.load_state_dict(ckpt["generator"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if rng is not None:
        rng.bit_generator.state = ckpt["rng"]["numpy"]
    if noise_rng is not None:
        noise_rng.set_state(ckpt["rng"]["noise"])
    return int(ckpt["step"]), float(ckpt["elapsed"])


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """``metrics.jsonl`` opened for appending, one JSON object a line, flushed per row.

    ``resumed_at``: first drop the rows logged after that step (a crash after them, before
    the next checkpoint), so the steps stay increasing.  Disabled (ranks other than 0), it
    writes nothing.
    """

    def __init__(self, folder: str, *, enabled: bool = True, resumed_at: int | None = None):
        self.path, self.enabled, self.resumed_at = os.path.join(folder, METRICS), enabled, resumed_at
        self._fh = None

    def __enter__(self) -> "MetricsLog":
        if self.enabled:
            if self.resumed_at is not None:
                truncate_metrics(self.path, self.resumed_at)
            self._fh = open(self.path, "a")
        return self

    def write(self, row: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()

    def __exit__(self, *exc):
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        return False


def truncate_metrics(path: str, step: int) -> None:
    """Drop the metrics logged after ``step``; a line cut by a crash goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue
    atomic_write(path, lambda fh: fh.writelines(kept), "w")


# --------------------------------------------------------------------------- samples


def write_samples_png(path: str, x, ds, **grid) -> bool:
    """Samples ``x`` as a PNG: a grid for images (``grid``: :func:`image_grid` options), a scatter
    over the data for 2-D vectors; False (nothing written) for other vectors."""
    from .pictures import image_grid, scatter_image, write_png

    if ds.kind == "images":
        write_png(path, image_grid(x, scale=4 if max(ds.shape[1:]) <= 16 else 2, **grid))
    elif x.shape[1] == 2:
        write_png(path, scatter_image(x, reference=ds.x[:5000]))
    else:
        return False
    return True


def save_samples(model, noise, labels, ds, folder: str, step: int) -> str:
    """PNG of the EMA model's samples at fixed noise: a grid for images, a scatter for 2-D data."""
    os.makedirs(folder, exist_ok=True)
    with torch.no_grad():
        x = model(noise, labels).float().cpu().numpy()
    path = os.path.join(folder, f"step-{step:06d}.png")
    return path if write_samples_png(path, x, ds, nrow=10) else ""


class SampleSheet:
    """The run's ``samples/step-*.png``: one fixed batch of noise (and labels), drawn once, so the
    pictures show the same samples changing over training."""

    def __init__(self, folder: str, model, ds, num_classes: int, device):
        n = 100 if ds.kind == "images" else 2000  # a 10 x 10 grid, or a scatter
        self.noise = sample_noise(model, n, torch.Generator().manual_seed(12345), device=device)
        self.labels = torch.arange(n, device=device) % num_classes if num_classes else None
        self.folder, self.ds = os.path.join(folder, SAMPLES), ds

    def save(self, model, step: int) -> str:
        return save_samples(model, self.noise, self.labels, self.ds, self.folder, step)
