"""Pretrained image encoders from local weight files: ``timm:<model>`` and ``torchvision:<model>``.

The encoder is built without pretrained weights, then its weights are read from
``--encoder-weights FILE`` (safetensors, or a torch state dict); nothing is ever
downloaded.  ``--encoder-weights random`` keeps the random initialisation on
purpose (for tests, or a random-feature baseline); leaving the option out is an
error, so that a forgotten file cannot silently give random features.

:class:`PretrainedEncoder` wraps the network for dxtrain's images, which lie in
``[-1, 1]``: it maps them to ``[0, 1]``, repeats a grey channel to three,
resizes to the encoder's input size (``--encoder-size``, default the size the
weights were trained at: timm's ``pretrained_cfg``, 224 for torchvision),
normalises with the encoder's mean and std, and returns the feature maps of
every stage:

* **timm**: ``features_only=True`` (``feature_info`` says which layers), for any
  timm model that supports it, ViTs (DINO) included;
* **torchvision**: ``layer1`` ... ``layer4`` of the ResNet family, or the last
  block of each resolution of a ``features`` stack (VGG, ConvNeXt,
  EfficientNet, MobileNet, ...).

:class:`dxtrain.features.FeatureGroups` turns the maps into the drifting loss's
feature groups (per location, global mean and std, patch means and stds).
timm and torchvision are the ``images`` extra.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor, nn
from torch.nn import functional as F

PREFIXES = ("timm:", "torchvision:")
RANDOM = "random"  # --encoder-weights random: keep the random initialisation
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION_SIZE = 224


class PretrainedEncoder(nn.Module):
    """``x`` in ``[-1, 1]`` (B, C, H, W) -> the backbone's feature maps at ``size`` x ``size`` input."""

    def __init__(self, backbone: nn.Module, *, size: int, mean, std, channels: int, description: str):
        super().__init__()
        self.backbone = backbone
        self.size, self.channels, self.description = int(size), int(channels), description
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = (x + 1) * 0.5
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != self.channels:
            raise ValueError(f"{self.description} takes {self.channels}-channel images, got {x.shape[1]} channels")
        if tuple(x.shape[2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=self.size < min(x.shape[2:]))
        out = self.backbone((x - self.mean) / self.std)
        return list(out) if isinstance(out, (list, tuple)) else [out]


def is_pretrained_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIXES)


def load_pretrained(spec: str, *, weights: str | None, size: int | None = None) -> PretrainedEncoder:
    """The encoder ``timm:<model>`` or ``torchvision:<model>`` with ``weights`` (a file, or ``"random"``)."""
    library, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"encoder spec {spec!r} names no model; e.g. timm:resnet18 or torchvision:resnet18")
    if weights is None:
        raise ValueError(f"encoder {spec!r} needs --encoder-weights FILE (safetensors or a torch state dict; "
                         f"nothing is downloaded), or --encoder-weights {RANDOM} for its random initialisation")
    if weights != RANDOM and not os.path.isfile(weights):
        raise ValueError(f"--encoder-weights {weights!r} (for encoder {spec!r}) does not exist")
    if size is not None and int(size) < 8:
        raise ValueError(f"--encoder-size must be >= 8 pixels, got {size}")
    make = _timm if library == "timm" else _torchvision
    return make(spec, name, None if weights == RANDOM else weights, size)


def _import(spec: str, module: str):
    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or torchvision's "operator torchvision::nms does not exist"
        raise ValueError(f"encoder {spec!r} needs {module} (pip install 'driftxpress[images]'), and importing it "
                         f"failed: {type(error).__name__}: {error}.  torchvision must be the build made for the "
                         "installed torch (a CUDA torchvision wheel does not load beside a CPU torch)") from error


def _mismatch(spec: str, weights: str, error: Exception) -> ValueError:
    return ValueError(f"--encoder-weights {weights!r} does not fit encoder {spec!r}: {error}")


def _timm(spec: str, name: str, weights: str | None, size: int | None) -> PretrainedEncoder:
    timm = _import(spec, "timm")
    if not timm.is_model(name):
        raise ValueError(f"encoder {spec!r}: timm has no model {name!r} (timm.list_models() lists them)")
    kw = {"pretrained": weights is not None, "features_only": True}
    known = timm.get_pretrained_cfg(name)
    if size and known is not None and known.fixed_input_size:  # a ViT: its position embedding is resampled
        kw["img_size"] = int(size)
    if weights is not None:
        kw["pretrained_cfg_overlay"] = {"file": os.path.abspath(weights)}  # timm reads the file, never the hub
    try:
        model = timm.create_model(name, **kw)
    except (RuntimeError, KeyError, ValueError) as error:
        if weights is None:
            raise ValueError(f"encoder {spec!r}: timm cannot make it with features_only ({error})") from error
        raise _mismatch(spec, weights, error) from error
    cfg = model.pretrained_cfg
    in_size = size or int(cfg.get("input_size", (3, TORCHVISION_SIZE, TORCHVISION_SIZE))[-1])
    channels = int(cfg.get("input_size", (3,))[0])
    return PretrainedEncoder(model, size=in_size, mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD),
                             channels=channels, description=f"encoder {spec!r}")


def _torchvision(spec: str, name: str, weights: str | None, size: int | None) -> PretrainedEncoder:
    models = _import(spec, "torchvision.models")
    try:
        model = models.get_model(name, weights=None)
    except (ValueError, KeyError) as error:
        raise ValueError(f"encoder {spec!r}: torchvision has no model {name!r} "
                         "(torchvision.models.list_models() lists them)") from error
    if weights is not None:
        try:
            model.load_state_dict(read_state_dict(weights), strict=True)
        except (RuntimeError, ValueError) as error:
            raise _mismatch(spec, weights, error) from error
    return PretrainedEncoder(_Stages(model, spec), size=size or TORCHVISION_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             channels=3, description=f"encoder {spec!r}")


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict from a safetensors file or a torch file (tensors only: ``weights_only``)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, zip errors, ...
        raise ValueError(f"cannot read {path!r} as a torch state dict ({type(error).__name__}: {error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict (a mapping of names to tensors)")
    return state


class _Stages(nn.Module):
    """A torchvision classifier's feature maps, one per stage (see the module's docstring)."""

    RESNET = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, model: nn.Module, spec: str):
        super().__init__()
        if all(hasattr(model, n) for n in self.RESNET):
            self.kind = "resnet"
        elif isinstance(getattr(model, "features", None), nn.Sequential):
            self.kind = "features"
        else:
            raise ValueError(f"encoder {spec!r}: dxtrain takes torchvision models with layer1..layer4 (ResNet family) "
                             "or a `features` stack (VGG, ConvNeXt, EfficientNet, MobileNet...); use timm: for others")
        self.model = model

    def forward(self, x: Tensor) -> list[Tensor]:
        m = self.model
        if self.kind == "resnet":
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            outs = []
            for n in self.RESNET:
                x = getattr(m, n)(x)
                outs.append(x)
            return outs
        outs = []
        for block in m.features:
            x = block(x)
            if outs and outs[-1].shape[2:] == x.shape[2:]:
                outs[-1] = x  # the last block of each resolution
            else:
                outs.append(x)
        return outs
