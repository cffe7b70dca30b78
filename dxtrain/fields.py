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
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import dxfield
from dxfield.atomic import atomic_write
from dxfield.backend import to_host
from dxfield.projected import RowSource
from dxfield.summaries import distinct_rows


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


def guidance_negatives(negatives: dict | None, name: str) -> dict:
    """dxfield's negatives options for feature group ``name`` from guidance's weighted unconditional negatives
    (:class:`dxtrain.guidance.Guide`): the generated batch plus those, each repelling its own class's queries."""
    if negatives is None:
        return {}
    return {"neg": to_dxfield(negatives["features"][name]), "neg_labels": to_dxfield(negatives["labels"]),
            "neg_weight": to_dxfield(negatives["weight"]), "include_self": True}


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
                 labels: torch.Tensor | None = None, pos_labels: torch.Tensor | None = None,
                 negatives: dict | None = None, pos_rows=None) -> dict[str, GroupDrift]:
        # ``pos_rows`` (the positives' training rows) matter to the projected field only.
        # Class-conditional runs use one sweep per group: each generated sample meets only the
        # positives and the other generated samples of its own class (dxfield masks the rest).
        # ``negatives``: guidance's weighted unconditional negatives (dxtrain.guidance.Guide).
        out = {}
        with torch_stream(next(iter(features.values()))):
            lab = None if labels is None else to_dxfield(labels)
            plab = None if pos_labels is None else to_dxfield(pos_labels)
            for name, f in features.items():
                v, s = dxfield.drift_field(to_dxfield(f), to_dxfield(positives[name]),
                                           temperatures=self.temperatures, labels=lab, pos_labels=plab,
                                           normalization=self.normalization, return_scale=True,
                                           memory_budget=self.memory_budget, **guidance_negatives(negatives, name))
                out[name] = GroupDrift(to_torch(v, f), float(s))
        return out


class ProjectedFieldSet:
    """DriftXpress: a :class:`dxfield.ProjectedField` per feature group over the whole training set."""

    name = "projected"

    def __init__(self, fields: dict[str, dxfield.ProjectedField], normalization: str = "bidirectional",
                 repulsion: str = "exact", correction: bool = False, settings: dict | None = None):
        self.fields = fields
        self.settings = settings  # how the summaries were built (saved in manifest.json; None: not recorded)
        self.normalization = normalization  # of every group's field (see ProjectedField.field)
        self.repulsion = repulsion
        self.correction = correction  # correct with the step's real mini-batch (pos_sample)
        self.last_stats: dict = {}
        self.maps: dict[str, torch.Tensor] = {}  # per group: dxfield's sample maps of every training row
        self._map_source = None  # (features, labels, byte limit, log) to make them from, once needed
        self.pos_mass = None  # the positives' mass per class in the row sums (None: every training row)

    def configure(self, cfg) -> None:
        """Take the field options of a :class:`dxtrain.train.TrainConfig` (``correction=None``: automatic,
        off until :meth:`decide_correction` finds a material bias; docs/design.md section 8.12)."""
        self.normalization, self.repulsion = cfg.normalization, cfg.repulsion
        self.auto_correction = cfg.correction is None and correction_applies(cfg.normalization, cfg.repulsion)
        self.correction = bool(cfg.correction)  # None (automatic) starts off
        self.correction_from = None  # the step the automatic correction turned on at
        pf = next(iter(self.fields.values()))
        count = cfg.pos_mass_count(len(pf.shards) if pf.classes != [None] else 0)
        self.pos_mass = count if count in (None, "balanced") else float(count)

    def keep_sample_maps(self, features: dict, labels, limit: int, log=None) -> None:
        """Make, at the first corrected call, each group's :meth:`dxfield.ProjectedField.sample_maps` of every
        training row (``features``, NumPy arrays in RAM, rows as the steps' ``pos_rows`` index them), when they
        fit in ``limit`` bytes: the correction's samples then skip their landmark distances and ``m x m``
        products (docs/design.md section 8.18).  Larger maps are not made; the correction works without them."""
        self._map_source = (features, labels, int(limit), log)

    def sample_map_bytes(self, n: int) -> int:
        """Bytes of the sample maps of ``n`` rows over every group."""
        return sum(n * len(pf.temperatures) * max(sh.m for sh in pf.shards) * np.dtype(pf.dtype).itemsize
                   for pf in self.fields.values())

    def _make_sample_maps(self) -> None:
        features, labels, limit, log = self._map_source
        self._map_source = None
        n = next(iter(features.values())).shape[0]
        need = self.sample_map_bytes(n)
        if need > limit:
            if log is not None:
                log(f"correction: the sample maps of the {n} training rows would take {need / 2**20:.0f} MiB, more "
                    f"than the {limit / 2**20:.0f} MiB left of --feature-ram: each step computes its "
                    "sample's")
            return
        t0 = time.perf_counter()
        for name, pf in self.fields.items():
            self.maps[name] = torch.from_numpy(np.ascontiguousarray(pf.sample_maps(features[name], labels)))
        if log is not None:
            log(f"correction: sample maps of the {n} training rows kept in RAM ({need / 2**20:.0f} MiB, "
                f"{time.perf_counter() - t0:.1f}s)")

    def sample_options(self, name: str, positives: dict, pos_rows, device) -> dict:
        """dxfield's ``pos_sample`` (and ``pos_sample_maps`` when kept) of group ``name``."""
        out = {"pos_sample": to_dxfield(positives[name])}
        if pos_rows is not None and name in self.maps:
            rows = torch.as_tensor(pos_rows, dtype=torch.long)
            out["pos_sample_maps"] = to_dxfield(self.maps[name].index_select(0, rows).to(device))
        return out

    def correction_check_due(self, step: int) -> bool:
        """Whether the automatic correction is measured before step ``step + 1`` (after 25, 50, 100, ...
        steps, until it turns on)."""
        return (self.auto_correction and not self.correction and step >= CORRECTION_FIRST_CHECK
                and step % CORRECTION_FIRST_CHECK == 0 and (step // CORRECTION_FIRST_CHECK).bit_count() == 1)

    def bias_terms(self, features: dict[str, torch.Tensor], samples, labels=None) -> tuple[float, float]:
        """``(bias^2, signal^2)``: the uncorrected field's squared bias and the field's squared norm, per
        query, summed over the groups, estimated from two independent real samples ``samples`` (each
        ``(features, labels)`` or ``(features, labels, training rows)``, the rows for the kept sample maps)
        at the generated ``features``.

        With ``V_1``, ``V_2`` the field corrected by each sample (unbiased for the sums over all the
        data) and ``V_u`` the uncorrected one: ``E|V_1 - V_2|^2 = 2 var``, so
        ``bias^2 = |V_u - (V_1 + V_2) / 2|^2 - var / 2`` and ``signal^2 = |(V_1 + V_2) / 2|^2 - var / 2``.
        """
        bias2 = signal2 = 0.0
        with torch_stream(next(iter(features.values()))):
            lab = None if labels is None else to_dxfield(labels)
            for name, f in features.items():
                pf, x = self.fields[name], to_dxfield(f)
                opts = dict(labels=lab, normalization=self.normalization, repulsion=self.repulsion,
                            pos_mass=self.pos_mass)
                vu = pf.field(x, **opts)
                v1, v2 = (pf.field(x, **self.sample_options(name, s[0], (*s, None)[2], f.device),
                                   pos_sample_labels=None if s[1] is None else to_dxfield(s[1]), **opts)
                          for s in samples)
                var = 0.5 * float(((v1 - v2) ** 2).sum(axis=1).mean())
                mid = 0.5 * (v1 + v2)
                bias2 += float(((vu - mid) ** 2).sum(axis=1).mean()) - 0.5 * var
                signal2 += float((mid ** 2).sum(axis=1).mean()) - 0.5 * var
        return bias2, signal2

    def decide_correction(self, bias2: float, signal2: float, step: int) -> float:
        """Turn the automatic correction on at ``step`` when the measured bias RMS is at least
        :data:`CORRECTION_BIAS_SHARE` of the field's; returns that share."""
        share = math.sqrt(max(bias2, 0.0) / signal2) if signal2 > 0 else 0.0
        if share >= CORRECTION_BIAS_SHARE:
            self.correction, self.correction_from = True, step
        return share

    def state(self) -> dict:
        """What a checkpoint keeps for an exact resume: when the automatic correction turned on."""
        return {"correction_from": self.correction_from}

    def restore(self, state: dict | None) -> None:
        if state and state.get("correction_from") is not None and self.auto_correction:
            self.correction, self.correction_from = True, int(state["correction_from"])

    def points_per_landmark(self) -> float:
        """Summarised data points per landmark, over every group and shard (the fewest of the groups)."""
        return points_per_landmark(self.fields.values())

    @classmethod
    def build(cls, real_features: dict[str, np.ndarray], *, labels=None, temperatures, landmarks: int,
              method: str, seed: int = 0, memory_budget=None, progress: bool = False,
              log=None, rank: int = 0, world_size: int = 1, allreduce=None) -> "ProjectedFieldSet":
        """One :class:`dxfield.ProjectedField` per group of ``real_features``.

        ``landmarks`` per class (or in all), clamped per class: a class holding
        fewer samples uses all of them as its landmarks (no selection), the
        others keep ``landmarks``; ``log`` hears of every clamp once.  The
        settings are recorded in :attr:`settings` (and by :meth:`save` in the
        manifest).  ``progress``: dxfield's bars while streaming the summaries.

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
        n = next(iter(real_features.values())).shape[0] if real_features else 0
        plan = landmarks_per_class(landmarks, n, lab)
        if log is not None:
            log(f"building summaries of {n} samples: {len(real_features)} feature group(s), "
                f"{_describe_plan(plan)} landmarks ({method}), temperatures {list(temperatures)}")
            announce_landmarks(plan, landmarks, log)
        fields = {}
        for i, (name, feats) in enumerate(real_features.items()):
            t0 = time.perf_counter()
            if all(m == landmarks for m in plan.values()):  # nothing clamped: dxfield selects m per class
                pf = dxfield.ProjectedField.build(
                    feats, temperatures=temperatures, landmarks=int(landmarks), method=method, labels=labels,
                    seed=seed, memory_budget=memory_budget, progress=progress, summarize=world_size == 1)
            else:
                pf = _build_per_class(feats, lab, plan, temperatures=temperatures, method=method, seed=seed,
                                      memory_budget=memory_budget, progress=progress, summarize=world_size == 1)
            if world_size > 1:
                mine = feats[rank::world_size]
                if mine.shape[0]:
                    pf.add_summaries(mine, None if lab is None else lab[rank::world_size],
                                     progress=progress)
                _allreduce_summaries(pf, allreduce)
            fields[name] = pf
            if log is not None:
                log(f"summaries {i + 1}/{len(real_features)} '{name}': D={feats.shape[1]}, "
                    f"m={_describe_plan({s.label: s.m for s in pf.shards})} per shard, "
                    f"{time.perf_counter() - t0:.1f}s")
        return cls(fields, settings={"landmarks": int(landmarks), "landmark_method": method, "seed": int(seed),
                                     "temperatures": [float(t) for t in temperatures]})

    def __call__(self, features: dict[str, torch.Tensor], positives=None, labels: torch.Tensor | None = None,
                 pos_labels=None, negatives: dict | None = None, pos_rows=None) -> dict[str, GroupDrift]:
        out = {}
        fallback = 0
        masses = []
        if self.correction and pos_rows is not None and self._map_source is not None:
            self._make_sample_maps()
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
                    sample.update(self.sample_options(name, positives, pos_rows, f.device))
                v = pf.field(to_dxfield(f), labels=lab, normalization=self.normalization, repulsion=self.repulsion,
                             pos_mass=self.pos_mass, **sample, **guidance_negatives(negatives, name))
                fallback += sum(pf.last_stats.get("attraction_fallback_rows", [0]))
                fallback += int(pf.last_stats.get("repulsion_fallback_rows", 0))
                if "log_pos_mass" in pf.last_stats:
                    masses.append(pf.last_stats["log_pos_mass"])
                out[name] = GroupDrift(to_torch(v, f), float(pf.feature_scale or 1.0))
        self.last_stats = {"fallback_rows": fallback, "log_pos_mass": masses}
        return out

    def balanced_mass(self) -> float | None:
        """The last call's balanced positives' mass (``--pos-mass balanced``) in real samples per class: the median
        over the feature groups and classes; None without it.  Synchronises with the device."""
        logs = self.last_stats.get("log_pos_mass")
        if not logs:
            return None
        return round(float(np.exp(np.median(np.concatenate([to_host(a).ravel() for a in logs])))), 1)

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
        manifest = {"groups": names, **({"settings": self.settings} if self.settings else {})}
        atomic_write(os.path.join(folder, "manifest.json"), lambda fh: json.dump(manifest, fh, indent=1), "w")

    @staticmethod
    def read_settings(folder: str) -> dict | None:
        """The build settings recorded in a summaries folder's manifest (None: none recorded)."""
        with open(os.path.join(folder, "manifest.json")) as fh:
            return json.load(fh).get("settings")

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
            manifest = json.load(fh)
        names = manifest["groups"]
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
        return cls(fields, settings=manifest.get("settings"))


CORRECTION_BIAS_SHARE = 0.25
"""The automatic correction turns on once the uncorrected field's bias RMS reaches this share of the
field's RMS (a bias a quarter of the field turns its direction by up to 14 degrees; docs/design.md
section 8.12)."""
CORRECTION_FIRST_CHECK = 25
"""The automatic correction is measured after this many steps, then after twice as many, and so on."""


def points_per_landmark(fields) -> float:
    """Data points per landmark of the summaries: ``sum n / sum m`` over the shards, the fewest of the fields."""
    ratios = [sum(s.n for s in pf.shards) / max(1, sum(s.m for s in pf.shards)) for pf in fields]
    return min(ratios) if ratios else 0.0


def correction_applies(normalization: str, repulsion: str) -> bool:
    """Whether the residual correction can apply: the bidirectional field with exact repulsion
    (docs/design.md section 2.7)."""
    return normalization == "bidirectional" and repulsion == "exact"


def _allreduce_summaries(pf: dxfield.ProjectedField, allreduce) -> None:
    """Sum every shard's ``t``, ``G`` and ``n`` over the processes: one ``allreduce`` call per field."""
    pf.set_summary_vector(allreduce(pf.summary_vector()))


def landmarks_per_class(landmarks: int, n: int, labels) -> dict:
    """Landmarks each shard gets: ``landmarks`` clamped to its class's size (``{None: m}`` without labels)."""
    if labels is None:
        return {None: int(min(landmarks, n))}
    counts = np.bincount(np.asarray(labels))
    return {int(c): int(min(landmarks, counts[c])) for c in np.flatnonzero(counts)}


def announce_landmarks(plan: dict, landmarks: int, log) -> None:
    """Say which classes (or the data set) hold fewer samples than ``landmarks`` and so use all of them."""
    clamped = {c: m for c, m in plan.items() if m < landmarks}
    if not clamped:
        return
    large = max(plan.values()) > 4096
    cost = (" (many landmarks: factoring an m x m matrix per class and temperature and an O(batch x m) step "
            "take a while)") if large else ""
    if None in plan:
        log(f"landmarks: {landmarks} asked for, but the training split holds {plan[None]} samples: all "
            f"{plan[None]} are landmarks{cost}")
    elif len(clamped) == len(plan):
        log(f"landmarks: {landmarks} per class asked for, more than any class holds: every class uses all its "
            f"samples as landmarks ({_describe_plan(plan)} per class){cost}")
    else:
        listed = ", ".join(f"class {c}: {m}" for c, m in list(clamped.items())[:10])
        log(f"landmarks: {landmarks} per class, but {len(clamped)} of {len(plan)} classes hold fewer samples and "
            f"use all of them ({listed}{', ...' if len(clamped) > 10 else ''}){cost}")


def _describe_plan(plan: dict) -> str:
    lo, hi = min(plan.values(), default=0), max(plan.values(), default=0)
    return f"{hi}" if lo == hi else f"{lo}..{hi}"


def _build_per_class(feats: np.ndarray, lab, plan: dict, *, temperatures, method: str, seed: int, memory_budget,
                     progress: bool, summarize: bool) -> dxfield.ProjectedField:
    """A :class:`dxfield.ProjectedField` with ``plan[c]`` landmarks for class ``c`` (all its samples where it
    holds no more than that), on the feature scale of the whole data, like ``ProjectedField.build``'s."""
    # the scale, settings and fingerprint of the whole data (one throwaway landmark: nothing is selected)
    base = dxfield.ProjectedField.build(feats, temperatures=temperatures, landmarks=feats[:1], seed=seed,
                                        memory_budget=memory_budget, summarize=False)
    shards = []
    for c, m in plan.items():
        rows = feats if c is None else feats[np.flatnonzero(lab == c)]  # increasing indices: HDF5 reads them too
        marks = distinct_rows(np.asarray(rows, np.float64)) if m >= rows.shape[0] else m
        part = dxfield.ProjectedField.build(rows, temperatures=temperatures, landmarks=marks, method=method,
                                            feature_scale=base.feature_scale, seed=seed,
                                            memory_budget=memory_budget, summarize=False)
        shard = part.shards[0]
        shard.label = c
        shards.append(shard)
    pf = dxfield.ProjectedField(kernel=base.kernel, temperatures=base.temperatures, ridge=base.ridge,
                                eig_clamp=base.eig_clamp, feature_scale=base.feature_scale, dim=base.dim,
                                centre=np.mean(np.concatenate([s.landmarks for s in shards]), axis=0),
                                shards=shards, fingerprint=base.fingerprint, dtype=base.dtype,
                                den_floor=base.den_floor, memory_budget=base.memory_budget)
    if summarize:
        pf.add_summaries(feats, lab, progress=progress)
    return pf
