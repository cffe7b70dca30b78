"""Training loop for one-step drifting generators, readable top to bottom.

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

A run folder holds ``config.json``, ``metrics.jsonl`` (one JSON object per
logged step: step, wall-clock seconds of training, loss, drift norm, seconds in
the field, steps/s, fidelity diagnostics), ``samples/step-*.png``,
``checkpoint.pt`` (written atomically every ``checkpoint_every`` steps, at the
end, and on SIGINT/SIGTERM) and ``eval.json``.  ``resume=True`` continues
exactly where the checkpoint stopped: weights, optimiser, EMA, every random
stream, step and elapsed time.  ``time_budget`` stops at a wall-clock budget
(training time only, not periodic sampling or checkpoint I/O), so methods can
be compared at equal time.  ``train(cfg, callback=f)`` calls ``f(StepInfo)``
after every step, outside the timed part (e.g. to evaluate the EMA generator
at chosen points of training time, as ``bench/train.py`` does).

Multi-process (DDP).  Launched by ``torchrun`` (``WORLD_SIZE > 1`` in the
environment), e.g. ``torchrun --nproc-per-node 2 -m dxtrain train ...``, the
loop runs data-parallel: one process per rank (gloo on the CPU, NCCL on CUDA,
rank ``LOCAL_RANK``'s GPU), identical initial weights, each rank drawing its own
noise and positives (streams seeded from seed and rank), gradients all-reduced
by ``DistributedDataParallel``.  ``batch`` is per rank: the global batch is
``batch x world size``.  Projected-field summaries are built with each rank
summarising a shard of the real rows (``rank::world_size``) on landmarks chosen
identically from all the data, then all-reduced.  Only rank 0 writes the run
folder (config, metrics, samples, checkpoints, summaries, eval); the logged
loss and drift norm are averages over the ranks.  All ranks stop at the same
step (signals and the time budget are agreed every step).  Resuming under DDP
restores weights, optimiser, EMA, step and rank 0's random streams; the other
ranks re-derive theirs from (seed, rank, step), so exact resume is guaranteed
only for single-process runs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

import dxfield
from dxfield.atomic import atomic_write
from dxfield.projected import REPULSIONS

from .data import Dataset, load_dataset, train_test_split
from .features import FeatureGroups
from .fields import ExactField, ProjectedFieldSet, drift_loss
from .models import EMA, make_generator, sample_noise
from .rundir import atomic_torch_save, write_json

DEBUG_DIR_ENV = "DXTRAIN_DEBUG_DIR"  # tests: each rank writes a hash of its final weights there

FIELDS = ("projected", "exact")
NORMALIZATIONS = dxfield.NORMALIZATIONS


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` in the run folder."""

    data: str = "digits"  # embedded name or a .npz/.npy/.h5 path
    data_key: str | None = None
    labels_key: str | None = None
    out: str = "runs/digits"
    field: str = "projected"  # "projected" (DriftXpress) or "exact" (standard drifting)
    steps: int = 600
    time_budget: float | None = None  # seconds of training; stops early when reached
    batch: int = 256  # generated samples per step (split evenly over classes when conditional)
    positives: int = 512  # real samples per step for the exact field
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)
    normalization: str = "bidirectional"  # of both fields: "bidirectional" (Algorithm 2) or "row" (mean shift)
    repulsion: str = "exact"  # projected field: "exact" over the batch, or "nystrom" (the attraction's kernel)
    correction: bool = False  # projected field: correct the Nystrom sums with `positives` fresh real samples/step
    landmarks: int = 128  # per class (projected field)
    landmark_method: str = "kmeans"
    conditional: bool = True  # use class labels when the data has them
    generator: str = "auto"  # "auto", "mlp" or "conv"
    encoder: str = "auto"  # "auto" (builtin for images, none for vectors), "none", "builtin", a TorchScript
    #                        file or "module:callable"
    max_locations: int = 4  # per-location feature groups kept per encoder scale
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    ema: float = 0.995
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    log_every: int = 25
    sample_every: int = 250
    checkpoint_every: int = 250
    fidelity_every: int = 250
    test_fraction: float = 0.15
    cache: str | None = None  # summaries folder from `dxtrain summarize`
    memory_budget: str | None = None  # dxfield's per-call budget
    evaluate: bool = True
    progress: bool = True

    def validate(self) -> "TrainConfig":
        if self.field not in FIELDS:
            raise ValueError(f"field={self.field!r} is not valid; choose one of {FIELDS}")
        if self.correction and (self.field != "projected" or self.normalization != "bidirectional"
                                or self.repulsion != "exact"):
            raise ValueError("correction applies to field='projected' with normalization='bidirectional' and "
                             "repulsion='exact'")
        if self.repulsion not in REPULSIONS:
            raise ValueError(f"repulsion={self.repulsion!r} is not valid; choose one of {REPULSIONS}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r} is not valid; choose one of {NORMALIZATIONS}")
        for name in ("steps", "batch", "positives", "landmarks", "log_every", "sample_every", "checkpoint_every",
                     "fidelity_every", "max_locations"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds, got {self.time_budget}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if any(t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be > 0, got {self.temperatures}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "temperatures" in kw:
            kw["temperatures"] = tuple(kw["temperatures"])
        return cls(**kw)


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


class _Stop:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def real_features(groups: FeatureGroups, data: torch.Tensor, device, chunk: int = 2048) -> dict[str, np.ndarray]:
    """Feature groups of the real data, computed once in chunks (the encoder is frozen)."""
    out: dict[str, list] = {}
    with torch.no_grad():
        for i in range(0, data.shape[0], chunk):
            for name, f in groups(data[i:i + chunk].to(device)).items():
                out.setdefault(name, []).append(f.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def make_feature_groups(cfg: TrainConfig, ds: Dataset, device) -> FeatureGroups:
    """The run's frozen feature groups (encoder resolved from the data kind)."""
    return FeatureGroups(ds.shape, resolve_encoder(cfg.encoder, ds.kind), max_locations=cfg.max_locations).to(device)


def build_summaries(cfg: TrainConfig, feats: dict[str, np.ndarray], labels, log, **sharding) -> ProjectedFieldSet:
    """The projected field's summaries of the real features, as configured (``sharding``: DDP)."""
    return ProjectedFieldSet.build(feats, labels=labels, temperatures=cfg.temperatures, landmarks=cfg.landmarks,
                                   method=cfg.landmark_method, seed=cfg.seed, memory_budget=cfg.memory_budget,
                                   log=log, **sharding)


def setup(cfg: TrainConfig):
    """The train/test split of a config's data and whether the run is class-conditional
    (shared by train, summarize, sample and eval, so all see the same split)."""
    data = load_dataset(cfg.data, seed=cfg.seed, key=cfg.data_key, labels_key=cfg.labels_key)
    train_ds, test_ds = train_test_split(data, cfg.test_fraction, seed=cfg.seed)
    conditional = bool(cfg.conditional and train_ds.num_classes > 0)
    return train_ds, test_ds, conditional


class _Dist:
    """This process's place in a torchrun launch (``WORLD_SIZE > 1``), or a single process."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0) if self.world_size > 1 else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0) if self.world_size > 1 else 0
        self.enabled = self.world_size > 1
        self.owned = False  # True when we initialised the process group (and so destroy it)
        self.comm = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> torch.device:
        """Initialise the process group; returns this rank's device (``cuda:LOCAL_RANK`` on CUDA)."""
        if not self.enabled:
            return device
        import torch.distributed as dist

        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owned = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.comm = device if device.type == "cuda" else torch.device("cpu")
        return device

    def allreduce_numpy(self, a: np.ndarray) -> np.ndarray:
        """Sum of a float64 array over the ranks (the same result on every rank)."""
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(self.comm)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over the ranks (an all-reduce MAX), so every rank takes the same branch."""
        if not self.enabled:
            return [bool(f) for f in flags]
        import torch.distributed as dist

        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.comm)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def mean(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.comm)
        dist.all_reduce(t)
        return [v / self.world_size for v in t.tolist()]

    def close(self, sync: bool = True) -> None:
        """Destroy the process group this object created.  ``sync`` (a finished run, every rank
        at the same step): first wait until every rank is here, since a rank that tears down
        while its peer still talks to it can abort inside gloo ("terminate called without an
        active exception", seen once in CI at the end of a finished run)."""
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    if sync:
                        dist.barrier()
                finally:
                    dist.destroy_process_group()
            self.owned = False


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of a rank's random streams: ``seed`` itself for a fresh single-process (or rank 0) run."""
    if rank == 0 and step == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) & (2 ** 63 - 1), rank, step]).generate_state(1, np.uint64)[0]
               % (2 ** 62))


def class_labels(batch: int, num_classes: int, device) -> torch.Tensor:
    """Balanced labels: ``batch // K`` of each class (at least one each)."""
    per = max(1, batch // num_classes)
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


def train(cfg: TrainConfig, *, resume: bool = False, log=None, callback=None) -> dict:
    """Run (or resume) training as configured; returns the final metrics.

    ``callback``, if given, is called as ``callback(info)`` with a :class:`StepInfo` after
    every step (on rank 0 only under DDP), after that step's logging, samples and checkpoint.
    Its time is not counted in the training wall-clock (``elapsed``, ``time_budget``),
    since a step's clock stops before the logging; under DDP the other ranks wait for it
    inside their next step.  Its return value is ignored.  The returned metrics include
    ``setup_s`` (see :class:`StepInfo`).

    Under ``torchrun`` (``WORLD_SIZE > 1``) this runs one DDP rank (see the module docstring).
    """
    ddp = _Dist()
    try:
        result = _train(cfg, resume, log, ddp, callback)
    except BaseException:
        ddp.close(sync=False)  # a failed rank must not wait for peers that may never come
        raise
    ddp.close(sync=True)
    return result


def _train(cfg: TrainConfig, resume: bool, log, ddp: _Dist, callback=None) -> dict:
    t_setup = time.perf_counter()
    cfg.validate()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not ddp.main:
        log = lambda msg: None  # noqa: E731  (rank 0 speaks for the run)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    if resume and not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    if not resume and os.path.exists(ckpt_path):
        raise FileExistsError(f"{cfg.out} already holds a run (checkpoint.pt); pass --resume to continue it "
                              "or choose another --out")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False) if resume else None
    if checkpoint is not None:
        saved = TrainConfig.from_dict(checkpoint["config"])
        # the run's identity comes from the checkpoint; only the stopping rules may change on resume
        for keep in ("steps", "time_budget", "progress", "evaluate", "out", "device"):
            setattr(saved, keep, getattr(cfg, keep))
        cfg = saved
    device = ddp.init(pick_device(cfg.device))
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
    rank_seed = _rank_seed(cfg.seed, ddp.rank)
    rng = np.random.default_rng(rank_seed)
    noise_rng = torch.Generator(device="cpu").manual_seed(rank_seed + 1)
    if ddp.main:
        write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))

    # -- data, generator, features -----------------------------------------------------------
    train_ds, test_ds, conditional = setup(cfg)
    num_classes = train_ds.num_classes if conditional else 0
    real = torch.from_numpy(train_ds.x)
    real_labels = torch.from_numpy(train_ds.labels) if conditional else None
    gen = make_generator(cfg.generator, train_ds.shape, num_classes=num_classes).to(device)
    groups = make_feature_groups(cfg, train_ds, device)
    opt = torch.optim.AdamW(gen.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(gen, decay=cfg.ema)
    step, elapsed = 0, 0.0
    if checkpoint is not None:
        gen.load_state_dict(checkpoint["generator"])
        ema.load_state_dict(checkpoint["ema"])
        opt.load_state_dict(checkpoint["optimizer"])
        step, elapsed = int(checkpoint["step"]), float(checkpoint["elapsed"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if ddp.main:
            rng.bit_generator.state = checkpoint["rng"]["numpy"]
            noise_rng.set_state(checkpoint["rng"]["noise"])
        else:  # the checkpoint holds rank 0's streams; the others re-derive theirs deterministically
            rank_seed = _rank_seed(cfg.seed, ddp.rank, step)
            rng = np.random.default_rng(rank_seed)
            noise_rng = torch.Generator(device="cpu").manual_seed(rank_seed + 1)
        log(f"resumed {cfg.out} at step {step} ({elapsed:.1f}s of training)")
    n_params = sum(p.numel() for p in gen.parameters())
    log(f"data {cfg.data}: {len(train_ds)} train / {len(test_ds)} test, sample shape {train_ds.shape}, "
        f"{train_ds.num_classes} classes ({'conditional' if conditional else 'unconditional'}); "
        f"generator {type(gen).__name__} ({n_params:,} parameters); {len(groups.names)} feature group(s); "
        f"field {cfg.field}; device {device}"
        + (f"; DDP over {ddp.world_size} ranks (global batch {cfg.batch} x {ddp.world_size})" if ddp.enabled else ""))
    model = gen  # the module itself: sampling, EMA, checkpoints
    if ddp.enabled:
        gen = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # -- the field ------------------------------------------------------------------------------
    if cfg.field == "exact":
        field_fn = ExactField(cfg.temperatures, memory_budget=cfg.memory_budget, normalization=cfg.normalization)
    else:
        cache = cfg.cache or os.path.join(cfg.out, "summaries")
        dims = groups.dims
        t0 = time.perf_counter()
        feats = real_features(groups, real, device)
        missing, = ddp.agree(not os.path.exists(os.path.join(cache, "manifest.json")))
        if not missing:
            field_fn = ProjectedFieldSet.load(cache, expect=dims, temperatures=cfg.temperatures, data=feats)
            field_fn.configure(cfg)
            log(f"loaded summaries from {cache}")
        else:
            field_fn = build_summaries(cfg, feats, None if real_labels is None else real_labels.numpy(), log,
                                       rank=ddp.rank, world_size=ddp.world_size,
                                       allreduce=ddp.allreduce_numpy if ddp.enabled else None)
            field_fn.configure(cfg)
            if ddp.main:
                field_fn.save(cache)
            log(f"built summaries of {len(train_ds)} samples in {time.perf_counter() - t0:.1f}s -> {cache}")

    # -- loop -----------------------------------------------------------------------------------
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if checkpoint is not None and ddp.main:
        _truncate_metrics(metrics_path, step)
    n_fixed = 100 if train_ds.kind == "images" else 2000  # a 10 x 10 grid, or a scatter
    fixed_noise = sample_noise(model, n_fixed, torch.Generator().manual_seed(12345), device=device)
    fixed_labels = torch.arange(n_fixed, device=device) % num_classes if conditional else None
    last = {}
    window_t, window_steps, window_field = time.perf_counter(), 0, 0.0
    bar = _Bar(cfg.steps, enabled=cfg.progress and ddp.main, start=step)
    # stopping: decided at the end of each step and agreed over the ranks, so none waits in a collective
    budget_hit = cfg.time_budget is not None and elapsed >= cfg.time_budget  # elapsed is the same on all ranks here
    interrupted = False
    setup_s = time.perf_counter() - t_setup
    with _Stop() as stop, (open(metrics_path, "a") if ddp.main else _NullFile()) as metrics:
        while step < cfg.steps and not interrupted and not (stop.requested and not ddp.enabled):
            if budget_hit:
                log(f"time budget of {cfg.time_budget:g}s reached at step {step}")
                break
            t_step = time.perf_counter()
            labels = class_labels(cfg.batch, num_classes, device) if conditional else None
            b = cfg.batch if labels is None else labels.shape[0]
            noise = sample_noise(model, b, noise_rng, device=device)
            x = gen(noise, labels)
            feats = groups(x)
            pos_feats, pos_labels = None, None
            if cfg.field == "exact" or cfg.correction:
                idx, pos_labels = _draw_positives(rng, cfg.positives, real.shape[0], real_labels, num_classes)
                with torch.no_grad():
                    pos_feats = groups(real[idx].to(device))
                if pos_labels is not None:
                    pos_labels = pos_labels.to(device)
            t_field = time.perf_counter()
            drifts = field_fn(feats, pos_feats, labels, pos_labels)
            field_s = time.perf_counter() - t_field
            loss, group_norms = drift_loss(feats, drifts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = loss.item()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            ema.update(model)
            step += 1
            elapsed += time.perf_counter() - t_step
            window_steps += 1
            window_field += field_s
            drift_norm = float(np.mean(list(group_norms.values())))
            bar.update(step, f"loss {loss_value:.4f} drift {drift_norm:.3f}")
            interrupted, budget_hit = ddp.agree(stop.requested,
                                                cfg.time_budget is not None and elapsed >= cfg.time_budget)
            final = step == cfg.steps or interrupted or budget_hit
            if step % cfg.log_every == 0 or final:
                loss_value, drift_norm = ddp.mean(loss_value, drift_norm)
                now = time.perf_counter()
                last = {"step": step, "wall": round(elapsed, 4), "loss": loss_value, "drift_norm": drift_norm,
                        "grad_norm": grad_norm, "field_s": window_field / window_steps,
                        "steps_per_s": window_steps / max(now - window_t, 1e-9)}
                if cfg.field == "projected":
                    last["fallback_rows"] = field_fn.last_stats.get("fallback_rows", 0)
                    if step % cfg.fidelity_every == 0 and ddp.main:
                        last["fidelity"] = field_fn.diagnostics(feats)
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                window_t, window_steps, window_field = now, 0, 0.0
            if step % cfg.sample_every == 0 and ddp.main:
                save_samples(ema.model, fixed_noise, fixed_labels, train_ds, os.path.join(cfg.out, "samples"),
                             step)
            if step % cfg.checkpoint_every == 0 and ddp.main:
                _checkpoint(ckpt_path, cfg, model, ema, opt, step, elapsed, rng, noise_rng, train_ds)
            if callback is not None and ddp.main:
                callback(StepInfo(step=step, elapsed=elapsed, setup_s=setup_s, final=final, ema_model=ema.model,
                                  model=model, num_classes=num_classes, device=device, train_ds=train_ds,
                                  test_ds=test_ds))
    if not ddp.enabled:
        interrupted = stop.requested
    bar.close()
    _debug_weights(model, ddp.rank, step)
    if ddp.main:
        _checkpoint(ckpt_path, cfg, model, ema, opt, step, elapsed, rng, noise_rng, train_ds)
        save_samples(ema.model, fixed_noise, fixed_labels, train_ds, os.path.join(cfg.out, "samples"), step)
    if interrupted:
        log(f"interrupted: checkpoint saved at step {step}; continue with --resume")
        return {**last, "step": step, "wall": elapsed, "setup_s": setup_s, "interrupted": True}
    result = {"step": step, "wall": elapsed, "setup_s": setup_s,
              **{k: v for k, v in last.items() if k not in ("step", "wall")}}
    if cfg.evaluate and ddp.main:
        from .evaluate import evaluate_samples

        samples = generate(ema.model, 2000 if train_ds.kind == "vectors" else len(test_ds) * 2, num_classes,
                           device, seed=cfg.seed + 7)
        report = evaluate_samples(samples, train_ds, test_ds, classifier_cache=_classifier_cache(), seed=cfg.seed)
        report.update({"step": step, "wall": elapsed, "field": cfg.field})
        write_json(os.path.join(cfg.out, "eval.json"), report)
        result["eval"] = report
        log("eval: " + json.dumps({k: v for k, v in report.items() if isinstance(v, (int, float))}))
    return result


class _NullFile:
    """Stands in for metrics.jsonl on ranks other than 0."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text):
        return len(text)

    def flush(self):
        pass


def _debug_weights(model, rank: int, step: int) -> None:
    """With ``$DXTRAIN_DEBUG_DIR`` set (tests): write ``rank<R>.json``, a hash of this rank's final weights."""
    folder = os.environ.get(DEBUG_DIR_ENV)
    if not folder:
        return
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, f"rank{rank}.json"), {"rank": rank, "step": step, "sha256": h.hexdigest()})


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metrics logged after ``step`` (a crash after them, before the next checkpoint)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:  # a line cut by the crash
                continue
    atomic_write(path, lambda fh: fh.writelines(kept), "w")


def _draw_positives(rng, n: int, n_real: int, real_labels, num_classes: int):
    """Indices of ``n`` real samples (``n // K`` per class when conditional) and their labels."""
    if real_labels is None or num_classes == 0:
        return torch.from_numpy(rng.choice(n_real, size=min(n, n_real), replace=False)), None
    per = max(1, n // num_classes)
    lab = real_labels.numpy()
    idx = []
    for c in range(num_classes):
        members = np.flatnonzero(lab == c)
        idx.append(rng.choice(members, size=min(per, members.size), replace=False))
    idx = np.concatenate(idx)
    return torch.from_numpy(idx), torch.from_numpy(lab[idx])


def _checkpoint(path, cfg, gen, ema, opt, step, elapsed, rng, noise_rng, ds: Dataset) -> None:
    atomic_torch_save({
        "config": asdict(cfg), "generator": gen.state_dict(), "ema": ema.state_dict(),
        "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
        "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state, "noise": noise_rng.get_state()},
        "data": {"name": ds.name, "kind": ds.kind, "shape": list(ds.shape), "num_classes": ds.num_classes},
    }, path)


def generate(model, n: int, num_classes: int, device, seed: int = 0, label: int | None = None) -> np.ndarray:
    """``n`` samples from ``model`` (classes cycled, or all ``label``), as a NumPy array."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, n, 1024):
            b = min(1024, n - i)
            labels = None
            if num_classes:
                labels = (torch.full((b,), label) if label is not None else torch.arange(i, i + b) % num_classes)
                labels = labels.to(device)
            out.append(model(sample_noise(model, b, g, device=device), labels).float().cpu().numpy())
    return np.concatenate(out)


def save_samples(model, noise, labels, ds: Dataset, folder: str, step: int) -> str:
    """PNG of the EMA model's samples at fixed noise: a grid for images, a scatter for 2-D data."""
    from .png import image_grid, scatter_image, write_png

    os.makedirs(folder, exist_ok=True)
    with torch.no_grad():
        x = model(noise, labels).float().cpu().numpy()
    path = os.path.join(folder, f"step-{step:06d}.png")
    if ds.kind == "images":
        write_png(path, image_grid(x, nrow=10, scale=4 if max(ds.shape[1:]) <= 16 else 2))
    elif x.shape[1] == 2:
        write_png(path, scatter_image(x, reference=ds.x[:5000]))
    else:
        return ""
    return path


def _classifier_cache() -> str:
    base = os.environ.get("DXTRAIN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dxtrain"))
    return os.path.join(base, "digits_classifier.pt")


class _Bar:
    """A one-line progress bar on stderr: step, rate and the latest loss."""

    def __init__(self, total: int, enabled: bool, start: int = 0):
        self.total, self.enabled = total, enabled and sys.stderr.isatty() or enabled == "force"
        self.t0, self.start, self.last = time.perf_counter(), start, 0.0

    def update(self, step: int, text: str) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.25 and step < self.total):
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        frac = step / self.total
        eta = (self.total - step) / rate if rate > 0 else math.nan
        sys.stderr.write(f"\r[{'#' * int(24 * frac):<24}] {step}/{self.total} {rate:.1f} it/s eta {eta:.0f}s {text}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
