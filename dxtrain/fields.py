"""Drifting fields for training: the bridge between torch features and dxfield.

Each step the trainer has, per feature group, the generated features ``f``
(B x D_g, a torch tensor with grad).  A field object returns the drift ``V``
and the feature scale ``S`` for that group; the loss is
``MSE(f / S, stopgrad(f / S + V))`` (docs/design.md section 2.3), summed over groups.

Tensors cross into dxfield through DLPack: ``f.detach()`` is read in place
(same memory, same device) and the returned NumPy/CuPy array is wrapped back
with ``torch.from_dlpack`` -- no host round trip on the GPU, no copy on the CPU.
On the GPU every dxfield call runs inside :func:`torch_stream`, so CuPy's
kernels and cuBLAS calls go on torch's current stream: ordered after the torch
ops that produced the features and before those that read the drift, with no
synchronisation and no cross-stream race.

* :class:`ExactField` -- standard drifting: bidirectional Algorithm 2 against a
  fresh mini-batch of ``positives`` real features per step (per class when
  conditional).
* :class:`ProjectedFieldSet` -- DriftXpress: one :class:`dxfield.ProjectedField`
  per feature group, summarising the whole training set once (the encoder is
  frozen, so real features never change); exact repulsion over the batch.

Both use the same normalisation, bidirectional (Algorithm 2) by default: the
projected field then is Algorithm 2 with the whole training set as positives.
With ``correction`` the projected field also takes the step's real mini-batch
(the positives standard drifting would use) as a control variate for its
Nystrom sums (``ProjectedField.field(pos_sample=...)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import dxfield
from dxfield.atomic import atomic_write
from dxfield.projected import RowSource


@contextlib.contextmanager
def torch_stream(like: torch.Tensor):
    """Make CuPy work inside run on torch's current CUDA stream of ``like``'s device (CPU: no-op)."""
    if like.device.type != "cuda":
        yield
        return
    import cupy

    index = like.device.index if like.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        yield


def to_dxfield(t: torch.Tensor):
    """A detached tensor as a NumPy (CPU) or CuPy (CUDA) array sharing its memory."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.device.type == "cpu":
        return np.from_dlpack(t)
    import cupy  # only on CUDA; dxfield's gpu extra

    return cupy.from_dlpack(t)


def to_torch(a, like: torch.Tensor) -> torch.Tensor:
    """A dxfield result as a torch tensor on ``like``'s device, zero-copy through DLPack."""
    out = torch.from_dlpack(a)
    return out.to(device=like.device, dtype=like.dtype)


@dataclass
class GroupDrift:
    v: torch.Tensor  # (B, D_g), no grad
    scale: float  # feature scale S (1.0 when unscaled)


def drift_loss(features: dict[str, torch.Tensor], drifts: dict[str, GroupDrift]) -> tuple[torch.Tensor, dict]:
    """Sum over groups of ``MSE(f/S, stopgrad(f/S + V))``; also per-group drift norms for logging."""
    total = None
    stats = {}
    for name, f in features.items():
        g = drifts[name]
        z = f / g.scale
        target = (z + g.v).detach()
        loss = torch.nn.functional.mse_loss(z, target)
        total = loss if total is None else total + loss
        stats[name] = float(g.v.pow(2).mean().sqrt())
    return total, stats


class ExactField:
    """Standard drifting: Algorithm 2 against a mini-batch of real features each step."""

    name = "exact"

    def __init__(self, temperatures, *, memory_budget=None, normalization: str = "bidirectional"):
        self.temperatures = tuple(temperatures)
        self.memory_budget = memory_budget
        self.normalization = normalization

    def __call__(self, features: dict[str, torch.Tensor], positives: dict[str, torch.Tensor],
                 labels: torch.Tensor | None = None, pos_labels: torch.Tensor | None = None) -> dict[str, GroupDrift]:
        # Class-conditional runs use one sweep per group: each generated sample meets only the
        # positives and the other generated samples of its own class (dxfield masks the rest).
        out = {}
        with torch_stream(next(iter(features.values()))):
            lab = None if labels is None else to_dxfield(labels)
            plab = None if pos_labels is None else to_dxfield(pos_labels)
            for name, f in features.items():
                v, s = dxfield.drift_field(to_dxfield(f), to_dxfield(positives[name]),
                                           temperatures=self.temperatures, labels=lab, pos_labels=plab,
                                           normalization=self.normalization, return_scale=True,
                                           memory_budget=self.memory_budget)
                out[name] = GroupDrift(to_torch(v, f), float(s))
        return out


class ProjectedFieldSet:
    """DriftXpress: a :class:`dxfield.ProjectedField` per feature group over the whole training set."""

    name = "projected"

    def __init__(self, fields: dict[str, dxfield.ProjectedField], normalization: str = "bidirectional",
                 repulsion: str = "exact", correction: bool = False):
        self.fields = fields
        self.normalization = normalization  # of every group's field (see ProjectedField.field)
        self.repulsion = repulsion
        self.correction = correction  # correct with the step's real mini-batch (pos_sample)
        self.last_stats: dict = {}

    def configure(self, cfg) -> None:
        """Take the field options of a :class:`dxtrain.train.TrainConfig` (``correction=None``: automatic,
        see :func:`correction_applies`)."""
        self.normalization, self.repulsion = cfg.normalization, cfg.repulsion
        auto = correction_applies(self.fields.values(), cfg.normalization, cfg.repulsion)
        self.correction = auto if cfg.correction is None else bool(cfg.correction)

    def points_per_landmark(self) -> float:
        """Summarised data points per landmark, over every group and shard (the fewest of the groups)."""
        return points_per_landmark(self.fields.values())

    @classmethod
    def build(cls, real_features: dict[str, np.ndarray], *, labels=None, temperatures, landmarks: int,
              method: str, seed: int = 0, memory_budget=None, progress: bool = False,
              log=None, rank: int = 0, world_size: int = 1, allreduce=None) -> "ProjectedFieldSet":
        """One :class:`dxfield.ProjectedField` per group of ``real_features``.

        Sharded (multi-process) build: with ``world_size > 1`` every process
        passes the *same* full ``real_features``, its ``rank`` and ``allreduce``,
        a callable summing a float64 NumPy array over the processes and
        returning the sum (the same on every process).  Landmarks, feature
        scale and factors come from the full data on every process (identical,
        deterministic from ``seed``); each process summarises only the rows
        ``rank::world_size``, then ``t``, ``G`` and ``n`` are all-reduced, so
        every process ends with the summaries of all the data (equal to a
        single-process build up to float64 rounding).
        """
        world_size, rank = int(world_size), int(rank)
        if world_size > 1 and allreduce is None:
            raise ValueError("a sharded build (world_size > 1) needs an allreduce callable")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        lab = None if labels is None else np.asarray(labels)
        fields = {}
        for i, (name, feats) in enumerate(real_features.items()):
            t0 = time.perf_counter()
            m = int(min(landmarks, _smallest_class(feats.shape[0], labels)))
            pf = dxfield.ProjectedField.build(
                feats, temperatures=temperatures, landmarks=m, method=method, labels=labels, seed=seed,
                memory_budget=memory_budget, progress=progress, summarize=world_size == 1)
            if world_size > 1:
                mine = feats[rank::world_size]
                if mine.shape[0]:
                    pf.add_summaries(mine, None if lab is None else lab[rank::world_size],
                                     progress=progress)
                _allreduce_summaries(pf, allreduce)
            fields[name] = pf
            if log is not None:
                log(f"summaries {i + 1}/{len(real_features)} '{name}': D={feats.shape[1]}, m={m} per shard, "
                    f"{time.perf_counter() - t0:.1f}s")
        return cls(fields)

    def __call__(self, features: dict[str, torch.Tensor], positives=None, labels: torch.Tensor | None = None,
                 pos_labels=None) -> dict[str, GroupDrift]:
        out = {}
        fallback = 0
        with torch_stream(next(iter(features.values()))):
            lab = None if labels is None else to_dxfield(labels)
            sample = {}
            if self.correction:
                if positives is None:
                    raise ValueError("correction needs the step's real mini-batch (positives)")
                sample["pos_sample_labels"] = None if pos_labels is None else to_dxfield(pos_labels)
            for name, f in features.items():
                pf = self.fields[name]
                if self.correction:
                    sample["pos_sample"] = to_dxfield(positives[name])
                v = pf.field(to_dxfield(f), labels=lab, normalization=self.normalization, repulsion=self.repulsion,
                             **sample)
                fallback += sum(pf.last_stats.get("attraction_fallback_rows", [0]))
                fallback += int(pf.last_stats.get("repulsion_fallback_rows", 0))
                out[name] = GroupDrift(to_torch(v, f), float(pf.feature_scale or 1.0))
        self.last_stats = {"fallback_rows": fallback}
        return out

    def diagnostics(self, features: dict[str, torch.Tensor], labels=None, limit: int = 4) -> dict:
        """Fidelity diagnostics of the first ``limit`` groups at the current generated features."""
        report = {}
        for name in list(features)[:limit]:
            d = self.fields[name].diagnostics(to_dxfield(features[name]))
            report[name] = {"nearest_landmark_distance": d["nearest_landmark_distance"],
                            "condition_number_max": max(max(s["condition_number"]) for s in d["shards"])}
        return report

    def save(self, folder: str) -> None:
        """One HDF5 cache per group plus a manifest, each written atomically."""
        os.makedirs(folder, exist_ok=True)
        names = {}
        for i, (name, pf) in enumerate(self.fields.items()):
            fname = f"group{i:03d}.h5"
            pf.save(os.path.join(folder, fname))
            names[name] = fname
        atomic_write(os.path.join(folder, "manifest.json"), lambda fh: json.dump({"groups": names}, fh, indent=1), "w")

    @classmethod
    def load(cls, folder: str, *, expect: dict[str, int] | None = None, temperatures=None,
             data: dict[str, np.ndarray] | None = None) -> "ProjectedFieldSet":
        """Load a cache folder written by :meth:`save`; ``expect`` maps group names to dimensions.

        With ``data`` (the real features per group), each cache's data fingerprint
        (shape and a hash of sampled rows) must match: summaries of another data
        set, split or encoder are refused.
        """
        path = os.path.join(folder, "manifest.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} is not a summaries folder (no manifest.json); "
                                    "create one with `dxtrain summarize`")
        with open(path) as fh:
            names = json.load(fh)["groups"]
        if expect is not None and set(expect) != set(names):
            missing, extra = sorted(set(expect) - set(names)), sorted(set(names) - set(expect))
            raise ValueError(f"summaries in {folder} do not match this run's feature groups "
                             f"(missing {missing[:5]}, unexpected {extra[:5]}); rebuild with the same data/encoder")
        fields = {}
        for name, fname in names.items():
            pf = dxfield.ProjectedField.load(os.path.join(folder, fname), temperatures=temperatures,
                                             dim=None if expect is None else expect[name])
            if data is not None and "sampled_rows_sha256" in pf.fingerprint:
                now = RowSource(data[name], "features").fingerprint()
                if (now["shape"], now["sampled_rows_sha256"]) != (pf.fingerprint["shape"],
                                                                   pf.fingerprint["sampled_rows_sha256"]):
                    raise ValueError(f"summaries in {folder} were built from other data than this run's "
                                     f"(group '{name}': cached shape {pf.fingerprint['shape']}, now {now['shape']}, "
                                     "or different samples); rebuild them with `dxtrain summarize` for this data")
            fields[name] = pf
        return cls(fields)


CORRECTION_MIN_POINTS_PER_LANDMARK = 4.0


def points_per_landmark(fields) -> float:
    """Data points per landmark of the summaries: ``sum n / sum m`` over the shards, the fewest of the fields."""
    ratios = [sum(s.n for s in pf.shards) / max(1, sum(s.m for s in pf.shards)) for pf in fields]
    return min(ratios) if ratios else 0.0


def correction_applies(fields, normalization: str, repulsion: str) -> bool:
    """Whether the automatic default turns the residual correction on (docs/design.md section 8.2).

    It needs the bidirectional field with exact repulsion, and pays where the
    Nystrom sums are approximate: when the summaries hold at least
    :data:`CORRECTION_MIN_POINTS_PER_LANDMARK` data points per landmark.  With
    about one point per landmark (every point a landmark, as on the digits:
    ~150 points for 128 landmarks per class) the Nystrom kernel is nearly exact
    on the data, so the correction only adds a sample's noise and its cost.
    """
    if normalization != "bidirectional" or repulsion != "exact":
        return False
    return points_per_landmark(fields) >= CORRECTION_MIN_POINTS_PER_LANDMARK


def _allreduce_summaries(pf: dxfield.ProjectedField, allreduce) -> None:
    """Sum every shard's ``t``, ``G`` and ``n`` over the processes: one ``allreduce`` call per field."""
    pf.set_summary_vector(allreduce(pf.summary_vector()))


def _smallest_class(n: int, labels) -> int:
    if labels is None:
        return n
    return int(np.bincount(np.asarray(labels)).min())
