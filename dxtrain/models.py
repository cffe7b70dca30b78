"""One-step generators ``x = f(eps)`` for drifting training, their noise and samples, and their EMA.

A drifting generator maps Gaussian noise straight to a sample in one forward
pass; there is no sampling chain. Two plain :class:`torch.nn.Module` shapes
cover the data sets dxtrain trains on:

* :class:`MLPGenerator` -- vectors (and small images when asked), a SiLU MLP
  with LayerNorm;
* :class:`ConvGenerator` -- images ``(C, H, W)``: noise -> a small spatial map
  -> nearest upsampling + 3x3 convolutions -> ``tanh`` in ``[-1, 1]``.

Both take optional class labels (a learned class embedding is added to the
first hidden layer) and expose ``noise_dim`` so that :func:`sample_noise` can
draw their input. :func:`make_generator` picks one from a sample shape,
:func:`generate` draws samples as a NumPy array, and :class:`EMA` keeps the
exponential moving average of the weights that the papers sample from.

Example
-------
>>> import torch
>>> g = make_generator("auto", (1, 8, 8), num_classes=10)
>>> eps = sample_noise(g, 4, torch.Generator().manual_seed(0))
>>> g(eps, torch.tensor([0, 1, 2, 3])).shape
torch.Size([4, 1, 8, 8])
"""

from __future__ import annotations

import copy
import math
import numbers

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .genparts import AlphaEmbedding, check_noise, check_positive, conditioning, group_norm
from .unet import UNetGenerator

GENERATOR_KINDS = ("mlp", "conv", "unet", "auto")


class MLPGenerator(nn.Module):
    """SiLU MLP with LayerNorm: noise ``(B, noise_dim)`` -> samples ``(B, out_dim)``.

    Parameters
    ----------
    out_dim : int
        Dimension of a (flattened) sample.
    noise_dim : int
        Dimension of the Gaussian input.
    hidden : int
        Width of every hidden layer.
    depth : int
        Number of hidden layers (>= 1).
    num_classes : int
        0 for an unconditional generator; otherwise a learned embedding of the
        label is added to the first hidden layer, and ``forward`` needs labels.
    out_shape : tuple of int, optional
        Reshape the output to ``(B, *out_shape)`` (its product must be
        ``out_dim``), e.g. to generate small images with an MLP.

    The output layer is linear (no squashing): vector data are not assumed to
    lie in a bounded range.
    """

    def __init__(self, out_dim: int, noise_dim: int = 32, hidden: int = 256, depth: int = 3,
                 num_classes: int = 0, *, out_shape: tuple[int, ...] | None = None, guidance: bool = False):
        super().__init__()
        check_positive("out_dim", out_dim)
        check_positive("noise_dim", noise_dim)
        check_positive("hidden", hidden)
        check_positive("depth", depth)
        check_positive("num_classes", num_classes, minimum=0)
        if out_shape is not None and math.prod(out_shape) != out_dim:
            raise ValueError(f"out_shape {tuple(out_shape)} has {math.prod(out_shape)} entries, "
                             f"but out_dim is {out_dim}")
        self.out_dim = out_dim
        self.noise_dim = noise_dim
        self.num_classes = num_classes
        self.out_shape = tuple(out_shape) if out_shape is not None else (out_dim,)

        self.input = nn.Linear(noise_dim, hidden)
        self.class_embedding = nn.Embedding(num_classes, hidden) if num_classes > 0 else None
        self.alpha_embedding = AlphaEmbedding(hidden) if guidance else None
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth - 1)
        )
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def describe(self) -> str:
        """The size, for the run log."""
        return f"hidden {self.input.out_features}, depth {len(self.hidden) + 1}"

    def forward(self, noise: Tensor, labels: Tensor | None = None, alpha=None) -> Tensor:
        check_noise(noise, self.noise_dim)
        h = self.input(noise)
        cond = conditioning(labels, alpha, self.class_embedding, self.alpha_embedding, noise.shape[0], noise.device)
        if cond is not None:
            h = h + cond
        for layer in self.hidden:
            h = layer(h)
        return self.output(h).reshape(noise.shape[0], *self.out_shape)


class _ConvBlock(nn.Module):
    """(optional 2x nearest upsampling) -> conv3x3 -> GroupNorm -> SiLU."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = group_norm(out_channels, 8)

    def forward(self, h: Tensor) -> Tensor:
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        return F.silu(self.norm(self.conv(h)))


class ConvGenerator(nn.Module):
    """Convolutional generator: noise ``(B, noise_dim)`` -> images ``(B, C, H, W)`` in ``[-1, 1]``.

    The noise is mapped linearly to a ``2 * width``-channel map of side about
    ``H / 4`` (``H / 2`` or ``H`` for images smaller than 8 or 4 pixels), then
    doubled in resolution by nearest upsampling + 3x3 convolution blocks. The
    map is built at ``ceil(H / 2**k)`` so that it never comes out smaller than
    the image; the final map is centre-cropped to exactly ``(H, W)``, which
    makes odd and non-square sizes (28x28, 12x20, ...) work.

    Parameters
    ----------
    image_shape : (C, H, W)
    noise_dim : int
        Dimension of the Gaussian input.
    width : int
        Channels at full resolution; lower resolutions use ``2 * width``.
    num_classes : int
        0 for an unconditional generator; otherwise a learned class embedding
        is added, per channel, to the first (lowest resolution) feature map.
    """

    def __init__(self, image_shape: tuple[int, int, int], noise_dim: int = 64, width: int = 64,
                 num_classes: int = 0, guidance: bool = False):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)!r}")
        for name, value in zip(("C", "H", "W"), image_shape):
            check_positive(f"image_shape {name}", int(value))
        check_positive("noise_dim", noise_dim)
        check_positive("width", width)
        check_positive("num_classes", num_classes, minimum=0)
        channels, height, width_px = (int(s) for s in image_shape)
        self.image_shape = (channels, height, width_px)
        self.noise_dim = noise_dim
        self.num_classes = num_classes

        # Two doublings for ordinary images; fewer for tiny ones so that the
        # first map keeps at least 2x2 locations where the image has them.
        smallest = min(height, width_px)
        self.num_upsamples = 2 if smallest >= 8 else 1 if smallest >= 4 else 0
        scale = 2 ** self.num_upsamples
        self.base_size = (math.ceil(height / scale), math.ceil(width_px / scale))

        low = 2 * width
        self.base_channels = low
        self.project = nn.Linear(noise_dim, low * self.base_size[0] * self.base_size[1])
        self.base_norm = group_norm(low, 8)
        self.class_embedding = nn.Embedding(num_classes, low) if num_classes > 0 else None
        self.alpha_embedding = AlphaEmbedding(low) if guidance else None
        blocks = [_ConvBlock(low, low if self.num_upsamples > 0 else width, upsample=False)]
        for step in range(1, self.num_upsamples + 1):
            last = step == self.num_upsamples
            blocks.append(_ConvBlock(low, width if last else low, upsample=True))
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(width, channels, 3, padding=1)

    def describe(self) -> str:
        """The size, for the run log."""
        return f"width {self.to_image.in_channels}"

    def forward(self, noise: Tensor, labels: Tensor | None = None, alpha=None) -> Tensor:
        check_noise(noise, self.noise_dim)
        batch = noise.shape[0]
        h = self.project(noise).reshape(batch, self.base_channels, *self.base_size)
        cond = conditioning(labels, alpha, self.class_embedding, self.alpha_embedding, batch, noise.device)
        if cond is not None:
            h = h + cond[:, :, None, None]
        h = self.blocks(F.silu(self.base_norm(h)))
        _, height, width = self.image_shape
        top = (h.shape[2] - height) // 2
        left = (h.shape[3] - width) // 2
        h = h[:, :, top:top + height, left:left + width]
        return torch.tanh(self.to_image(h))


def make_generator(kind: str, sample_shape: tuple[int, ...], *, noise_dim: int | None = None,
                   num_classes: int = 0, width: int | None = None, depth: int | None = None,
                   guidance: bool = False) -> nn.Module:
    """A generator whose ``forward(noise, labels=None)`` returns ``(B, *sample_shape)``.

    Parameters
    ----------
    kind : {"mlp", "conv", "unet", "auto"}
        "auto" is "conv" for images ``(C, H, W)`` and "mlp" for vectors ``(D,)``.
        "mlp" also accepts images (flattened internally, linear output).
        "unet": :class:`dxtrain.unet.UNetGenerator`, square 32x32 or 64x64 images.
    sample_shape : tuple of int
        ``(D,)`` or ``(C, H, W)``.
    noise_dim : int, optional
        Defaults to 32 for "mlp" and 64 for "conv" ("unet": the image's size, not settable).
    num_classes : int
        0 for unconditional; otherwise ``forward`` needs labels in ``[0, num_classes)``.
    width : int, optional
        Hidden width of the MLP (default 256), full-resolution channels of
        the conv generator (default 64) or of the UNet (default 128).
    depth : int, optional
        Hidden layers of the MLP (default 3) or residual blocks per resolution
        of the UNet (default 2); the conv generator has none to set.
    guidance : bool
        The generator takes the guidance scale as an input: ``forward(noise, labels, alpha=)``.

    The module exposes ``noise_dim`` for :func:`sample_noise`.
    """
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"kind must be one of {GENERATOR_KINDS}, got {kind!r}")
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"sample_shape must be (D,) for vectors or (C, H, W) for images, with positive "
                         f"sizes; got {tuple(sample_shape)!r}")
    if kind == "auto":
        kind = "conv" if len(shape) == 3 else "mlp"
    options = {"num_classes": num_classes, "guidance": guidance}
    sizes = {k: v for k, v in (("width", width), ("depth", depth)) if v is not None}
    if kind == "unet":
        if len(shape) != 3 or noise_dim is not None:
            raise ValueError(f"kind='unet' needs an image sample_shape (C, H, W) and takes a noise image of that "
                             f"shape (no noise_dim); got sample_shape {shape!r}, noise_dim {noise_dim!r}")
        return UNetGenerator(shape, **options, **sizes)
    if noise_dim is not None:
        options["noise_dim"] = noise_dim
    if kind == "conv":
        if len(shape) != 3:
            raise ValueError(f"kind='conv' needs an image sample_shape (C, H, W), got {shape!r}; "
                             "use kind='mlp' or 'auto' for vectors")
        if depth is not None:
            raise ValueError(f"depth={depth!r}: the conv generator has no depth to set (its upsampling stages "
                             "follow the image size); set width, or use kind='mlp' or 'unet'")
        return ConvGenerator(shape, **options, **sizes)
    if width is not None:
        options["hidden"] = width
    if depth is not None:
        options["depth"] = depth
    return MLPGenerator(math.prod(shape), out_shape=shape, **options)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def sample_noise(generator: nn.Module, n: int, generator_rng: torch.Generator | None = None,
                 device=None) -> Tensor:
    """Standard normal input ``(n, generator.noise_dim)`` for ``generator``.

    ``device`` defaults to the device of the generator's parameters.
    ``generator_rng`` (a seeded :class:`torch.Generator`) makes the draw
    reproducible; when it lives on another device than the result, the noise is
    drawn on the RNG's device and moved, so the same seed gives the same noise
    wherever the model runs.
    """
    noise_dim = getattr(generator, "noise_dim", None)
    if not isinstance(noise_dim, numbers.Integral):
        raise ValueError(f"generator {type(generator).__name__} has no int attribute noise_dim; "
                         "build it with make_generator or set noise_dim")
    check_positive("n", n, minimum=0)
    device = torch.device(device) if device is not None else _module_device(generator)
    if generator_rng is None:
        return torch.randn(int(n), noise_dim, device=device)
    noise = torch.randn(int(n), noise_dim, generator=generator_rng, device=generator_rng.device)
    return noise.to(device)


def generate(model, n: int, num_classes: int, device, seed: int = 0, label: int | None = None,
             alpha: float | None = None) -> np.ndarray:
    """``n`` samples from ``model`` (classes cycled, or all ``label``), as a NumPy array; ``alpha``: the
    guidance scale of a generator trained with guidance (None: its default, 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, n, 1024):
            b = min(1024, n - i)
            labels = None
            if num_classes:
                labels = (torch.full((b,), label) if label is not None else torch.arange(i, i + b) % num_classes)
                labels = labels.to(device)
            scale = None if alpha is None else float(alpha)
            out.append(model(sample_noise(model, b, g, device=device), labels, alpha=scale).float().cpu().numpy())
    return np.concatenate(out)


class EMA:
    """Exponential moving average of a model's parameters.

    ``ema.model`` is a deep copy of the model (eval mode, ``requires_grad``
    False) holding the averages; sample from it. After ``update(model)`` every
    floating-point parameter is ``decay * average + (1 - decay) * current``;
    buffers (e.g. normalisation statistics) are copied as they are, since an
    average of them has no meaning.

    Parameters
    ----------
    model : nn.Module
        The model being trained; the average starts equal to it.
    decay : float in [0, 1]
        Weight of the old average (0 copies the model at each update).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        self.model = copy.deepcopy(model)
        self.model.eval()
        self.model.requires_grad_(False)
        for parameter in self.model.parameters():
            parameter.grad = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into the average."""
        current = dict(model.named_parameters())
        averaged = dict(self.model.named_parameters())
        if current.keys() != averaged.keys():
            raise ValueError("model does not have the parameters the EMA was built from "
                             f"(differing names: {sorted(current.keys() ^ averaged.keys())[:5]})")
        for name, average in averaged.items():
            new = current[name].detach()
            if average.is_floating_point():
                average.mul_(self.decay).add_(new.to(average.dtype), alpha=1.0 - self.decay)
            else:
                average.copy_(new)
        current_buffers = dict(model.named_buffers())
        for name, buffer in self.model.named_buffers():
            buffer.copy_(current_buffers[name])
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the averaged ones."""
        model.load_state_dict(self.model.state_dict())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state.get("num_updates", 0))
        self.model.load_state_dict(state["model"])
