"""The benches of ``bench/train.py``: data sets of different shape, and how quality is scored on each.

Every bench is a data set that dxtrain trains on with its *defaults* (one set
of defaults for all benches, no per-bench flags) and a quality score, lower
is better.  The data are generated here, deterministically from a structure
seed per bench (the points themselves from the bench seed), and written as a
``.npz`` file that dxtrain reads like any user's file; the digits are dxtrain's
embedded set.  The benches differ in what makes drifting hard:

==================  =========================================================
``mix8-2d``         8 equal Gaussian modes on a circle, 2-D, unconditional
``mix64-32d``       64 equal-weight modes, 32-D, unconditional (the mixture of
                    the issue that showed standard drifting winning)
``mix200-128d``     200 modes with Zipf weights (heaviest 24x the lightest...),
                    128-D, unconditional
``cmix10-64d``      10 classes, each a skewed mixture of 6 modes, 64-D,
                    class-conditional
``rings-2d``        a manifold: three concentric noisy rings, 2-D
``roll-16d``        a manifold: a swiss-roll sheet embedded in 16-D
``digits``          dxtrain's embedded 8x8 digits, class-conditional conv
                    generator, builtin frozen encoder (dxtrain ``train``
                    with no options)
``shapes-12px``     synthetic 3x12x12 images of 5 shape classes (disc, square,
                    ring, cross, bar) with random colour, size and place,
                    class-conditional, builtin encoder
==================  =========================================================

Quality: the energy distance (docs: ``dxtrain.evaluate.energy_distance``) of
generated samples to the held-out test split, in the data space (pixels for
the shapes); for class-conditional benches the mean over classes of the
per-class energy distance (a generator that mixes classes up pays for it);
``FD_digits`` on the digits, exactly as ``dxtrain eval`` computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

EVAL_SAMPLES = 4000  # generated samples per evaluation (vectors, shapes)
REFERENCE_SAMPLES = 4000  # held-out real samples they are compared with (at most)


@dataclass(frozen=True)
class Bench:
    name: str
    about: str
    make: object  # (rng) -> (x, labels or None), or None for an embedded data set
    data: str | None = None  # embedded dxtrain data set name (digits)
    conditional: bool = False
    metric: str = "energy_distance"
    budget: float = 30.0  # seconds of training per run (the suite's default; ~2.5-4 min per bench and seed)
    extras: tuple = field(default_factory=tuple)

    @property
    def metric_label(self) -> str:
        if self.metric == "FD_digits":
            return "FD_digits"
        return "energy distance to held-out data" + (" (mean over classes)" if self.conditional else "")


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def gaussian_mixture(rng, structure: np.random.Generator, *, n: int, modes: int, dim: int, weights: str,
                     sigma: float, classes: int = 0):
    """``n`` points of a mixture of isotropic Gaussians whose centres are standard normal in ``dim``
    dimensions (drawn from ``structure``); ``weights`` "equal" or "zipf" (the r-th heaviest ~ 1/r);
    with ``classes`` the modes are dealt round-robin to classes and the labels returned."""
    centres = structure.standard_normal((modes, dim))
    if dim <= 2:  # on a circle of radius 2, evenly spaced (the classic 8 Gaussians)
        ang = 2 * np.pi * np.arange(modes) / modes
        centres = 2.0 * np.stack([np.cos(ang), np.sin(ang)], 1)[:, :dim]
    w = np.ones(modes) if weights == "equal" else 1.0 / np.arange(1, modes + 1)
    w = structure.permutation(w / w.sum())
    mode = rng.choice(modes, size=n, p=w)
    x = centres[mode] + sigma * rng.standard_normal((n, dim))
    labels = (mode % classes).astype(np.int64) if classes else None
    return x.astype(np.float32), labels


def rings(rng, n: int):
    r = rng.choice([1.0, 2.0, 3.0], size=n, p=[1 / 6, 2 / 6, 3 / 6])  # uniform density along the rings
    a = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([r * np.cos(a), r * np.sin(a)], 1) + 0.06 * rng.standard_normal((n, 2))
    return x.astype(np.float32), None


def swiss_roll(rng, structure: np.random.Generator, n: int, dim: int = 16):
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    h = rng.uniform(-1, 1, n) * 4
    sheet = np.stack([t * np.cos(t), h, t * np.sin(t)], 1) / 4.0
    basis, _ = np.linalg.qr(structure.standard_normal((dim, 3)))  # an orthonormal 3-frame in `dim` dims
    x = sheet @ basis.T + 0.03 * rng.standard_normal((n, dim))
    return x.astype(np.float32), None


SHAPES = ("disc", "square", "ring", "cross", "bar")


def shapes(rng, n: int, size: int = 12):
    """``n`` RGB images ``(n, 3, size, size)`` in [-1, 1] of one of :data:`SHAPES` each, with a random
    centre, radius and colour on a dark background; labels = the shape."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    labels = rng.integers(0, len(SHAPES), n)
    cy, cx = (rng.uniform(0.3, 0.7, (2, n)) * size).astype(np.float32)
    rad = (rng.uniform(0.18, 0.32, n) * size).astype(np.float32)
    colour = rng.uniform(0.2, 1.0, (n, 3)).astype(np.float32)
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    r = rad[:, None, None]
    masks = {
        0: np.hypot(dy, dx) <= r,
        1: (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r),
        2: np.abs(np.hypot(dy, dx) - 0.8 * r) <= 0.3 * r + 0.5,
        3: ((np.abs(dy) <= 0.3 * r + 0.3) | (np.abs(dx) <= 0.3 * r + 0.3)) & (np.maximum(np.abs(dy), np.abs(dx)) <= r),
        4: (np.abs(dy) <= 0.3 * r + 0.3) & (np.abs(dx) <= 1.2 * r),
    }
    mask = np.zeros((n, size, size), dtype=bool)
    for k, m in masks.items():
        mask |= m & (labels == k)[:, None, None]
    img = 0.08 * rng.standard_normal((n, 3, size, size)).astype(np.float32) - 0.9
    img += mask[:, None] * (colour[:, :, None, None] * 1.8)
    return np.clip(img, -1, 1).astype(np.float32), labels.astype(np.int64)


def _mix(structure_of: str | None = None, **kw):
    """A bench's ``make``: a :func:`gaussian_mixture` of ``kw``; ``structure_of``: another bench's name, whose
    structure (centres, weights) it draws from instead of its own."""
    def make(rng, structure):
        return gaussian_mixture(rng, _structure(structure_of) if structure_of else structure, **kw)
    return make


MIX64 = dict(modes=64, dim=32, weights="equal", sigma=0.3)  # mix64-32d's mixture, also the data-size axis's


BENCHES = {b.name: b for b in (
    Bench("mix8-2d", "8 equal modes on a circle, 2-D, unconditional",
          _mix(n=30000, modes=8, dim=2, weights="equal", sigma=0.1), budget=20.0),
    Bench("mix64-32d", "64 equal-weight modes, 32-D, unconditional",
          _mix(n=40000, **MIX64), budget=30.0),
    Bench("mix200-128d", "200 modes, Zipf weights, 128-D, unconditional",
          _mix(n=60000, modes=200, dim=128, weights="zipf", sigma=0.4), budget=45.0),
    Bench("cmix10-64d", "10 classes x 6 modes each (skewed), 64-D, class-conditional",
          _mix(n=40000, modes=60, dim=64, weights="zipf", sigma=0.3, classes=10), conditional=True, budget=45.0),
    Bench("rings-2d", "three concentric noisy rings (a 1-D manifold), 2-D, unconditional",
          lambda rng, structure: rings(rng, 30000), budget=20.0),
    Bench("roll-16d", "a swiss-roll sheet (a 2-D manifold) embedded in 16-D, unconditional",
          lambda rng, structure: swiss_roll(rng, structure, 30000), budget=30.0),
    Bench("digits", "dxtrain's embedded 8x8 digits: `dxtrain train` with no options",
          None, data="digits", conditional=True, metric="FD_digits", budget=60.0, extras=("precision", "recall")),
    Bench("shapes-12px", "synthetic 3x12x12 images of 5 shapes, class-conditional, builtin encoder",
          lambda rng, structure: shapes(rng, 12000), conditional=True, budget=60.0),
)}

# The crossover study (`bench/train.py --bench crossover`): one axis at a time, where does DriftXpress start
# to win?  Unconditional: the number of equal modes in 32-D, against the positives a step can afford (a
# mode holds P / modes of them).  Conditional: the number of classes (4 modes each, 32-D), which splits
# the positives (P / classes per class) and the batch alike.  Dimension: mix200's shape (200 Zipf modes,
# unconditional) in 32 to 1024 dimensions, where an exact step's distances grow with P x D and the
# generator's cost with D alone, so the field's share of a step -- the bound of docs/design.md 8.9 -- grows.
# Data size: mix64-32d's 64 modes (the same centres) with 1,250 to 40,000 points; at the smallest the
# baseline's mini-batch is most of the data set, and the whole set's summaries have little to add.
CROSSOVER = {b.name: b for b in [
    Bench(f"modes{k}-32d", f"{k} equal modes, 32-D, unconditional (crossover: modes)",
          _mix(n=40000, modes=k, dim=32, weights="equal", sigma=0.3), budget=30.0)
    for k in (4, 16, 64, 256)] + [
    Bench(f"classes{k}-32d", f"{k} classes x 4 modes, 32-D, class-conditional (crossover: classes)",
          _mix(n=40000, modes=4 * k, dim=32, weights="equal", sigma=0.3, classes=k), conditional=True,
          budget=30.0)
    for k in (2, 8, 16, 32, 64)] + [
    Bench(f"dim{d}-zipf200", f"200 modes, Zipf weights, {d}-D, unconditional (crossover: dimension)",
          _mix(n=60000, modes=200, dim=d, weights="zipf", sigma=0.4), budget=45.0)
    for d in (32, 128, 512, 1024)] + [
    Bench(f"size{n}-mix64", f"mix64-32d's 64 modes with {n:,} points (crossover: data size)",
          _mix(structure_of="mix64-32d", n=n, **MIX64), budget=30.0)
    for n in (1250, 5000, 10000, 40000)]}
# The image bench at the paper's image size (`bench/train.py --bench images`): 32x32 RGB, class-conditional,
# dxtrain's defaults (the conv generator and builtin encoder; `--variant unet=generator=unet,gen_width=32`
# and a timm encoder through --variant are the paper's setting at a CPU's scale).
IMAGES = {b.name: b for b in [
    Bench("shapes-32px", "synthetic 3x32x32 images of 5 shapes, class-conditional, builtin encoder (image bench)",
          lambda rng, structure: shapes(rng, 10000, size=32), conditional=True, budget=120.0),
    Bench("shapes-32px-cifar", "the image bench at CIFAR-10's size: 50,000 training images of 3x32x32 "
          "(bench/gpu_images.sh)", lambda rng, structure: shapes(rng, 58824, size=32), conditional=True,
          budget=150.0)]}
ALL = {**BENCHES, **CROSSOVER, **IMAGES}

STRUCTURE_SEED = 7919  # fixes every bench's structure (centres, weights, embedding); the seed draws the points


def _structure(name: str) -> np.random.Generator:
    """The generator of a bench's structure (centres, weights, embedding): fixed by its name."""
    return np.random.default_rng([STRUCTURE_SEED, sum(map(ord, name))])


def write_data(bench: Bench, path, seed: int = 0) -> str:
    """The bench's data as ``.npz`` (``x`` and, when labelled, ``labels``) at ``path``; the embedded name
    for an embedded bench.  The same ``seed`` gives the same file."""
    if bench.data is not None:
        return bench.data
    x, labels = bench.make(np.random.default_rng([seed, 17]), _structure(bench.name))
    arrays = {"x": x} if labels is None else {"x": x, "labels": labels}
    np.savez(path, **arrays)
    return str(path)


# --------------------------------------------------------------------------------------
# quality
# --------------------------------------------------------------------------------------
def score(bench: Bench, info, seed: int, *, quick: bool = False) -> tuple[dict, dict]:
    """The bench's scores of ``info.ema_model`` now, and the floor (held-out real data in its place)."""
    from dxtrain.train import classifier_cache, generate

    if bench.metric == "FD_digits":
        from dxtrain.evaluate import evaluate_samples

        # exactly dxtrain's final evaluation (train.py, `dxtrain eval`): 2 x n_test samples, seed + 7
        x = generate(info.ema_model, 2 * len(info.test_ds), info.num_classes, info.device, seed=seed + 7)
        report = evaluate_samples(x, info.train_ds, info.test_ds, classifier_cache=classifier_cache(), seed=seed)
        keys = (bench.metric,) + bench.extras
        return ({k: report.get(k) for k in keys}, {k: report["floor"].get(k) for k in keys})
    n = 800 if quick else EVAL_SAMPLES
    k = info.num_classes if bench.conditional else 0
    x = generate(info.ema_model, n, k, info.device, seed=seed + 7)
    labels = np.arange(n) % k if k else None
    test, rest = info.test_ds, info.train_ds
    test_x = np.asarray(test.x)  # uint8 images are read here (dxtrain.pixels)
    value = class_energy(x, labels, test_x, test.labels if k else None, seed)
    # the floor: training data in the generator's place, same sizes
    pick = np.random.default_rng(seed + 3).choice(len(rest), size=min(n, len(rest)), replace=False)
    floor = class_energy(np.asarray(rest.x[pick]), rest.labels[pick] if k else None, test_x,
                         test.labels if k else None, seed)
    return {bench.metric: value}, {bench.metric: floor}


def class_energy(x, labels, ref, ref_labels, seed: int) -> float:
    """Energy distance of ``x`` to ``ref`` (flattened), or with labels the mean over classes of the
    per-class energy distance (classes weighted by their share of ``ref``)."""
    from dxtrain.evaluate import energy_distance

    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    if labels is None:
        return energy_distance(x, ref, max_points=REFERENCE_SAMPLES, seed=seed)
    total, weight = 0.0, 0
    for c in np.unique(ref_labels):
        a, b = x[labels == c], ref[ref_labels == c]
        if len(a) < 2 or len(b) < 2:
            continue
        total += len(b) * energy_distance(a, b, max_points=REFERENCE_SAMPLES, seed=seed)
        weight += len(b)
    return total / weight if weight else math.nan
