"""The run folder: every file a training run writes or reads back, each written atomically.

A run folder holds ``config.json`` (the :class:`dxtrain.train.TrainConfig`),
``metrics.jsonl`` (one JSON object per logged step: step, wall-clock seconds of
training, loss, drift norm, seconds in the field, steps/s, fidelity
diagnostics), ``samples/step-*.png`` (the EMA generator at fixed noise),
``checkpoint.pt`` (weights, optimiser, EMA, every random stream, step and
elapsed time) with ``checkpoint.sha256``, the checkpoint before it
(``checkpoint.prev.pt``, ``checkpoint.prev.sha256``), ``summaries/`` (the
projected field's, from :class:`dxtrain.fields.ProjectedFieldSet`),
``eval.json`` and, while a run lives, ``.lock``.  Every write goes through
:mod:`dxfield.atomic`, so an interrupted run never leaves a half-written file;
on resume, metrics logged after the checkpoint are dropped.

Safety rules:

* **One run at a time.**  A run holds an OS advisory lock on ``.lock``
  (:mod:`dxtrain.lock`) from set-up to its last write; a second run on the
  folder, fresh or ``--resume``, is refused before any work, naming the holder
  (pid, host, start time).  A killed run's lock is free and is taken over.
* **Checksums, two checkpoints.**  Each checkpoint's SHA-256 goes to its
  sidecar (``sha256sum -c checkpoint.sha256`` checks it by hand), and the
  previous good checkpoint is kept as ``checkpoint.prev.pt``.  Loading
  (resume, ``dxtrain sample``/``eval``) verifies the bytes before
  ``torch.load``: an empty, truncated, damaged or foreign file is refused by
  name with :class:`CheckpointError`; ``--resume`` then falls back to
  ``checkpoint.prev.pt`` when that one verifies (and drops the metrics logged
  after it), and says so.  A checkpoint written before checksums (no sidecar)
  still loads, with a note.  The save order keeps, at every instant, each
  file's hash among those its sidecar lists.
* **Leftovers.**  At start (rank 0, under the lock) temporary files of
  interrupted writes (``*.tmp``) are removed, and a fresh run starts
  ``metrics.jsonl`` empty (a run that died before its first checkpoint leaves
  lines there); both are logged.
* **Resume keeps the run's identity** (:func:`resumed_settings`): a setting
  given explicitly that differs from the checkpoint's is an error listing each
  ``name: checkpoint value -> given value``, except the ones in
  :data:`RESUMABLE` (stopping rules, intervals, progress, evaluation, device,
  memory budget), which are taken and announced.  Settings not given come from
  the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, fields

import torch

from dxfield.atomic import atomic_write

from .models import sample_noise

CONFIG, METRICS, CHECKPOINT, EVAL = "config.json", "metrics.jsonl", "checkpoint.pt", "eval.json"
PREV_CHECKPOINT = "checkpoint.prev.pt"
BEST_CHECKPOINT = "checkpoint.best.pt"  # the checkpoint of the best main score (--eval-every)
BEST = "best.json"
SAMPLES, SUMMARIES = "samples", "summaries"
# settings a resumed run may change (the rest is the run's identity and comes from the checkpoint)
RESUMABLE = ("steps", "time_budget", "log_every", "sample_every", "checkpoint_every", "fidelity_every", "progress",
             "evaluate", "device", "memory_budget", "eval_every", "eval_samples", "cpu_threads")
_LEGACY_KEPT = ("steps", "time_budget", "progress", "evaluate", "device")  # resume without ``given``, as before
_CHECKPOINT_KEYS = ("config", "generator", "ema", "optimizer", "step", "elapsed", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (empty, truncated, damaged, not a checkpoint); the message
    names the file, the cause and the fix, on one line."""

    def __init__(self, path: str, reason: str, fix: str):
        super().__init__(f"{path} {reason}: {fix}")
        self.path, self.reason, self.fix = path, reason, fix


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


def checksum_path(path: str) -> str:
    """A checkpoint's sidecar: ``checkpoint.sha256`` for ``checkpoint.pt`` (``sha256sum -c`` format)."""
    return os.path.splitext(path)[0] + ".sha256"


def _listed(path: str) -> set[str] | None:
    """The SHA-256 hashes ``path``'s sidecar accepts; None without a sidecar (written before checksums)."""
    try:
        with open(checksum_path(path), encoding="ascii") as fh:
            return {line.split()[0].lower() for line in fh if line.strip()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # an unreadable sidecar vouches for nothing
        return set()


def _write_sums(path: str, digests) -> None:
    name = os.path.basename(path)
    atomic_write(checksum_path(path), lambda fh: fh.writelines(f"{d}  {name}\n" for d in dict.fromkeys(digests)), "w")


def load_checkpoint_file(path: str, fix: str, log=None) -> tuple[dict, str]:
    """``path`` checked against its sidecar, then loaded on the CPU; returns ``(checkpoint, sha256)``.

    Raises :class:`CheckpointError` (ending in ``fix``) for a missing, empty, damaged (checksum
    mismatch), unreadable or foreign file.  A file without a sidecar (written before checksums)
    is loaded unverified, with a note to ``log``.
    """
    before = _listed(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CheckpointError(path, "is missing", fix) from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})", fix) from None
    after = _listed(path)  # the sidecar before and after the read: a save running beside us is no damage
    listed = None if before is None and after is None else (before or set()) | (after or set())
    digest, sidecar = hashlib.sha256(data).hexdigest(), os.path.basename(checksum_path(path))
    if not data:
        raise CheckpointError(path, "is empty (0 bytes)", fix)
    if listed is not None and digest not in listed:
        raise CheckpointError(path, f"does not match its checksum in {sidecar} (damaged or truncated on disk; "
                              f"{len(data)} bytes)", fix)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # whatever torch or pickle make of foreign bytes
        detail = (str(exc).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(path, f"is not a readable checkpoint ({type(exc).__name__}: {detail})", fix) from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(path, f"is not a dxtrain checkpoint (no {', '.join(missing)})", fix)
    if listed is None and log is not None:
        log(f"note: {path} has no checksum ({sidecar}): written before checksums, it is loaded unverified; "
            "the next checkpoint gets one")
    return ckpt, digest


def read_checkpoint(folder: str, log=None) -> dict:
    """The folder's ``checkpoint.pt``, verified and loaded on the CPU (:class:`CheckpointError` if unusable)."""
    prev = os.path.join(folder, PREV_CHECKPOINT)
    fix = (f"`dxtrain train --resume --out {folder}` falls back to {PREV_CHECKPOINT}, the checkpoint before it"
           if os.path.exists(prev) else "no earlier checkpoint is kept there; restore it from a backup or train again")
    return load_checkpoint_file(os.path.join(folder, CHECKPOINT), fix, log)[0]


def start(folder: str, resume: bool, log=None, owner: bool = True) -> tuple[dict, bool] | None:
    """Create the run folder; ``(checkpoint, latest)`` to resume from, or None for a fresh run.

    A fresh run refuses a folder that already holds one, and ``resume`` a folder without a checkpoint.
    On resume, a ``checkpoint.pt`` that fails verification gives way to ``checkpoint.prev.pt`` when
    that one verifies (``latest`` False, logged); else :class:`CheckpointError`.  ``owner`` (rank 0,
    holding the lock): clear the leftovers of earlier runs first (:func:`clear_leftovers`).
    """
    log = log or _silent
    os.makedirs(folder, exist_ok=True)
    path, prev = os.path.join(folder, CHECKPOINT), os.path.join(folder, PREV_CHECKPOINT)
    if resume and not os.path.exists(path) and not os.path.exists(prev):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    if not resume and (os.path.exists(path) or os.path.exists(prev)):
        raise FileExistsError(f"{folder} already holds a run (checkpoint.pt); pass --resume to continue it "
                              "or choose another --out")
    if owner:
        clear_leftovers(folder, fresh=not resume, log=log)
    return _resume_point(folder, log) if resume else None


def _resume_point(folder: str, log) -> tuple[dict, bool]:
    path, prev = os.path.join(folder, CHECKPOINT), os.path.join(folder, PREV_CHECKPOINT)
    try:
        return load_checkpoint_file(path, "", log)[0], True
    except CheckpointError as exc:
        latest = exc
    if not os.path.exists(prev):
        raise CheckpointError(path, latest.reason, f"--resume has no {PREV_CHECKPOINT} to fall back to; restore "
                              "it from a backup, or start a new run with another --out") from None
    try:
        ckpt = load_checkpoint_file(prev, "", log)[0]
    except CheckpointError as exc:
        raise CheckpointError(path, f"{latest.reason}, and {PREV_CHECKPOINT} {exc.reason}", "no intact checkpoint "
                              "is left; restore one from a backup, or start a new run with another --out") from None
    log(f"warning: {path} {latest.reason}; resuming from {PREV_CHECKPOINT} (step {ckpt['step']}) instead and "
        f"dropping the metrics logged after it; {CHECKPOINT} is replaced at the next checkpoint")
    return ckpt, False


def clear_leftovers(folder: str, *, fresh: bool, log) -> None:
    """Remove the temporary files of interrupted writes (``*.tmp``, in the folder, ``samples/`` and
    ``summaries/``); for a fresh run, also ``metrics.jsonl`` (lines of a run that died before its
    first checkpoint).  Call it only while holding the folder's lock: no live writer is then left."""
    stale = []
    for sub in ("", SAMPLES, SUMMARIES):
        where = os.path.join(folder, sub)
        names = sorted(os.listdir(where)) if os.path.isdir(where) else []
        for name in names:
            if name.endswith(".tmp") and os.path.isfile(os.path.join(where, name)):
                try:
                    os.unlink(os.path.join(where, name))
                    stale.append(os.path.join(sub, name) if sub else name)
                except OSError:
                    pass
    if stale:
        log(f"removed {len(stale)} temporary file(s) left in {folder} by an interrupted write: "
            + ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else ""))
    metrics = os.path.join(folder, METRICS)
    if fresh and os.path.exists(metrics):
        os.unlink(metrics)
        log(f"{metrics} held lines of an earlier run that stopped before its first checkpoint; starting it empty")


def save_checkpoint(folder: str, cfg, model, ema, opt, step: int, elapsed: float, rng, noise_rng, ds,
                    field_state: dict | None = None) -> None:
    """``checkpoint.pt``: everything :func:`restore_checkpoint` needs to continue exactly
    (written by :func:`write_checkpoint`); ``field_state``: the field's own (the automatic correction's)."""
    write_checkpoint(folder, {
        "config": asdict(cfg), "generator": model.state_dict(), "ema": ema.state_dict(),
        "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
        "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state, "noise": noise_rng.get_state()},
        "data": {"name": ds.name, "kind": ds.kind, "shape": list(ds.shape), "num_classes": ds.num_classes},
        "field": field_state,
    })


def write_checkpoint(folder: str, obj: dict) -> str:
    """Serialise ``obj`` as the folder's ``checkpoint.pt`` with its checksum, keeping the previous intact
    checkpoint as ``checkpoint.prev.pt``; returns the new file's SHA-256.

    Each step is atomic, and a crash between any two leaves every file's hash among those its sidecar
    lists: list the current hash in prev's sidecar, make the current file prev (a hard link, or a copy),
    list prev alone; list the new hash beside the current one, write the new file, list it alone.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(folder, CHECKPOINT)
    current = _intact_digest(path)
    if current == digest:
        return digest
    if current is not None:
        _keep_as_previous(folder, path, current)
    _write_sums(path, [digest] + ([current] if current else []))
    atomic_write(path, lambda fh: fh.write(data), "wb")
    _write_sums(path, [digest])
    return digest


def _intact_digest(path: str) -> str | None:
    """SHA-256 of ``path`` when it is an intact checkpoint (listed by its sidecar; without one, loadable)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    digest, listed = hashlib.sha256(data).hexdigest(), _listed(path)
    if listed is None:  # written before checksums: intact if it loads
        try:
            load_checkpoint_file(path, "")
        except CheckpointError:
            return None
    elif not data or digest not in listed:
        return None
    return digest


def _keep_as_previous(folder: str, path: str, digest: str) -> None:
    _keep_copy(path, os.path.join(folder, PREV_CHECKPOINT), digest)


def _keep_copy(path: str, copy: str, digest: str) -> None:
    """``path`` (an intact checkpoint of SHA-256 ``digest``) also as ``copy``, with its sidecar: a hard link, or
    a copy where the file system has none; atomic, the sidecar listing both hashes in between."""
    _write_sums(copy, [digest, *(_listed(copy) or ())])
    tmp = f"{copy}.{os.getpid()}.link.tmp"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(path, tmp)  # no copy: checkpoint.pt is only ever replaced by a rename, never written in place
        os.replace(tmp, copy)
        if os.path.lexists(tmp):  # copy already was this very file (a save cut short after this point):
            os.unlink(tmp)  # rename() between two links of one file does nothing and leaves tmp
    except OSError:  # no hard links on this file system: copy
        if os.path.lexists(tmp):
            os.unlink(tmp)
        with open(path, "rb") as fh:
            data = fh.read()
        atomic_write(copy, lambda out: out.write(data), "wb")
    _write_sums(copy, [digest])


def keep_best(folder: str, step: int, name: str, score: float) -> bool:
    """After ``checkpoint.pt`` was written at ``step``: keep it as ``checkpoint.best.pt`` (with its checksum)
    when ``score`` (the run's main score ``name``, lower is better) beats the one ``best.json`` records, and
    record it there; returns whether it did."""
    best = read_best(folder)
    if best is not None and best.get("score_name") == name and not score < best["score"]:
        return False
    path = os.path.join(folder, CHECKPOINT)
    digest = _intact_digest(path)
    if digest is None:
        return False
    _keep_copy(path, os.path.join(folder, BEST_CHECKPOINT), digest)
    write_json(os.path.join(folder, BEST), {"step": int(step), "score_name": name, "score": float(score),
                                            "sha256": digest})
    return True


def read_best(folder: str) -> dict | None:
    """``best.json``: the step, main score and checksum of ``checkpoint.best.pt`` (None before the first)."""
    try:
        with open(os.path.join(folder, BEST)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


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


def resumed_settings(cfg, saved, given=None, log=None):
    """The configuration a resumed run continues with: ``saved`` (the checkpoint's, as ``cfg``'s dataclass)
    with ``out`` and the changes ``cfg`` may make; returns ``saved``, updated.

    ``given``: the names of the settings the caller set explicitly (the CLI: the options on the command
    line).  Each that differs from ``saved`` is taken when it is in :data:`RESUMABLE` (announced to
    ``log``), else a ``ValueError`` lists every such ``name: checkpoint value -> given value``.  The
    settings not given come from the checkpoint.  ``given=None`` (the default, for library callers):
    nothing is compared; the stopping rules, ``progress``, ``evaluate`` and ``device`` come from ``cfg``.
    """
    names = [f.name for f in fields(cfg) if f.name != "out"]
    if given is None:
        take = [n for n in _LEGACY_KEPT if getattr(cfg, n) != getattr(saved, n)]
    else:
        unknown = sorted(set(given) - set(names) - {"out"})
        if unknown:
            raise ValueError(f"given: unknown setting(s) {unknown}; choose from {names}")
        take = [n for n in names if n in given and getattr(cfg, n) != getattr(saved, n)]
        refused = [n for n in take if n not in RESUMABLE]
        if refused:
            raise ValueError(f"--resume: the run in {cfg.out} was trained with other settings ("
                             + "; ".join(f"{n}: {getattr(saved, n)!r} -> {getattr(cfg, n)!r}" for n in refused)
                             + "): leave these options out to continue it as it was, or start a new run with "
                               "another --out")
    if take and log is not None:
        log("resume: " + ", ".join(f"{n} {getattr(saved, n)!r} -> {getattr(cfg, n)!r}" for n in take)
            + " (changed on resume)")
    for n in take:
        setattr(saved, n, getattr(cfg, n))
    saved.out = cfg.out
    return saved


def _silent(msg: str) -> None:
    pass


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
