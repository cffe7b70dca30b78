"""A one-step UNet generator for 32x32 and 64x64 images: noise image -> image in one pass.

The drifting papers train one-step generators of image size with a UNet (the
DriftXpress code uses one on CIFAR-10 and SVHN). :class:`UNetGenerator` is such
a network, written here in plain PyTorch:

* input: a standard normal *noise image* ``(B, C, H, W)`` (``noise_dim = C H W``;
  :func:`dxtrain.models.sample_noise` draws it flat and the network reshapes it);
* a stem convolution, then per resolution ``depth`` residual blocks and a
  stride-2 convolution down; a middle of two residual blocks around one
  self-attention layer at the lowest resolution; the mirror image up (nearest
  upsampling + convolution) with skip connections; ``tanh`` to ``[-1, 1]``;
* conditioning: a learned class embedding and, for classifier-free guidance,
  an embedding of the guidance scale ``alpha`` (Fourier features of
  ``log alpha``), summed into one vector that scales and shifts every residual
  block's normalised activations (FiLM).

At the default width 128 and channel multipliers (1, 2, 2, 2) the 32x32
network has 36.7 million parameters (10 classes), the size of the UNets these runs use;
``width`` and ``depth`` set it (``dxtrain train --gen-width/--gen-depth``).

Example
-------
>>> import torch
>>> g = UNetGenerator((3, 32, 32), width=16, depth=1, num_classes=10, guidance=True)
>>> x = g(torch.randn(2, g.noise_dim), torch.tensor([3, 7]), alpha=torch.tensor([1.0, 2.5]))
>>> tuple(x.shape)
(2, 3, 32, 32)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .genparts import AlphaEmbedding, check_noise, check_positive, conditioning, group_norm

UNET_SIZES = (32, 64)  # image sides the channel plans below are made for
UNET_MULTS = {32: (1, 2, 2, 2), 64: (1, 2, 2, 2, 2)}  # channels per resolution, as multiples of width


def _norm(channels: int) -> nn.GroupNorm:
    return group_norm(channels, 32)


class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the conditioning vector scaling and shifting the second
    normalisation (FiLM); a 1x1 convolution on the skip path when the channels change."""

    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        out = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        out = self.norm2(out) * (1 + scale) + shift
        return self.skip(h) + self.conv2(F.silu(out))


class _Attention(nn.Module):
    """Multi-head self-attention over the locations of a feature map, residual."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm = _norm(channels)
        self.attn = nn.MultiheadAttention(channels, heads if channels % heads == 0 else 1, batch_first=True)

    def forward(self, h: Tensor) -> Tensor:
        b, c, hh, ww = h.shape
        seq = self.norm(h).flatten(2).transpose(1, 2)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return h + out.transpose(1, 2).reshape(b, c, hh, ww)


class UNetGenerator(nn.Module):
    """One-step UNet: noise ``(B, C*H*W)`` -> images ``(B, C, H, W)`` in ``[-1, 1]``.

    Parameters
    ----------
    image_shape : (C, H, W)
        Square images of side 32 or 64.
    width : int
        Channels at full resolution (default 128); lower resolutions use
        ``width * mult`` with ``mult`` from :data:`UNET_MULTS`.
    depth : int
        Residual blocks per resolution on the way down (default 2; one more on
        the way up, as usual).
    num_classes : int
        0 for an unconditional generator; otherwise ``forward`` needs labels.
    guidance : bool
        Take the classifier-free guidance scale ``alpha`` as an input
        (``forward(..., alpha=)``; 1 when not given).
    """

    def __init__(self, image_shape: tuple[int, int, int], width: int = 128, depth: int = 2,
                 num_classes: int = 0, guidance: bool = False):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)!r}")
        channels, height, width_px = (int(s) for s in image_shape)
        if height != width_px or height not in UNET_SIZES or channels < 1:
            raise ValueError(f"the UNet generator is made for square images of side {' or '.join(map(str, UNET_SIZES))}"
                             f" pixels, got image shape {tuple(image_shape)!r}; use --generator conv for other sizes")
        width = check_positive("width", width, 1)
        depth = check_positive("depth", depth, 1)
        self.num_classes = check_positive("num_classes", num_classes, 0)
        self.image_shape = (channels, height, width_px)
        self.noise_dim = channels * height * width_px
        self.guidance = bool(guidance)
        self.width, self.depth = width, depth
        chans = [width * m for m in UNET_MULTS[height]]
        cond_dim = 4 * width
        self.class_embedding = nn.Embedding(self.num_classes, cond_dim) if self.num_classes else None
        self.alpha_embedding = AlphaEmbedding(cond_dim) if self.guidance else None
        self.cond_bias = nn.Parameter(torch.zeros(cond_dim))  # the conditioning of an unconditional, unguided net

        self.stem = nn.Conv2d(channels, chans[0], 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [chans[0]], chans[0]
        for level, cout in enumerate(chans):
            for _ in range(depth):
                self.down.append(_ResBlock(c, cout, cond_dim))
                c = cout
                skips.append(c)
            if level < len(chans) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1, self.mid_attn, self.mid2 = _ResBlock(c, c, cond_dim), _Attention(c), _ResBlock(c, c, cond_dim)
        self.up = nn.ModuleList()
        for level, cout in reversed(list(enumerate(chans))):
            for _ in range(depth + 1):
                self.up.append(_ResBlock(c + skips.pop(), cout, cond_dim))
                c = cout
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(c, c, 3, padding=1))
        self.out_norm, self.out_conv = _norm(c), nn.Conv2d(c, channels, 3, padding=1)

    def describe(self) -> str:
        """The size, for ``--help`` and the run log."""
        mults = ",".join(str(m) for m in UNET_MULTS[self.image_shape[1]])
        return f"width {self.width}, depth {self.depth}, channel multipliers ({mults})"

    def _conditioning(self, batch: int, labels: Tensor | None, alpha, like: Tensor) -> Tensor:
        cond = self.cond_bias.expand(batch, -1)
        embedded = conditioning(labels, alpha, self.class_embedding, self.alpha_embedding, batch, like.device)
        return cond if embedded is None else cond + embedded.to(cond.dtype)

    def forward(self, noise: Tensor, labels: Tensor | None = None, alpha: Tensor | float | None = None) -> Tensor:
        check_noise(noise, self.noise_dim)
        batch = noise.shape[0]
        cond = F.silu(self._conditioning(batch, labels, alpha, noise))
        h = self.stem(noise.reshape(batch, *self.image_shape))
        skips = [h]
        for layer in self.down:
            h = layer(h, cond) if isinstance(layer, _ResBlock) else layer(h)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, cond)), cond)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), cond) if isinstance(layer, _ResBlock) else layer(h)
        return torch.tanh(self.out_conv(F.silu(self.out_norm(h))))
