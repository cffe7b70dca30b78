"""The settings of a training run (:class:`TrainConfig`) and their checks.

``dxtrain train``'s options map one to one onto these fields; a run saves them
as ``config.json`` in its folder and its checkpoint, and a resumed run reads
them back (:meth:`TrainConfig.from_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

import dxfield
from dxfield.projected import REPULSIONS

from .models import GENERATOR_KINDS
from .pretrained import is_pretrained_spec

FIELDS = ("projected", "exact")
NORMALIZATIONS = dxfield.NORMALIZATIONS


PRECISIONS = ("float32", "bf16")
LR_SCHEDULES = ("constant", "cosine")


def per_class(n: int, num_classes: int) -> int:
    """Samples per class out of ``n`` split evenly over the classes: at least one (as the loop draws)."""
    return max(1, n // num_classes)


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
    correction: bool | None = None  # projected field: correct the Nystrom sums with fresh real samples each
    #                                  step; None = auto (off until the uncorrected field's bias is material)
    correction_sample: int | None = None  # real samples per step for the correction (None: `positives`)
    pos_mass: int | str = "all"  # projected field: the positives' mass in Algorithm 2's row sums, as if this many
    #                              real samples (split over the classes) were drawn: "all" (every training sample
    #                              weighs 1), "positives" (the exact field's mini-batch), a count, or "balanced"
    #                              (measured each step: positives weigh as much as the batch; at most "all")
    landmarks: int = 128  # per class (projected field)
    landmark_method: str = "kmeans"
    conditional: bool = True  # use class labels when the data has them
    guidance: bool = False  # classifier-free guidance: alpha per class and step, unconditional real negatives
    guidance_max: float = 4.0  # the largest guidance scale drawn in training (dxtrain.guidance)
    guidance_negatives: int | None = None  # unconditional real negatives per step (None: batch)
    generator: str = "auto"  # "auto" (conv for images, mlp for vectors), "mlp", "conv" or "unet"
    gen_width: int | None = None  # the generator's width (None: its kind's default; dxtrain.models.make_generator)
    gen_depth: int | None = None  # its depth: MLP hidden layers, UNet blocks per resolution (None: the default)
    encoder: str = "auto"  # "auto" (builtin for images, none for vectors), "none", "builtin", a TorchScript
    #                        file or "module:callable"
    encoder_weights: str | None = None  # timm:/torchvision: encoders' weight file, or "random"
    encoder_size: int | None = None  # their input size (None: the size the weights were trained at)
    max_locations: int = 4  # per-location feature groups kept per encoder scale
    precision: str = "float32"  # "bf16": the generator and the encoder under bf16 autocast (the field stays float32)
    lr: float = 1e-3
    lr_warmup: int = 0  # steps of linear warmup from lr / lr_warmup
    lr_schedule: str = "constant"  # after the warmup: "constant", or "cosine" decay to 0 at `steps`
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    ema: float = 0.995
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    cpu_threads: int | None = None  # torch's threads on a CPU (None: 1 for the MLP on vectors, else torch's)
    log_every: int = 25
    sample_every: int = 250
    checkpoint_every: int = 250
    fidelity_every: int = 250
    eval_every: int = 0  # evaluate the EMA generator every this many steps, keeping checkpoint.best.pt (0: never)
    eval_samples: int | None = None  # samples of those evaluations (None: as many as the final one)
    test_fraction: float = 0.15
    cache: str | None = None  # summaries folder from `dxtrain summarize`
    features: str | None = None  # the real data's feature file (with an encoder; None: $DXTRAIN_CACHE/features/...)
    feature_ram: str | None = None  # features up to this size are read into RAM, larger stay in the file (None: 4GiB)
    memory_budget: str | None = None  # dxfield's per-call budget
    evaluate: bool = True
    progress: bool = True

    def validate(self) -> "TrainConfig":
        if self.field not in FIELDS:
            raise ValueError(f"field={self.field!r} is not valid; choose one of {FIELDS}")
        if self.correction is True and (self.field != "projected" or self.normalization != "bidirectional"
                                or self.repulsion != "exact"):
            raise ValueError("correction applies to field='projected' with normalization='bidirectional' and "
                             "repulsion='exact'")
        if self.repulsion not in REPULSIONS:
            raise ValueError(f"repulsion={self.repulsion!r} is not valid; choose one of {REPULSIONS}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r} is not valid; choose one of {NORMALIZATIONS}")
        for name in ("correction_sample", "gen_width", "gen_depth", "cpu_threads"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1 (or None: the default), got {getattr(self, name)}")
        self.pos_mass_count()  # "pos_mass=... is not valid; ..."
        if self.guidance_negatives is not None and int(self.guidance_negatives) < 1:
            raise ValueError(f"guidance_negatives must be >= 1 (or None: batch), got {self.guidance_negatives}")
        if not (np.isfinite(self.guidance_max) and self.guidance_max > 1):
            raise ValueError(f"guidance_max must be a finite number > 1, got {self.guidance_max}")
        if int(self.eval_every) < 0 or (self.eval_samples is not None and int(self.eval_samples) < 10):
            raise ValueError(f"eval_every must be >= 0 (0: never) and eval_samples >= 10 (or None), got "
                             f"{self.eval_every} and {self.eval_samples}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not valid; choose one of {LR_SCHEDULES}")
        if int(self.lr_warmup) < 0:
            raise ValueError(f"lr_warmup must be >= 0 steps, got {self.lr_warmup}")
        if self.generator not in GENERATOR_KINDS:
            raise ValueError(f"generator={self.generator!r} is not valid; choose one of {GENERATOR_KINDS}")
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
        if not self.temperatures or any(not (np.isfinite(t) and t > 0) for t in self.temperatures):
            raise ValueError(f"temperatures must be finite numbers > 0, got {self.temperatures}")
        for name, positive in (("lr", True), ("grad_clip", True), ("weight_decay", False)):
            value = float(getattr(self, name))
            if not (np.isfinite(value) and (value > 0 if positive else value >= 0)):
                raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, "
                                 f"got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not valid; choose one of {PRECISIONS}")
        if (self.encoder_weights is not None or self.encoder_size is not None) and not is_pretrained_spec(self.encoder):
            raise ValueError(f"--encoder-weights and --encoder-size (encoder_weights, encoder_size) apply to "
                             f"timm:<model> and torchvision:<model> encoders; encoder is {self.encoder!r}")
        for name in ("memory_budget", "feature_ram"):
            if getattr(self, name) is not None:
                dxfield.memory.parse_budget(getattr(self, name), name)  # "memory_budget='...' is not a size; ..."
        return self

    @property
    def feature_ram_bytes(self) -> int | None:
        return None if self.feature_ram is None else dxfield.memory.parse_budget(self.feature_ram, "feature_ram")

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): linear warmup over ``lr_warmup`` steps, then constant
        or a cosine decay reaching 0 at ``steps``."""
        warm = min(1.0, (step + 1) / self.lr_warmup) if self.lr_warmup else 1.0
        if self.lr_schedule == "cosine":
            warm *= 0.5 * (1.0 + math.cos(math.pi * min(step, self.steps) / max(self.steps, 1)))
        return self.lr * warm

    def pos_mass_count(self, num_classes: int = 0) -> int | str | None:
        """The projected field's positive mass as real samples per step, per class when ``num_classes`` (split as
        a step draws them); None: all the data; "balanced": the field measures it (docs/design.md section 8.28)."""
        if self.pos_mass == "all":
            return None
        if self.pos_mass == "balanced":
            return "balanced"
        if self.pos_mass == "positives":
            count = int(self.positives)
        else:
            try:
                count = int(self.pos_mass)
            except (TypeError, ValueError):
                count = 0
            if count < 1 or str(count) != str(self.pos_mass).strip():
                raise ValueError(f"--pos-mass (pos_mass) {self.pos_mass!r} is not valid; choose all (the default: "
                                 f"every training sample), balanced, positives (--positives), or a whole number >= 1")
        return per_class(count, num_classes) if num_classes else count

    @property
    def real_per_step(self) -> int:
        """Real samples a step draws: the exact field's positives, or the correction's sample."""
        return self.positives if self.field == "exact" else (self.correction_sample or self.positives)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "temperatures" in kw:
            kw["temperatures"] = tuple(kw["temperatures"])
        return cls(**kw)
