"""What the generators of :mod:`dxtrain.models` and :mod:`dxtrain.unet` share: argument checks and their
conditioning inputs (class labels, the classifier-free guidance scale ``alpha``)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

ALPHA_FREQUENCIES = 16  # Fourier features of log(alpha) (alpha_features)


def check_positive(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an int >= ``minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_noise(noise: Tensor, noise_dim: int) -> None:
    if noise.ndim != 2 or noise.shape[1] != noise_dim:
        raise ValueError(f"noise must have shape (B, {noise_dim}), got {tuple(noise.shape)}")


def embed_labels(labels: Tensor | None, embedding: nn.Embedding | None, batch: int) -> Tensor | None:
    """The class embedding for ``labels`` (or None for an unconditional generator).

    A conditional generator needs labels and an unconditional one refuses them:
    silently ignoring either mismatch would train the wrong model.
    """
    if embedding is None:
        if labels is not None:
            raise ValueError("labels were given to an unconditional generator (num_classes=0); "
                             "build it with num_classes > 0 or pass labels=None")
        return None
    if labels is None:
        raise ValueError(f"this generator is class-conditional (num_classes={embedding.num_embeddings}); "
                         "pass labels, a LongTensor of shape (B,)")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) to match the noise batch, got {tuple(labels.shape)}")
    return embedding(labels.long())


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with the most groups, up to ``max_groups`` (a power of two), that divide ``channels``."""
    groups = max_groups
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def alpha_features(alpha, batch: int, device) -> Tensor:
    """Fourier features ``(batch, 2 * ALPHA_FREQUENCIES)`` of ``log alpha``, the guidance scale (a number or
    ``(batch,)``, each >= 1; None: 1, no guidance)."""
    alpha = torch.ones(batch, device=device) if alpha is None else torch.as_tensor(alpha, device=device).float()
    if alpha.ndim == 0:
        alpha = alpha.expand(batch)
    if alpha.shape != (batch,):
        raise ValueError(f"alpha must be a number or have shape ({batch},), got {tuple(alpha.shape)}")
    if not bool(torch.all(alpha >= 1)):
        raise ValueError(f"alpha (the guidance scale) must be >= 1, got min {float(alpha.min()):g}")
    freqs = torch.arange(ALPHA_FREQUENCIES, device=device, dtype=torch.float32)
    angle = torch.log(alpha)[:, None] * math.pi * (freqs[None, :] + 1) / 2
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class AlphaEmbedding(nn.Module):
    """The guidance scale ``alpha`` as a learned ``dim``-vector: Fourier features of ``log alpha``, then a
    two-layer MLP (every generator built with ``guidance=True`` adds it where it adds the class embedding)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * ALPHA_FREQUENCIES, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, alpha, batch: int, device) -> Tensor:
        return self.mlp(alpha_features(alpha, batch, device))


def embed_alpha(alpha, embedding: AlphaEmbedding | None, batch: int, device) -> Tensor | None:
    """The embedding of ``alpha`` (None: 1), or None for a generator built without guidance, which refuses
    an ``alpha``."""
    if embedding is None:
        if alpha is not None:
            raise ValueError("alpha (the guidance scale) was given to a generator built without guidance; "
                             "build it with guidance=True (dxtrain train --guidance)")
        return None
    return embedding(alpha, batch, device)


def conditioning(labels, alpha, class_embedding: nn.Embedding | None, alpha_embedding: AlphaEmbedding | None,
                 batch: int, device) -> Tensor | None:
    """The sum of the class and guidance-scale embeddings a generator adds to its first hidden layer (each
    checked against how the generator was built), or None when it has neither."""
    parts = [e for e in (embed_labels(labels, class_embedding, batch),
                         embed_alpha(alpha, alpha_embedding, batch, device)) if e is not None]
    return None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]
