"""Feature groups ``phi(x)`` for the drifting loss, from a frozen encoder.

The drifting loss is computed per feature group (docs/design.md section 2.3): for each
group ``g`` with features ``phi_g(x)`` of dimension ``D_g``, the field ``V_g``
is computed in that group's space and the loss term is
``MSE(phi_g(x) / S_g, stopgrad(phi_g(x) / S_g + V_g))``; the terms are summed.
Many small groups (one per location, global and patch statistics) give the
generator a richer signal than one long vector (the drifting paper's recipe).

:class:`FeatureGroups` turns a batch of samples into those groups:

* vectors ``(D,)``: ``{"x": x}``;
* images without an encoder: ``{"pixels": x.flatten(1)}``;
* images with an encoder returning feature maps ``(B, C', H', W')`` (one or a
  list, one per scale ``i``):

  - ``"s{i}.loc{h}_{w}"``: the ``C'`` features at location ``(h, w)``, for all
    locations or an evenly spaced grid of at most ``max_locations``;
  - ``"s{i}.mean"``, ``"s{i}.std"``: mean / std over all locations, ``(B, C')``;
  - ``"s{i}.p2.mean"``, ``"s{i}.p2.std"``: mean / std of each cell of a 2x2 grid
    of patches, flattened ``(B, C' * 4)`` (when ``H', W' >= 4``: patches of at least 2x2);
  - ``"s{i}.p4.mean"``, ``"s{i}.p4.std"``: the same on a 4x4 grid (``H', W' >= 8``),
    ``(B, C' * 16)``;
  - ``"pixels"`` (the raw sample flattened) unless ``include_pixels=False``.

  An encoder output of shape ``(B, D')`` is one group ``"s{i}"``.

The encoder is frozen (eval mode, ``requires_grad`` False) but the features
stay differentiable with respect to ``x``: the loss back-propagates through
the encoder into the generator.

Encoders come from :func:`load_encoder`: ``"none"``, ``"builtin"`` (fixed
random convolutions, :func:`builtin_encoder`; nothing is downloaded), a
TorchScript file, or ``"package.module:callable"``.

Example
-------
>>> import torch
>>> groups = FeatureGroups((1, 8, 8), "builtin")
>>> feats = groups(torch.zeros(2, 1, 8, 8))
>>> feats["s0.mean"].shape, groups.dims["s1.p4.mean"]
(torch.Size([2, 32]), 1024)
"""

from __future__ import annotations

import importlib
import math
import os

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .pretrained import is_pretrained_spec, load_pretrained

ENCODER_SPECS = ('"none"', '"builtin"', '"timm:<model>"', '"torchvision:<model>"', "a TorchScript file (.pt, .pth, .ts)",
                 '"package.module:callable"')
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
PATCH_GRIDS = (2, 4)
STD_EPS = 1e-6  # keeps the std's gradient finite where a patch is constant


class BuiltinEncoder(nn.Module):
    """Two fixed random 3x3 convolutions; maps at two scales ``[(B, 32, H, W), (B, 64, ceil(H/2), ceil(W/2))]``.

    Random features, not a trained network: a cheap, download-free stand-in
    for a pretrained encoder that still gives the loss local, multi-scale
    structure to match.
    """

    def __init__(self, in_channels: int, seed: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        rng = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
                # He initialisation keeps the activations' scale about constant through GELU.
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=rng) * math.sqrt(2.0 / fan_in))
                conv.bias.zero_()
        freeze(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        fine = F.gelu(self.conv1(x))
        coarse = F.gelu(self.conv2(fine))
        return [fine, coarse]


def freeze(encoder: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad`` False on every parameter; returns ``encoder``."""
    encoder.eval()
    for parameter in encoder.parameters():  # not requires_grad_(): TorchScript modules lack it
        parameter.requires_grad_(False)
    return encoder


def builtin_encoder(in_channels: int, seed: int = 0) -> nn.Module:
    """The built-in frozen random-feature encoder (:class:`BuiltinEncoder`), deterministic given ``seed``."""
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
    return BuiltinEncoder(in_channels, seed)


def load_encoder(spec: str, *, in_channels: int | None = None, seed: int = 0, weights: str | None = None,
                 size: int | None = None) -> nn.Module | None:
    """The frozen encoder named by ``spec``.

    Parameters
    ----------
    spec : str
        * ``"none"`` -> None (features are the raw sample);
        * ``"builtin"`` -> :func:`builtin_encoder` (needs ``in_channels``);
        * a path ending in ``.pt``, ``.pth`` or ``.ts`` -> a TorchScript module,
          ``torch.jit.load(path, map_location="cpu")`` (save one with
          ``torch.jit.save(torch.jit.script(model), path)``);
        * ``"timm:<model>"``, ``"torchvision:<model>"`` -> a pretrained encoder with
          its ``weights`` from a local file, input resized to ``size``
          (:func:`dxtrain.pretrained.load_pretrained`);
        * ``"package.module:callable"`` -> ``callable()``, which must return an
          ``nn.Module`` (the module must be importable).
    in_channels, seed : int
        Used by ``"builtin"`` only.
    weights, size :
        Used by ``"timm:"`` and ``"torchvision:"`` only.

    Raises
    ------
    ValueError
        For any spec that cannot give an encoder; the message names the spec
        and what would be valid.
    """
    if not isinstance(spec, str):
        raise ValueError(f"encoder spec must be a string, one of {', '.join(ENCODER_SPECS)}; got {spec!r}")
    if spec == "none":
        return None
    if spec == "builtin":
        if in_channels is None:
            raise ValueError('encoder "builtin" needs in_channels (the image channels C); '
                             'FeatureGroups(sample_shape, "builtin") supplies it from the sample shape')
        return builtin_encoder(in_channels, seed)
    if is_pretrained_spec(spec):
        return freeze(load_pretrained(spec, weights=weights, size=size))
    if spec.lower().endswith(TORCHSCRIPT_SUFFIXES):
        if not os.path.isfile(spec):
            raise ValueError(f"encoder file {spec!r} does not exist")
        try:
            encoder = torch.jit.load(spec, map_location="cpu")
        except Exception as error:  # torch raises RuntimeError or others depending on the file
            raise ValueError(f"encoder file {spec!r} is not a TorchScript module ({error}); save one with "
                             "torch.jit.save(torch.jit.script(model), path)") from error
        return freeze(encoder)
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"encoder spec {spec!r} must look like 'package.module:callable'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"encoder spec {spec!r}: cannot import module {module_name!r} ({error})") from error
        factory = module
        for part in attribute.split("."):
            if not hasattr(factory, part):
                raise ValueError(f"encoder spec {spec!r}: {module_name!r} has no attribute {attribute!r}")
            factory = getattr(factory, part)
        if not callable(factory):
            raise ValueError(f"encoder spec {spec!r}: {attribute!r} is not callable")
        encoder = factory()
        if not isinstance(encoder, nn.Module):
            raise ValueError(f"encoder spec {spec!r}: {attribute}() returned {type(encoder).__name__}, "
                             "not a torch.nn.Module")
        return freeze(encoder)
    raise ValueError(f"unknown encoder spec {spec!r}; valid: {', '.join(ENCODER_SPECS)}")


def _grid(size: tuple[int, int], max_locations: int | None) -> list[tuple[int, int]]:
    """Locations ``(h, w)`` of a map of ``size``: all, or an evenly spaced grid of at most ``max_locations``."""
    height, width = size
    if max_locations is None or height * width <= max_locations:
        return [(h, w) for h in range(height) for w in range(width)]
    # Split the budget between rows and columns in proportion to the map's sides.
    rows = min(height, max(1, round(math.sqrt(max_locations * height / width))))
    cols = min(width, max(1, max_locations // rows))
    row_idx = sorted({round(v) for v in torch.linspace(0, height - 1, rows).tolist()})
    col_idx = sorted({round(v) for v in torch.linspace(0, width - 1, cols).tolist()})
    return [(h, w) for h in row_idx for w in col_idx]


def _patch_moments(fmap: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Mean and std of each cell of a ``grid`` x ``grid`` split of the map, each ``(B, C, grid, grid)``.

    ``grid=1`` gives the global statistics. Cells come from adaptive average
    pooling, so sizes that ``grid`` does not divide still work. Centring by the
    global mean first avoids cancellation in ``E[x^2] - E[x]^2``.
    """
    global_mean = fmap.mean(dim=(2, 3), keepdim=True)
    centred = fmap - global_mean
    centred_mean = F.adaptive_avg_pool2d(centred, grid)
    var = F.adaptive_avg_pool2d(centred * centred, grid) - centred_mean * centred_mean
    return centred_mean + global_mean, torch.sqrt(var.clamp_min(0.0) + STD_EPS)


class FeatureGroups(nn.Module):
    """Frozen feature extractor: ``x (B, *sample_shape)`` -> ``{group name: (B, D_g)}``.

    Parameters
    ----------
    sample_shape : tuple of int
        ``(D,)`` for vectors or ``(C, H, W)`` for images.
    encoder : str, nn.Module or None
        A spec for :func:`load_encoder` (``"none"``, ``"builtin"``, a
        TorchScript path, ``"package.module:callable"``), an ``nn.Module``
        mapping ``(B, *sample_shape)`` to a map ``(B, C', H', W')``, a vector
        ``(B, D')`` or a list of those, or None. The encoder is frozen.
    include_pixels : bool
        Also return the raw sample flattened (``"pixels"``, or ``"x"`` for
        vectors) next to the encoder's groups. Without an encoder the raw
        sample is the only group and is always returned.
    max_locations : int or None
        Per-location groups per map: all locations when the map has at most
        this many, else a fixed, evenly spaced grid of at most this many;
        None keeps every location.
    bf16 : bool
        Run the encoder under bf16 autocast (GPU, and CPUs that support it);
        the groups are float32 whatever the encoder computed in.

    Attributes
    ----------
    names : list of str
        Group names, in the order the dict returned by ``forward`` has them.
    dims : dict of str to int
        ``D_g`` per group.

    All groups are float32 and contiguous, ready for DLPack.
    """

    def __init__(self, sample_shape: tuple[int, ...], encoder: str | nn.Module | None = "none", *,
                 include_pixels: bool = True, max_locations: int | None = 16, bf16: bool = False):
        super().__init__()
        shape = tuple(int(s) for s in sample_shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise ValueError(f"sample_shape must be (D,) for vectors or (C, H, W) for images, with positive "
                             f"sizes; got {tuple(sample_shape)!r}")
        if max_locations is not None and (not isinstance(max_locations, int) or max_locations < 1):
            raise ValueError(f"max_locations must be an int >= 1 or None, got {max_locations!r}")
        if isinstance(encoder, str):
            if encoder == "builtin" and len(shape) != 3:
                raise ValueError(f'encoder "builtin" is a conv encoder for images (C, H, W); sample_shape is {shape}')
            encoder = load_encoder(encoder, in_channels=shape[0] if len(shape) == 3 else None)
        elif encoder is not None and not isinstance(encoder, nn.Module):
            raise ValueError(f"encoder must be a spec string, an nn.Module or None; got {type(encoder).__name__}")
        self.sample_shape = shape
        self.encoder = freeze(encoder) if encoder is not None else None
        self.include_pixels = bool(include_pixels) or self.encoder is None
        self.max_locations = max_locations
        self.raw_name = "x" if len(shape) == 1 else "pixels"
        self.bf16 = bool(bf16)  # the encoder under bf16 autocast; the groups stay float32

        # One probe pass fixes the layout: map sizes, hence locations and group dims.
        self._locations: list[list[tuple[int, int]] | None] = []
        if self.encoder is not None:
            with torch.no_grad():
                device = next(self.encoder.parameters(), torch.zeros(0)).device
                outputs = self._encode(torch.zeros(1, *shape, device=device))
            for output in outputs:
                self._locations.append(_grid(output.shape[2:], max_locations) if output.ndim == 4 else None)
            probe = self._groups(torch.zeros(1, *shape), [o.cpu() for o in outputs])
        else:
            probe = self._groups(torch.zeros(1, *shape), [])
        self.dims = {name: value.shape[1] for name, value in probe.items()}
        self.names = list(self.dims)

    def describe(self) -> str:
        """The groups by size, e.g. ``"21 groups: 16 x 64-D, 5 x 128-D"``."""
        sizes: dict[int, int] = {}
        for d in self.dims.values():
            sizes[d] = sizes.get(d, 0) + 1
        return f"{len(self.dims)} group(s): " + ", ".join(f"{k} x {d}-D" for d, k in sorted(sizes.items()))

    def train(self, mode: bool = True) -> "FeatureGroups":
        # The encoder stays in eval mode whatever the trainer asks of its parents.
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def _encode(self, x: Tensor) -> list[Tensor]:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.encoder(x)
        outputs = list(output) if isinstance(output, (list, tuple)) else [output]
        for i, tensor in enumerate(outputs):
            if not isinstance(tensor, Tensor) or tensor.ndim not in (2, 4) or tensor.shape[0] != x.shape[0]:
                got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"encoder output {i} must be a (B, C, H, W) feature map or a (B, D) vector "
                                 f"with B={x.shape[0]}; got {got} (reshape token outputs to a grid)")
        return outputs

    def _groups(self, x: Tensor, outputs: list[Tensor]) -> dict[str, Tensor]:
        groups: dict[str, Tensor] = {}
        for i, output in enumerate(outputs):
            output = output.float()
            if output.ndim == 2:
                groups[f"s{i}"] = output
                continue
            for h, w in self._locations[i]:
                groups[f"s{i}.loc{h}_{w}"] = output[:, :, h, w]
            if output.shape[2] * output.shape[3] > 1:  # a 1x1 map is its one location: no spread, no new mean
                mean, std = _patch_moments(output, 1)
                groups[f"s{i}.mean"] = mean.flatten(1)
                groups[f"s{i}.std"] = std.flatten(1)
            for grid in PATCH_GRIDS:
                if min(output.shape[2:]) >= 2 * grid:  # a patch of one location has no spread
                    mean, std = _patch_moments(output, grid)
                    groups[f"s{i}.p{grid}.mean"] = mean.flatten(1)
                    groups[f"s{i}.p{grid}.std"] = std.flatten(1)
        if self.include_pixels:
            groups[self.raw_name] = x.flatten(1)
        return {name: value.float().contiguous() for name, value in groups.items()}

    @torch.no_grad()
    def pooled(self, x: Tensor) -> Tensor | None:
        """The encoder's outputs averaged over their locations and concatenated, ``(B, sum of channels)``:
        the feature space of the evaluation's ``FD_encoder``; None without an encoder."""
        if self.encoder is None:
            return None
        outputs = self._encode(x.float())
        return torch.cat([o.float().mean(dim=(2, 3)) if o.ndim == 4 else o.float() for o in outputs], dim=1)

    @property
    def encoder_features(self):
        """:meth:`pooled_array` where there is an encoder, else None: ``evaluate_samples``'s
        ``encoder_features``."""
        return self.pooled_array if self.encoder is not None else None

    def pooled_array(self, images, batch: int = 256):
        """:meth:`pooled` of images ``(N, C, H, W)`` (NumPy, in ``[-1, 1]``) as a float64 NumPy array, in batches
        on the groups' device: the ``encoder_features`` of :func:`dxtrain.evaluate.evaluate_samples`."""
        device = next(iter(self.parameters()), torch.zeros(0)).device
        out = [self.pooled(torch.from_numpy(np.asarray(images[i:i + batch], dtype=np.float32)).to(device))
               .double().cpu().numpy() for i in range(0, len(images), batch)]
        return np.concatenate(out)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"expected samples of shape (B, {', '.join(map(str, self.sample_shape))}), "
                             f"got {tuple(x.shape)}")
        x = x.float()
        outputs = self._encode(x) if self.encoder is not None else []
        return self._groups(x, outputs)

