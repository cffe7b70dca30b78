"""FID, KID and the Inception Score through torch-fidelity, from a local InceptionV3 weights file.

The scores image-generation papers report are computed on InceptionV3's
pool-3 features (FID, KID) and logits (IS).  dxtrain never downloads: the
weights come from ``--inception-weights FILE``, torch-fidelity's own
``weights-inception-2015-12-05-6726825d.pth`` (the TensorFlow FID network
converted to PyTorch).  A file holding anything else is refused, naming it.
All three scores are torch-fidelity's own computations
(``fid_statistics_to_metric``, ``kid_features_to_metric``,
``isc_features_to_metric``); this module only feeds them.  torch-fidelity
needs torchvision, so it comes with the ``images`` extra.
"""

from __future__ import annotations

import os

import numpy as np
import torch

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file of the FID network


def unavailable(weights: str | None, kind: str, channels: int) -> str | None:
    """Why the Inception scores cannot run here (a note for the report), or None when they can."""
    if weights is None:
        return "FID skipped: no inception_weights given (weights are never downloaded)"
    if kind != "images" or channels not in (1, 3):
        return "FID skipped: needs images with 1 or 3 channels"
    if not os.path.isfile(weights):
        return f"FID skipped: inception_weights file {weights!r} not found"
    try:
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
    except Exception as exc:  # ImportError, or a broken torchvision underneath
        return f"FID skipped: torch-fidelity is not importable ({type(exc).__name__}: {exc})"
    return None


def inception_features(weights: str, device: str, batch_size: int = 64):
    """A function images -> (pool-3 features (N, 2048), unbiased logits (N, 1008)), float64; a ValueError
    naming ``weights`` when the file does not hold torch-fidelity's InceptionV3.  Images in ``[-1, 1]``
    become uint8 as in the PNG grids; grayscale is repeated to RGB; torch-fidelity resizes them to 299."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=weights).to(device)
    except Exception as exc:  # the state dict of another network, or not a torch file at all
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ValueError(f"inception_weights {weights!r} does not hold torch-fidelity's InceptionV3 weights "
                         f"({WEIGHTS_NAME}): {type(exc).__name__}: {first}") from None

    def features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
        if pixels.shape[1] == 1:
            pixels = np.repeat(pixels, 3, axis=1)
        pools, logits = [], []
        with torch.no_grad():
            for i in range(0, len(pixels), batch_size):
                pool, logit = extractor(torch.from_numpy(pixels[i:i + batch_size]).to(device))
                pools.append(pool.double().cpu().numpy())
                logits.append(logit.double().cpu().numpy())
        return np.concatenate(pools), np.concatenate(logits)

    return features


def _scores(f_a: np.ndarray, f_b: np.ndarray, logits_a: np.ndarray | None, seed: int) -> dict:
    """FID and KID of two pool-3 sets and, given the first one's logits, its IS: torch-fidelity's formulas."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    a, b = torch.from_numpy(f_a), torch.from_numpy(f_b)
    fid = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False)
    kid = kid_features_to_metric(a, b, kid_subsets=100, kid_subset_size=min(1000, len(f_a), len(f_b)),
                                 rng_seed=seed, verbose=False)
    out = {"FID": fid["frechet_inception_distance"], "KID": kid["kernel_inception_distance_mean"],
           "KID_std": kid["kernel_inception_distance_std"]}
    if logits_a is not None:
        isc = isc_features_to_metric(torch.from_numpy(logits_a), splits=min(10, len(logits_a)), rng_seed=seed)
        out.update(IS=isc["inception_score_mean"], IS_std=isc["inception_score_std"])
    return out


def inception_scores(fake: np.ndarray, real: np.ndarray, held_out: np.ndarray, *, weights: str, device: str = "cpu",
                     seed: int = 0) -> tuple[dict, dict, list[str]]:
    """``(scores, floors, notes)``: FID, KID and (RGB images) IS of ``fake`` against ``real``, and the same of
    ``held_out`` real images in ``fake``'s place (what a perfect generator scores at that sample size)."""
    features = inception_features(weights, device)
    f_real, _ = features(real)
    f_fake, logits_fake = features(fake)
    f_held, logits_held = features(held_out)
    rgb = fake.shape[1] == 3  # the Inception Score's classes are ImageNet's: RGB images only
    scores = {**_scores(f_fake, f_real, logits_fake if rgb else None, seed), "fid_n": len(fake)}
    floors = _scores(f_held, f_real, logits_held if rgb else None, seed)
    return scores, floors, [] if rgb else ["IS skipped: grayscale images (its classes are ImageNet's)"]
