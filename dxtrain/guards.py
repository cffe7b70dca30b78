"""Clear answers before and during a run: settings that cannot work are refused, adapted ones announced.

The trainer (:mod:`dxtrain.train`) calls these at set-up and in its loop:

* :func:`need_cupy` -- a CUDA device needs CuPy (dxfield's ``gpu`` extra), checked before any work;
* :func:`check_batch` -- a batch that leaves a generated sample alone in its class under the
  bidirectional field gives it no drift at all (docs/design.md 2.1, consequence 4): refused,
  naming the batch, the classes and the minimum; a batch that does not split evenly is announced;
* :func:`check_classes` -- a class without training samples (nothing can attract its samples);
* :func:`announce_draws` -- the real samples drawn per step (positives, correction) as used;
* :func:`open_summaries` -- summaries from ``--cache`` or the run folder compared with the run's
  settings: the run's own folder left by an earlier run with other settings is refused, an
  explicit ``--cache`` is used as it is, announced, and its values recorded;
* :class:`ZeroDrift` -- stops a run whose drift is exactly zero on every one of its first steps.

Every refusal is a ``ValueError`` whose message names the setting to change (the CLI prints it
without a traceback); every announcement goes once to the run's log.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math

import numpy as np

from .config import per_class
from .fields import ProjectedFieldSet

GPU_EXTRA = "driftxpress[gpu]"  # pyproject.toml's extra with CuPy
MIN_PER_CLASS = 2  # generated samples per class per step the bidirectional field needs
ZERO_DRIFT_STEPS = 25  # the first steps a run's drift must not be exactly zero on all of


class NoDrift(ValueError):
    """The drift was exactly zero on every step of the first window: the run learns nothing."""


def cupy_problem() -> str | None:
    """Why CuPy cannot be used here (not installed, or its import fails), or None."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    try:
        importlib.import_module("cupy")
    except Exception as exc:  # a broken install raises anything from ImportError to a CUDA error
        return f"CuPy does not import ({type(exc).__name__}: {exc})"
    return None


def need_cupy(device) -> None:
    """Refuse a CUDA ``device`` when CuPy is missing: dxfield works on torch's GPU tensors through it."""
    if getattr(device, "type", str(device)) != "cuda":
        return
    problem = cupy_problem()
    if problem:
        raise ValueError(f"device {device} needs CuPy for the drifting field on the GPU, but {problem}: "
                         f"pip install \"{GPU_EXTRA}\" (CUDA 12; another CUDA takes its own wheel, e.g. "
                         "cupy-cuda13x), or train on the CPU with --device cpu")


def check_batch(cfg, num_classes: int, log, world_size: int = 1) -> None:
    """Refuse a batch under :data:`MIN_PER_CLASS` per class with the bidirectional field; announce rounding."""
    where = " per process" if world_size > 1 else ""
    if not num_classes:
        if cfg.batch < MIN_PER_CLASS and cfg.normalization == "bidirectional":
            raise ValueError(f"batch={cfg.batch}{where}: a generated sample alone in the batch has nothing to "
                             "repel it, so under the bidirectional field its drift is exactly 0 and the run "
                             f"learns nothing; use --batch {MIN_PER_CLASS} or more (or --normalization row)")
        return
    per = per_class(cfg.batch, num_classes)
    if per < MIN_PER_CLASS and cfg.normalization == "bidirectional":
        raise ValueError(
            f"batch={cfg.batch}{where} over {num_classes} classes gives {per} generated sample(s) per class "
            f"(batch // classes), but the bidirectional field needs at least {MIN_PER_CLASS} per class: a "
            "sample alone in its class has nothing to repel it, so its drift is exactly 0 and the run learns "
            f"nothing; use --batch {MIN_PER_CLASS * num_classes} or more (or --normalization row, or "
            "--unconditional)")
    if per * num_classes != cfg.batch:
        log(f"batch: {cfg.batch} over {num_classes} classes is {per} generated samples per class, "
            f"{per * num_classes} per step{where}")


def check_guidance(cfg, num_classes: int) -> None:
    """Refuse guidance where it has no meaning: without classes, or with negatives the field cannot take."""
    if not cfg.guidance:
        return
    if num_classes < 2:
        raise ValueError(f"--guidance needs class-conditional data with 2 classes or more (this run has {num_classes}"
                         "): guidance pushes each class away from all of them; drop --guidance, or train on "
                         "labelled data without --unconditional")
    if cfg.field == "projected" and cfg.repulsion != "exact":
        raise ValueError(f"--guidance adds weighted unconditional negatives to the repulsion, which --repulsion "
                         f"{cfg.repulsion} cannot take: use --repulsion exact")


def check_evaluable(cfg, test_ds) -> None:
    """Refuse, before training, a run whose final evaluation could not run: fewer than 2 test samples."""
    if cfg.evaluate and len(test_ds) < 2:
        raise ValueError(f"the test split holds {len(test_ds)} sample(s) (test_fraction={cfg.test_fraction:g}), but "
                         "the final evaluation needs at least 2: raise --test-fraction, give more data, or pass "
                         "--no-eval")


def check_classes(labels, num_classes: int) -> None:
    """Refuse classes without any training sample: their generated samples would meet no real one."""
    if not num_classes:
        return
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        raise ValueError(f"class(es) {empty[:10]} of {num_classes} have no sample in the training split, so "
                         "nothing would attract their generated samples; give every class at least one sample "
                         "(or train with --unconditional)")


def announce_draws(cfg, field, labels, num_classes: int, n_real: int, log) -> None:
    """Announce, once, the real samples a step draws as used (exact field's positives, the correction's)."""
    if cfg.field == "exact":
        what = "positives"
    elif getattr(field, "correction", False):
        what = "correction sample" + ("" if cfg.correction_sample else " (--positives)")
    else:
        return
    n = cfg.real_per_step
    if not num_classes:
        if n > n_real:
            log(f"{what}: {n} asked for, the training split holds {n_real}: all {n_real} each step")
        return
    per = per_class(n, num_classes)
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    short = {c: int(k) for c, k in enumerate(counts) if k < per}
    if per * num_classes == n and not short:
        return
    used = int(np.minimum(counts, per).sum())
    msg = f"{what}: {n} over {num_classes} classes is {per} real samples per class, {used} per step"
    if short:
        listed = ", ".join(f"class {c}: {k}" for c, k in list(short.items())[:10])
        msg += f" ({len(short)} class(es) hold fewer and give all theirs: {listed}{', ...' if len(short) > 10 else ''})"
    log(msg)


def open_summaries(cfg, cache: str, own: bool, expect: dict, feats: dict, log):
    """Load the summaries in ``cache``, checked against ``cfg``: ``(field, cfg as used)``.

    ``own``: the run folder's ``summaries/`` (left by an earlier run of this folder): any recorded
    setting that differs from ``cfg`` is refused, saying to delete or rename the folder.  Else (an
    explicit ``--cache``) the summaries are used as they are: differing landmarks and landmark
    method are announced and returned in ``cfg`` (for config.json); other temperatures are refused
    (they are the field's kernels, every step).
    """
    settings = ProjectedFieldSet.read_settings(cache)
    diffs = summaries_differences(settings, cfg)
    listed = "; ".join(f"{name}: {there!r} there, {here!r} in this run" for name, there, here in diffs)
    if own and diffs:
        raise ValueError(f"the summaries in {cache} were left by an earlier run with other settings ({listed}); "
                         f"delete or rename {cache} to build them afresh for this run, or pass --cache with "
                         "summaries that match")
    temps = [d for d in diffs if d[0] == "temperatures"]
    if temps:
        there = ",".join(f"{t:g}" for t in temps[0][1])
        raise ValueError(f"the summaries in {cache} were built with other temperatures ({there}, this run "
                         f"{','.join(f'{t:g}' for t in cfg.temperatures)}), which the field uses every step: "
                         f"rebuild them with `dxtrain summarize --temperatures ...` or pass --temperatures {there}")
    try:
        field = ProjectedFieldSet.load(cache, expect=expect, temperatures=cfg.temperatures, data=feats)
    except ValueError as exc:
        if own:
            raise ValueError(f"{exc} (these summaries were left in {cache} by an earlier run: delete or rename "
                             "the folder to build them afresh)") from None
        raise
    if settings is None:
        ms = [s.m for pf in field.fields.values() for s in pf.shards]
        log(f"note: the summaries in {cache} do not record how they were built (an older dxtrain): "
            f"{min(ms)}..{max(ms)} landmarks per shard, landmark method and seed unknown; --landmarks and "
            "--landmark-method do not apply to them")
    elif diffs:
        used = {name: there for name, there, _ in diffs if name in ("landmarks", "landmark_method")}
        log(f"using the summaries in {cache} as they were built, not as this run's options say ({listed})"
            + ("; config.json records the values used" if used else "")
            + ("; the seed chose their landmarks, this run's seed stays for the rest" if "seed" in
               {d[0] for d in diffs} else ""))
        cfg = dataclasses.replace(cfg, **used)
    log(f"loaded summaries from {cache}" + (" (left by an earlier run of this folder)" if own else ""))
    return field, cfg


def summaries_differences(settings: dict | None, cfg) -> list[tuple[str, object, object]]:
    """``(name, recorded, this run's)`` for each recorded build setting that differs from ``cfg``."""
    if not settings:
        return []
    out = []
    for name in ("landmarks", "landmark_method", "seed"):
        if name in settings and settings[name] != getattr(cfg, name):
            out.append((name, settings[name], getattr(cfg, name)))
    temps = settings.get("temperatures")
    if temps is not None and (len(temps) != len(cfg.temperatures) or not all(
            math.isclose(a, b, rel_tol=1e-12) for a, b in zip(temps, cfg.temperatures))):
        out.append(("temperatures", tuple(temps), tuple(cfg.temperatures)))
    return out


def announce_unused(cfg, given, log, own_split: bool = False) -> None:
    """Options given on purpose that this run does not use: the projected field's with ``exact``, and
    ``test_fraction`` with a data set's own test split."""
    if own_split and given and "test_fraction" in given:
        log("note: --test-fraction does not apply: this data set has its own test split")
    if cfg.field != "exact" or not given:
        return
    unused = sorted(set(given) & {"landmarks", "landmark_method", "cache", "repulsion", "correction",
                                  "correction_sample"})
    if unused:
        names = ", ".join("--" + n.replace("_", "-") for n in unused)
        log(f"note: {names} only appl{'ies' if len(unused) == 1 else 'y'} to --field projected; this run uses "
            "the exact field")


class ZeroDrift:
    """Watches the first :data:`ZERO_DRIFT_STEPS` steps (or the run's, if fewer): when the drift was exactly
    zero in every feature group at each of them, on every rank, :meth:`see` raises :class:`NoDrift`."""

    def __init__(self, cfg, steps: int = ZERO_DRIFT_STEPS):
        self.cfg, self.steps, self.seen, self.moved, self.done = cfg, int(steps), 0, False, False

    def see(self, drift_norm: float, final: bool, dist) -> None:
        """After a step: ``drift_norm`` (the mean over groups of the drift's RMS), ``final`` (the last step)."""
        if self.done:
            return
        self.seen += 1
        self.moved = self.moved or drift_norm != 0.0
        if self.seen < self.steps and not final:
            return
        self.done = True
        moved, = dist.agree(self.moved)  # the same answer on every rank (no rank left in a collective)
        if not moved:
            raise NoDrift(
                f"the drift was exactly 0 in every feature group at each of the first {self.seen} step(s), so the "
                "generator gets no gradient and the run would learn nothing; stopped. Check --batch (at least "
                f"{MIN_PER_CLASS} generated samples per class), --temperatures (kernel widths, relative to the "
                "feature scale) and the data and --encoder (features that never vary give no drift), then start "
                f"again with another --out or after removing {self.cfg.out}")
