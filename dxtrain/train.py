"""Training loop for one-step drifting generators, readable top to bottom.

This module owns a run's set-up (data, generator, optimiser, EMA, feature
groups, field, resume point) and the loop (:func:`train`); its settings are
:class:`dxtrain.config.TrainConfig` (re-exported here), the files of the run
folder are :mod:`dxtrain.rundir`'s, multi-process (torchrun) runs are
:mod:`dxtrain.ddp`'s.

One step: draw noise (and class labels), generate ``x = f(eps)``, extract the
feature groups, ask the field for the drift ``V`` of every group (dxfield, via
DLPack), and minimise ``sum_g MSE(phi_g(x)/S_g, stopgrad(phi_g(x)/S_g + V_g))``
with AdamW, gradient clipping and an EMA of the weights.

Two fields, one flag (``field``):

* ``"exact"`` -- standard drifting: Algorithm 2 against ``positives`` real
  samples drawn afresh every step (per class when conditional);
* ``"projected"`` -- DriftXpress: Nystrom summaries of the *whole* training set,
  built once before training (or loaded from ``dxtrain summarize``), exact
  repulsion within the batch.

Every ``log_every`` steps a row goes to ``metrics.jsonl``, every
``sample_every`` a picture to ``samples/``, every ``checkpoint_every`` (and at
the end, and on SIGINT/SIGTERM) ``checkpoint.pt``; ``eval.json`` at the end.
``resume=True`` continues exactly where the checkpoint stopped: weights,
optimiser, EMA, every random stream, step and elapsed time (the run folder's
lock, checksums and resume rules: :mod:`dxtrain.rundir`).  ``time_budget``
stops at a wall-clock budget (training time only, not periodic sampling or
checkpoint I/O), so methods can be compared at equal time.
Set-up refuses what cannot work (a batch leaving a sample alone in its class, CUDA without CuPy,
summaries built otherwise in the run folder) and announces what it adapts; the loop stops a run whose
drift is exactly zero on all of its first steps (:mod:`dxtrain.guards`).
``train(cfg, callback=f)`` calls ``f(StepInfo)`` after every step, outside the
timed part (e.g. to evaluate the EMA generator at chosen points of training
time, as ``bench/train.py`` does).  Under ``torchrun`` (``WORLD_SIZE > 1``)
each process runs one data-parallel rank: see :mod:`dxtrain.ddp`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from dxfield.projected import REPULSIONS

from . import guards, rundir
from .config import FIELDS, NORMALIZATIONS, PRECISIONS, TrainConfig
from .data import Dataset, load_dataset, train_test_split
from .ddp import DEBUG_DIR_ENV, Dist, process_group, rank_seed, stop_signals, write_weights_hash
from .evaluate import classifier_cache, default_samples, evaluate_run, evaluate_samples, main_score
from .features import FeatureGroups, load_encoder
from .guidance import Guide
from .fields import CORRECTION_BIAS_SHARE, CORRECTION_FIRST_CHECK, ExactField, ProjectedFieldSet, drift_loss
from .lock import RunLock
from .pretrained import is_pretrained_spec
from .models import EMA, MLPGenerator, generate, make_generator, sample_noise
from .realfeats import RealFeatures, run_features
from .rundir import save_samples

__all__ = ["DEBUG_DIR_ENV", "FIELDS", "NORMALIZATIONS", "PRECISIONS", "REPULSIONS", "StepInfo", "TrainConfig",
           "build_generator", "build_summaries", "class_labels", "classifier_cache", "evaluate_run", "generate",
           "make_feature_groups", "pick_device", "real_features", "resolve_encoder", "save_samples", "setup", "train"]


def resolve_encoder(spec: str, kind: str) -> str:
    """``"auto"``: the built-in frozen conv encoder for images, none for vectors."""
    if spec == "auto":
        return "builtin" if kind == "images" else "none"
    return spec


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} but torch sees no CUDA GPU; use --device cpu")
    return dev


def real_features(cfg: TrainConfig, groups: FeatureGroups, train_ds: Dataset, device, log=None,
                  dist: Dist | None = None) -> RealFeatures:
    """The training split's feature groups, computed once (:mod:`dxtrain.realfeats`: in RAM, or a
    feature file per data and encoder)."""
    bars = cfg.progress and (dist is None or dist.main) and sys.stderr.isatty()
    spec = (resolve_encoder(cfg.encoder, train_ds.kind) + (f" at {cfg.encoder_size}px" if cfg.encoder_size else "")
            + (" bf16" if cfg.precision == "bf16" else ""))
    return run_features(groups, spec, train_ds.x, device, path=cfg.features,
                        ram=cfg.feature_ram_bytes,
                        progress=bars, log=log, main=dist is None or dist.main,
                        wait=None if dist is None or not dist.enabled else lambda: dist.agree(True))


def make_feature_groups(cfg: TrainConfig, ds: Dataset, device) -> FeatureGroups:
    """The run's frozen feature groups (encoder resolved from the data kind; a pretrained one with its weights)."""
    spec = resolve_encoder(cfg.encoder, ds.kind)
    encoder = load_encoder(spec, weights=cfg.encoder_weights, size=cfg.encoder_size) if is_pretrained_spec(spec) else spec
    return FeatureGroups(ds.shape, encoder, max_locations=cfg.max_locations,
                         bf16=cfg.precision == "bf16").to(device)


def build_summaries(cfg: TrainConfig, feats: dict[str, np.ndarray], labels, log, progress: bool = False,
                    **sharding) -> ProjectedFieldSet:
    """The projected field's summaries of the real features, as configured (``progress``: dxfield's bars while
    streaming them; ``sharding``: DDP)."""
    return ProjectedFieldSet.build(feats, labels=labels, temperatures=cfg.temperatures, landmarks=cfg.landmarks,
                                   method=cfg.landmark_method, seed=cfg.seed, memory_budget=cfg.memory_budget,
                                   progress=progress, log=log, **sharding)


def setup(cfg: TrainConfig):
    """The train/test split of a config's data and whether the run is class-conditional
    (shared by train, summarize, sample and eval, so all see the same split)."""
    data = load_dataset(cfg.data, seed=cfg.seed, key=cfg.data_key, labels_key=cfg.labels_key)
    train_ds, test_ds = train_test_split(data, cfg.test_fraction, seed=cfg.seed)
    conditional = bool(cfg.conditional and train_ds.num_classes > 0)
    return train_ds, test_ds, conditional


def class_labels(batch: int, num_classes: int, device) -> torch.Tensor:
    """Balanced labels: ``batch // K`` of each class (at least one each)."""
    per = guards.per_class(batch, num_classes)
    return torch.arange(num_classes, device=device).repeat_interleave(per)


@dataclass
class StepInfo:
    """What a :func:`train` callback sees after a step (read-only by convention)."""

    step: int  # steps done so far
    elapsed: float  # seconds of training so far (the clock ``time_budget`` and metrics.jsonl's ``wall`` use)
    setup_s: float  # seconds from the call to the first step: data, models, summaries (projected field)
    final: bool  # the loop stops after this step (steps or time budget reached, or interrupted)
    ema_model: torch.nn.Module  # the EMA generator (what ``sample``/``eval`` and the final evaluation use)
    model: torch.nn.Module  # the generator being trained
    num_classes: int  # 0 when unconditional
    device: torch.device
    train_ds: Dataset
    test_ds: Dataset


def train(cfg: TrainConfig, *, resume: bool = False, given=None, log=None, callback=None) -> dict:
    """Run (or resume) training as configured; returns the final metrics.

    The run holds its folder's lock throughout (a second run there raises
    :class:`dxtrain.lock.RunFolderBusy`).  ``resume=True`` continues from the folder's checkpoint
    with its configuration; ``given`` (a set of :class:`TrainConfig` field names: those the caller
    set on purpose, as the CLI passes its explicit options) are compared with it: a changed
    setting is an error unless it is one of :data:`dxtrain.rundir.RESUMABLE` (see
    :func:`dxtrain.rundir.resumed_settings`).  Without ``given`` nothing is compared, and the
    stopping rules, ``progress``, ``evaluate`` and ``device`` come from ``cfg``.

    ``callback``, if given, is called as ``callback(info)`` with a :class:`StepInfo` after
    every step (on rank 0 only under DDP), after that step's logging, samples and checkpoint.
    Its time is not counted in the training wall-clock (``elapsed``, ``time_budget``),
    since a step's clock stops before the logging; under DDP the other ranks wait for it
    inside their next step.  Its return value is ignored.  The returned metrics include
    ``setup_s`` (see :class:`StepInfo`).

    Under ``torchrun`` (``WORLD_SIZE > 1``) this runs one DDP rank (see :mod:`dxtrain.ddp`).
    """
    t_setup = time.perf_counter()
    cfg.validate()
    with process_group() as dist, _kept_threads():
        log = (log or _to_stderr) if dist.main else _silent  # rank 0 speaks for the run
        with RunLock(cfg.out, log) if dist.main else contextlib.nullcontext():  # rank 0 writes the folder
            return _train(_set_up(cfg, resume, given, log, dist), resume, log, dist, callback, t_setup)


@contextlib.contextmanager
def _kept_threads():
    """torch's intra-op threads as they were before the run (``--cpu-threads`` sets a CPU run's own)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(run: "_Run", resume: bool, log, dist: Dist, callback, t_setup: float) -> dict:
    """The loop: forward, field, loss, backward, step, EMA, log, sample, checkpoint; the final evaluation."""
    cfg, model, ema, opt, field, device = run.cfg, run.model, run.ema, run.opt, run.field, run.device
    step, elapsed, num_classes = run.step, run.elapsed, run.num_classes
    sheet = rundir.SampleSheet(cfg.out, model, run.train_ds, num_classes, device)
    window, last, interrupted = _Window(), {}, False
    pending = {}  # measurements made between two log lines (the automatic correction's), for the next one
    still = guards.ZeroDrift(cfg)  # stops a run whose drift is exactly 0 at each of its first steps
    # stopping: decided at the end of each step and agreed over the ranks, so none waits in a collective
    budget_hit = _over_budget(cfg, elapsed)  # elapsed is the same on all ranks here
    setup_s = time.perf_counter() - t_setup
    with stop_signals() as stop, _progress_bar(cfg, dist.main, step) as bar, \
            rundir.MetricsLog(cfg.out, enabled=dist.main, resumed_at=step if resume else None) as metrics:
        while step < cfg.steps and not interrupted and not (stop.requested and not dist.enabled):
            if budget_hit:
                log(f"time budget of {cfg.time_budget:g}s reached at step {step}")
                break
            t_step = time.perf_counter()
            labels = class_labels(cfg.batch, num_classes, device) if num_classes else None
            feats, negatives = run.generated_features(labels)
            if cfg.field == "projected" and field.correction_check_due(step):
                pending.update(_check_correction(run, step, {k: f.detach() for k, f in feats.items()}, labels,
                                                 dist, log))
            pos_feats, pos_labels, pos_rows = run.positives()
            t_field = time.perf_counter()
            drifts = field(feats, pos_feats, labels, pos_labels, negatives=negatives, pos_rows=pos_rows)
            window.add(time.perf_counter() - t_field)
            loss, group_norms = drift_loss(feats, drifts)
            opt.zero_grad(set_to_none=True)
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            loss.backward()
            loss_value = loss.item()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            ema.update(model)
            step += 1
            elapsed += time.perf_counter() - t_step
            drift_norm = float(np.mean(list(group_norms.values())))
            bar.set_postfix_str(f"loss {loss_value:.4f} drift {drift_norm:.3f}", refresh=False)
            bar.update()
            interrupted, budget_hit = dist.agree(stop.requested, _over_budget(cfg, elapsed))
            final = step == cfg.steps or interrupted or budget_hit
            still.see(drift_norm, final, dist)
            if cfg.eval_every and step % cfg.eval_every == 0 and dist.main:
                pending.update(_keep_best(run, step, elapsed, log))  # logged with this step's line when it has one
            if step % cfg.log_every == 0 or final:
                loss_value, drift_norm = dist.mean(loss_value, drift_norm)
                last = {"step": step, "wall": round(elapsed, 4), "loss": loss_value, "drift_norm": drift_norm,
                        "grad_norm": grad_norm, "lr": cfg.lr_at(step - 1), **window.take(), **pending}
                pending = {}
                if cfg.field == "projected":
                    last["fallback_rows"] = field.last_stats.get("fallback_rows", 0)
                    mass = field.balanced_mass()
                    if mass is not None:
                        last["pos_mass"] = mass
                    if step % cfg.fidelity_every == 0 and dist.main:
                        last["fidelity"] = field.diagnostics(feats)
                metrics.write(last)
            if step % cfg.sample_every == 0 and dist.main:
                sheet.save(ema.model, step)
            if step % cfg.checkpoint_every == 0 and dist.main:
                run.checkpoint(step, elapsed)
            if callback is not None and dist.main:
                callback(StepInfo(step=step, elapsed=elapsed, setup_s=setup_s, final=final, ema_model=ema.model,
                                  model=model, num_classes=num_classes, device=device, train_ds=run.train_ds,
                                  test_ds=run.test_ds))
    if not dist.enabled:
        interrupted = stop.requested  # a signal after the last step's agreement counts too
    write_weights_hash(model, dist.rank, step)  # with $DXTRAIN_DEBUG_DIR (tests)
    if dist.main:
        run.checkpoint(step, elapsed)
        sheet.save(ema.model, step)
    return _finish(run, step, elapsed, setup_s, last, interrupted, log, dist)


def _finish(run: "_Run", step: int, elapsed: float, setup_s: float, last: dict, interrupted: bool, log,
            dist: Dist) -> dict:
    """The run's summary; after a completed run, the final evaluation (``eval.json``)."""
    cfg = run.cfg
    if interrupted:
        log(f"interrupted: checkpoint saved at step {step}; continue with: dxtrain train --resume --out {cfg.out}")
        return {**last, "step": step, "wall": elapsed, "setup_s": setup_s, "interrupted": True}
    result = {"step": step, "wall": elapsed, "setup_s": setup_s,
              **{k: v for k, v in last.items() if k not in ("step", "wall")}}
    if cfg.evaluate and dist.main:
        result["eval"] = evaluate_run(run.ema.model, run.train_ds, run.test_ds, run.num_classes, run.device,
                                      folder=cfg.out, step=step, wall=elapsed, field=cfg.field, seed=cfg.seed,
                                      encoder_features=run.groups.encoder_features)
        log("eval: " + json.dumps({k: v for k, v in result["eval"].items() if isinstance(v, (int, float))}))
    return result


# --------------------------------------------------------------------------- set-up


@dataclass
class _Run:
    """What the set-up hands the loop: the run's data, models, field and state."""

    cfg: TrainConfig  # on resume, the checkpoint's (with the new stopping rules)
    device: torch.device
    train_ds: Dataset
    test_ds: Dataset
    num_classes: int  # 0 when unconditional
    real_feats: RealFeatures | None  # the training samples' feature groups, when the steps draw them
    model: torch.nn.Module  # the generator itself: sampling, EMA, checkpoints
    gen: torch.nn.Module  # what the step calls: the model, or its DDP wrapper
    groups: FeatureGroups
    field: ExactField | ProjectedFieldSet
    opt: torch.optim.Optimizer
    ema: EMA
    rng: np.random.Generator  # this rank's positives
    noise_rng: torch.Generator  # this rank's noise
    step: int = 0
    elapsed: float = 0.0
    saved_step: int | None = None  # the step checkpoint.pt holds, once known (no second save at that step)
    guide: Guide | None = None  # classifier-free guidance's inputs of each step (--guidance)

    def generated_features(self, labels):
        """A step's generated batch as feature groups (float32), and guidance's negatives (or None): noise, the
        guidance scales, the generator under bf16 autocast with ``precision="bf16"``, the frozen encoder."""
        noise = sample_noise(self.model, self.cfg.batch if labels is None else len(labels), self.noise_rng,
                             device=self.device)
        alpha, negatives = self.guide.draw(self.rng, labels) if self.guide is not None else (None, None)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            generated = self.gen(noise, labels, alpha=alpha)
        return self.groups(generated.float()), negatives  # the encoder has its own autocast

    def positives(self):
        """The step's real mini-batch ``(features, labels, training rows)`` for the exact field or the correction,
        else Nones."""
        if self.cfg.field != "exact" and not self.field.correction:
            return None, None, None
        return self.draw_positives()

    def draw_positives(self):
        """``real_per_step`` real samples' features, labels and training rows, drawn from this rank's stream."""
        idx, labels = _draw_positives(self.rng, self.cfg.real_per_step, len(self.train_ds),
                                      self.train_ds.labels if self.num_classes else None, self.num_classes)
        feats = {name: f.to(self.device) for name, f in self.real_feats.take(idx).items()}
        return feats, None if labels is None else labels.to(self.device), idx

    def checkpoint(self, step: int, elapsed: float) -> None:
        """``checkpoint.pt`` at ``step`` (the previous one kept as ``checkpoint.prev.pt``), unless it holds it."""
        if step == self.saved_step:
            return
        rundir.save_checkpoint(self.cfg.out, self.cfg, self.model, self.ema, self.opt, step, elapsed, self.rng,
                               self.noise_rng, self.train_ds,
                               field_state=self.field.state() if self.cfg.field == "projected" else None)
        self.saved_step = step


def build_generator(cfg: TrainConfig, shape, num_classes: int) -> torch.nn.Module:
    """The run's generator (``--generator``, ``--gen-width``, ``--gen-depth``) for samples of ``shape``."""
    try:
        return make_generator(cfg.generator, shape, num_classes=num_classes, width=cfg.gen_width,
                              depth=cfg.gen_depth, guidance=cfg.guidance)
    except ValueError as exc:
        given = "".join(f" {o} {v}" for o, v in (("--gen-width", cfg.gen_width), ("--gen-depth", cfg.gen_depth))
                        if v is not None)
        raise ValueError(f"--generator {cfg.generator}{given}, samples of shape {tuple(shape)}: {exc}") from None


def _set_up(cfg: TrainConfig, resume: bool, given, log, dist: Dist) -> _Run:
    """Everything before the first step; on resume, the state the checkpoint holds."""
    checkpoint, latest = rundir.start(cfg.out, resume, log, owner=dist.main) or (None, False)
    if checkpoint is not None:
        cfg = rundir.resumed_settings(cfg, TrainConfig.from_dict(checkpoint["config"]), given, log).validate()
    device = pick_device(cfg.device)
    guards.need_cupy(device)  # before any work
    device = dist.init(device)
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
    rng, noise_rng = _streams(cfg.seed, dist.rank)
    train_ds, test_ds, conditional = setup(cfg)
    num_classes = train_ds.num_classes if conditional else 0
    guards.check_classes(train_ds.labels, num_classes)
    guards.check_evaluable(cfg, test_ds)
    guards.check_batch(cfg, num_classes, log, dist.world_size)
    guards.check_guidance(cfg, num_classes)
    guards.announce_unused(cfg, given, log, own_split=test_ds.own_split)
    if dist.main:
        rundir.write_config(cfg.out, cfg)
    model = build_generator(cfg, train_ds.shape, num_classes).to(device)
    _set_cpu_threads(cfg, device, model, train_ds.shape, log)
    groups = make_feature_groups(cfg, train_ds, device)
    # the fused update (one kernel over every tensor) where torch has it: a third of the per-tensor loop's time
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type in ("cpu", "cuda") or None)
    ema = EMA(model, decay=cfg.ema)
    step, elapsed = 0, 0.0
    if checkpoint is not None:
        # the checkpoint holds rank 0's streams; the other ranks re-derive theirs from the step
        step, elapsed = rundir.restore_checkpoint(checkpoint, model, ema, opt,
                                                  *((rng, noise_rng) if dist.main else ()))
        if not dist.main:
            rng, noise_rng = _streams(cfg.seed, dist.rank, step)
        log(f"resumed {cfg.out} at step {step} ({elapsed:.1f}s of training)"
            + (f"; it already has its {cfg.steps} steps: pass --steps to train longer" if step >= cfg.steps else ""))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"data {cfg.data}: {len(train_ds)} train / {len(test_ds)} test"
        f"{' (its own test split)' if test_ds.own_split else ''}, sample shape {train_ds.shape}, "
        f"{train_ds.num_classes} classes ({'conditional' if conditional else 'unconditional'}); "
        f"generator {type(model).__name__} ({model.describe()}; {n_params:,} parameters); features {groups.describe()}; "
        f"field {cfg.field}; device {device}"
        + (f"; DDP over {dist.world_size} ranks (global batch {cfg.batch} x {dist.world_size})"
           if dist.enabled else ""))
    gen = dist.wrap(model, device)
    # The encoder is frozen: the real data's features are computed once, and every step's positives
    # (the exact field's, or the correction's sample) are rows of them.
    t0 = time.perf_counter()
    real = real_features(cfg, groups, train_ds, device, log, dist)
    log(f"features of the {len(train_ds)} training samples: {real.describe()}, {time.perf_counter() - t0:.1f}s")
    feats = real.arrays
    field, used = _make_field(cfg, feats, train_ds.labels if conditional else None, dist, log)
    if used != cfg and dist.main:
        rundir.write_config(cfg.out, used)  # the values the summaries were built with
    cfg = used
    if checkpoint is not None and cfg.field == "projected":
        field.restore(checkpoint.get("field"))  # the automatic correction as it was
    guards.announce_draws(cfg, field, train_ds.labels, num_classes, len(train_ds), log)
    if cfg.field == "projected" and (field.correction or field.auto_correction):
        field.keep_sample_maps(feats, train_ds.labels if conditional else None, real.ram_left, log)
    draws = cfg.field == "exact" or field.correction or field.auto_correction or cfg.guidance
    guide = None if not cfg.guidance else Guide(real, len(train_ds), num_classes, cfg.guidance_max,
                                                cfg.guidance_negatives or cfg.batch, device)
    if guide is not None:
        log(f"guidance: a scale per class and step in [1, {cfg.guidance_max:g}] (the generator's input), "
            f"{guide.n_negatives} unconditional real negatives per step weighted (alpha - 1)(N_gen - 1) / N_unc")
    return _Run(cfg, device, train_ds, test_ds, num_classes, real if draws else None, model, gen, groups, field, opt,
                ema, rng, noise_rng, step, elapsed, step if latest else None, guide)


def _set_cpu_threads(cfg: TrainConfig, device, model, shape, log) -> None:
    """torch's intra-op threads for a run on the CPU, until it ends (:func:`train` puts torch's count back):
    ``--cpu-threads``, else one for the MLP generator on vectors, else torch's default (one per core).

    The MLP's operations are small, and torch's pool sleeps between them (dxtrain/__init__.py): waking it
    costs those steps more than a second thread gives them. On 2 cores one thread made the MLP benches'
    steps 1.3-1.5x faster for both fields, and the image benches' convolution steps 1.3x slower
    (docs/design.md section 8.21)."""
    if device.type != "cpu":
        return
    n = cfg.cpu_threads
    if n is None and isinstance(model, MLPGenerator) and len(shape) == 1 and torch.get_num_threads() > 1:
        n = 1
        log("CPU threads: torch at 1 intra-op thread for the MLP generator's small operations "
            "(--cpu-threads sets it)")
    if n is not None:
        torch.set_num_threads(int(n))


def _streams(seed: int, rank: int, step: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """A rank's random streams: positives (NumPy) and noise (torch, on the CPU)."""
    s = rank_seed(seed, rank, step)
    return np.random.default_rng(s), torch.Generator(device="cpu").manual_seed(s + 1)


def _make_field(cfg: TrainConfig, feats: dict[str, np.ndarray], labels, dist: Dist, log):
    """The configured field and the configuration as used.  The projected one loads its summaries from
    ``cache`` (default: the run folder's ``summaries/``), checked against the run's settings
    (:func:`dxtrain.guards.open_summaries`: an explicit cache built otherwise is used and its values
    returned), or builds them, each rank summarising a shard, and saves them there."""
    if cfg.field == "exact":
        return ExactField(cfg.temperatures, memory_budget=cfg.memory_budget, normalization=cfg.normalization), cfg
    cache = cfg.cache or os.path.join(cfg.out, rundir.SUMMARIES)
    t0 = time.perf_counter()
    missing, = dist.agree(not os.path.exists(os.path.join(cache, "manifest.json")))
    if not missing:
        field, cfg = guards.open_summaries(cfg, cache, not cfg.cache, {k: f.shape[1] for k, f in feats.items()},
                                           feats, log)
    else:
        bars = cfg.progress and dist.main and sys.stderr.isatty()  # like the step's bar: on a terminal
        field = build_summaries(cfg, feats, labels, log, progress=bars, rank=dist.rank,
                                world_size=dist.world_size, allreduce=dist.allreduce_numpy if dist.enabled else None)
        if dist.main:
            field.save(cache)
        log(f"built summaries of {len(next(iter(feats.values())))} samples in {time.perf_counter() - t0:.1f}s -> {cache}")
    field.configure(cfg)
    _log_correction(cfg, field, log)
    return field, cfg


def _log_correction(cfg: TrainConfig, field: ProjectedFieldSet, log) -> None:
    if field.auto_correction:
        log(f"residual correction auto: off until the uncorrected field's bias reaches {CORRECTION_BIAS_SHARE:.0%} "
            f"of its RMS (measured after {CORRECTION_FIRST_CHECK}, {2 * CORRECTION_FIRST_CHECK}, "
            f"{4 * CORRECTION_FIRST_CHECK}, ... steps), then on with {cfg.real_per_step} real samples per step")
        return
    log(f"residual correction {'on' if field.correction else 'off'} (set"
        + (f"; {cfg.real_per_step} real samples per step" if field.correction else "") + ")")


def _check_correction(run: "_Run", step: int, feats, labels, dist: Dist, log) -> dict:
    """Measure the uncorrected field's bias at this step's generated features (two fresh real samples),
    agreed over the ranks, and turn the automatic correction on when it is material; returns what to log."""
    samples = [run.draw_positives() for _ in range(2)]
    bias2, signal2 = dist.mean(*run.field.bias_terms(feats, samples, labels))
    share = run.field.decide_correction(bias2, signal2, step)
    if run.field.correction:
        log(f"residual correction on from step {step}: the uncorrected field's bias is {share:.0%} of its RMS "
            f"(at least {CORRECTION_BIAS_SHARE:.0%}); {run.cfg.real_per_step} real samples per step")
    return {"correction_bias_share": share}


def _keep_best(run: "_Run", step: int, elapsed: float, log) -> dict:
    """The periodic evaluation (``eval_every``): the EMA generator's main score now, and ``checkpoint.best.pt``
    kept when it is the best so far (outside the training clock); returns what to log."""
    n = run.cfg.eval_samples or default_samples(run.train_ds, run.test_ds)
    x = generate(run.ema.model, n, run.num_classes, run.device, seed=run.cfg.seed + 7)
    report = evaluate_samples(x, run.train_ds, run.test_ds, classifier_cache=classifier_cache(), seed=run.cfg.seed,
                              encoder_features=run.groups.encoder_features)
    scored = main_score(report)
    if scored is None:
        return {}
    run.checkpoint(step, elapsed)
    if rundir.keep_best(run.cfg.out, step, *scored):
        log(f"step {step}: {scored[0]} {scored[1]:.4g} on {n} samples, the best so far: kept as "
            f"{rundir.BEST_CHECKPOINT}")
    return {"eval_" + scored[0]: scored[1]}


def _draw_positives(rng, n: int, n_real: int, labels: np.ndarray | None, num_classes: int):
    """Indices of ``n`` real samples (``n // K`` per class when conditional) and their labels."""
    if labels is None or num_classes == 0:
        return torch.from_numpy(rng.choice(n_real, size=min(n, n_real), replace=False)), None
    per = guards.per_class(n, num_classes)
    idx = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        idx.append(rng.choice(members, size=min(per, members.size), replace=False))
    idx = np.concatenate(idx)
    return torch.from_numpy(idx), torch.from_numpy(labels[idx])


# --------------------------------------------------------------------------- the loop's instruments


def _to_stderr(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)  # above the progress bar, where one is drawn
    sys.stderr.flush()


def _silent(msg: str) -> None:
    pass


def _over_budget(cfg: TrainConfig, elapsed: float) -> bool:
    return cfg.time_budget is not None and elapsed >= cfg.time_budget


def _progress_bar(cfg: TrainConfig, show: bool, step: int) -> tqdm:
    """tqdm on stderr, rank 0 only; ``disable=None`` draws it only on a terminal, as before tqdm."""
    return tqdm(total=cfg.steps, initial=step, disable=None if cfg.progress and show else True, unit="step",
                mininterval=0.25, dynamic_ncols=True)


class _Window:
    """Steps and seconds in the field since the last logged row: the rates a metrics row reports."""

    def __init__(self):
        self.start, self.steps, self.field_s = time.perf_counter(), 0, 0.0

    def add(self, field_s: float) -> None:
        self.steps += 1
        self.field_s += field_s

    def take(self) -> dict:
        """This window's ``field_s`` (mean per step) and ``steps_per_s``; a new window starts."""
        now = time.perf_counter()
        rates = {"field_s": self.field_s / self.steps, "steps_per_s": self.steps / max(now - self.start, 1e-9)}
        self.start, self.steps, self.field_s = now, 0, 0.0
        return rates
