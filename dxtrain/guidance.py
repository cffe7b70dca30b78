"""Classifier-free guidance as drifting trains it: unconditional real negatives, weighted by the scale.

For a class ``c`` at guidance scale ``alpha_c`` the negatives of its ``N_neg``
generated samples are the other generated samples of ``c`` (``N_neg - 1`` for
each) plus ``N_unc,c`` unconditional real samples (drawn from the whole training
set, every class), each with weight

    w_c = (alpha_c - 1) (N_neg - 1) / N_unc,c,

so that together they carry ``alpha_c - 1`` times the generated negatives'
mass.  The field then attracts towards ``p(x|c)`` and repels from a mixture
that gives the unconditional data a share ``(alpha_c - 1) / alpha_c``: the
generator learns to move away from what every class shares.  ``alpha_c = 1``
gives weight 0, plain conditional drifting (docs/design.md section 10.2).

``alpha_c`` is drawn per class and step: 1 with probability
:data:`AT_ONE`, otherwise from the power law ``p(alpha) ~ alpha^-EXPONENT`` on
``[1, alpha_max]``.  The generator takes it as an input
(:class:`dxtrain.genparts.AlphaEmbedding`), so a single network covers the
range and ``dxtrain sample/eval --cfg-scale A`` picks one at inference.  The
unconditional negatives are dealt to the classes in turn (``N_unc / C`` each),
so every class's weight reaches its own queries only (dxfield's ``neg_labels``).
"""

from __future__ import annotations

import numpy as np
import torch

AT_ONE = 0.5  # share of the draws at alpha = 1 (no guidance)
EXPONENT = 3.0  # p(alpha) ~ alpha^-EXPONENT on [1, alpha_max] for the others


def draw_alpha(rng: np.random.Generator, num_classes: int, alpha_max: float) -> np.ndarray:
    """One guidance scale per class: 1 with probability :data:`AT_ONE`, else the power law on ``[1, alpha_max]``
    (inverse CDF of ``alpha^-EXPONENT``)."""
    u, at_one = rng.random(num_classes), rng.random(num_classes) < AT_ONE
    k = EXPONENT - 1.0
    alpha = (1.0 - u * (1.0 - alpha_max ** -k)) ** (-1.0 / k)
    return np.where(at_one, 1.0, alpha)


def negative_weights(alpha: np.ndarray, generated_per_class: np.ndarray, unc_labels: np.ndarray) -> np.ndarray:
    """The weight of each unconditional negative: ``(alpha_c - 1)(N_neg,c - 1) / N_unc,c`` for the class ``c``
    it was dealt to (``generated_per_class[c] = N_neg,c``)."""
    unc_per_class = np.bincount(unc_labels, minlength=len(alpha))
    w = (np.asarray(alpha, float) - 1.0) * (np.asarray(generated_per_class) - 1) / np.maximum(unc_per_class, 1)
    return w[unc_labels]


class Guide:
    """The guidance inputs of each step of a run: the scales, and the weighted unconditional negatives.

    ``draw(labels)`` returns ``(alpha per generated sample, negatives)`` where
    ``negatives`` is ``{"features": {group: (N_unc, D_g)}, "labels": (N_unc,), "weight": (N_unc,)}`` on the
    run's device, for :class:`dxtrain.fields.ExactField` and :class:`dxtrain.fields.ProjectedFieldSet`.
    """

    def __init__(self, real_feats, n_real: int, num_classes: int, alpha_max: float, n_negatives: int, device):
        self.real_feats, self.n_real, self.num_classes = real_feats, int(n_real), int(num_classes)
        self.alpha_max, self.n_negatives, self.device = float(alpha_max), int(n_negatives), device
        self.unc_labels = np.arange(self.n_negatives) % self.num_classes

    def draw(self, rng: np.random.Generator, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        alpha = draw_alpha(rng, self.num_classes, self.alpha_max)
        gen_per_class = np.bincount(labels.cpu().numpy(), minlength=self.num_classes)
        idx = np.sort(rng.choice(self.n_real, size=min(self.n_negatives, self.n_real), replace=False))
        unc_labels = self.unc_labels[:len(idx)]
        negatives = {"features": {k: f.to(self.device) for k, f in self.real_feats.take(torch.from_numpy(idx)).items()},
                     "labels": torch.from_numpy(unc_labels).to(self.device),
                     "weight": torch.from_numpy(negative_weights(alpha, gen_per_class, unc_labels)).float()
                     .to(self.device)}
        per_sample = torch.from_numpy(alpha).float().to(labels.device)[labels]
        return per_sample, negatives
