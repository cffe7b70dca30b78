"""The digits classifier: the feature space of ``FD_digits``, trained in seconds.

:class:`DigitsClassifier` is a small CNN for the embedded 8x8 digits;
:func:`train_digits_classifier` trains it on the CPU on a training split
(deterministically, leaving torch's random state and thread count as they
were) and caches the weights in a file, reused only for the same data and
settings. Its penultimate layer is where :func:`dxtrain.evaluate.evaluate_samples`
measures ``FD_digits`` (our embedded analogue of FID) and precision/recall.

Example
-------
>>> from dxtrain.data import load_dataset, train_test_split
>>> train, test = train_test_split(load_dataset("digits"))
>>> model, accuracy = train_digits_classifier(train, test)  # doctest: +SKIP
>>> features = model.features(test.x)  # float64 (N, 64)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import numpy as np
import torch
from torch import nn

from dxtrain.data import Dataset, train_test_split
from dxtrain.rundir import atomic_torch_save

__all__ = ["DigitsClassifier", "train_digits_classifier"]


class DigitsClassifier(nn.Module):
    """Small CNN for 1x8x8 images in ``[-1, 1]``; its penultimate layer is the FD feature space.

    conv 16 -> pool (4x4) -> conv 32 -> pool (2x2) -> linear 64 (features) -> linear classes.
    """

    ARCH = "digits-cnn-v2"  # change when the architecture changes: invalidates cached weights
    FEATURES = 64

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = int(num_classes)
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 2 * 2, self.FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(self.FEATURES, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def _batches(self, images, fn, batch_size=1024):
        x = _images_tensor(images)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), _one_thread():
                return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        finally:
            self.train(was_training)

    def features(self, images) -> np.ndarray:
        """Penultimate-layer features, float64 ``(N, 64)``, of images ``(N, 1, 8, 8)``."""
        return self._batches(images, self.body).double().numpy()

    def predict(self, images) -> np.ndarray:
        """Predicted class index (int64) per image."""
        return self._batches(images, lambda x: self(x).argmax(1)).numpy().astype(np.int64)

    def accuracy(self, images, labels) -> float:
        """Fraction of ``images`` whose predicted class equals ``labels``."""
        return float(np.mean(self.predict(images) == np.asarray(labels)))


@contextlib.contextmanager
def _one_thread():
    """Run torch on one CPU thread for the duration.

    The classifier's ops are tiny: intra-op threads only add synchronisation,
    and on a busy 2-core machine they made training ~30x slower than one
    thread (75 s vs 2 s). The previous setting is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _images_tensor(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.asarray(images, dtype=np.float32))
    images = images.detach().to("cpu", torch.float32)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"images shape {tuple(images.shape)}: the digits classifier expects (N, 1, 8, 8)")
    return images


def _fingerprint(train: Dataset, test: Dataset | None, seed: int, epochs: int) -> str:
    h = hashlib.sha256(f"{DigitsClassifier.ARCH}|seed={seed}|epochs={epochs}".encode())
    for ds in (train, test):
        if ds is not None:
            h.update(np.ascontiguousarray(ds.x).tobytes())
            h.update(np.ascontiguousarray(ds.labels).tobytes())
    return h.hexdigest()


def train_digits_classifier(train: Dataset, test: Dataset | None = None, *, seed: int = 0, epochs: int = 20,
                            cache: str | None = None) -> tuple[DigitsClassifier, float]:
    """Train :class:`DigitsClassifier` on ``train`` (CPU, a few seconds).

    Parameters
    ----------
    train : Dataset
        Labelled images ``(N, 1, 8, 8)``, e.g. the digits training split.
    test : Dataset, optional
        Where the returned accuracy is measured. Without it, a stratified
        20 % of ``train`` is held out for that and the rest trains.
    seed, epochs
        Training is deterministic given these (Adam, batch 64); torch's
        global random state is left as it was.
    cache : str, optional
        A file for the trained weights. When it holds weights trained on the
        same data with the same settings (a fingerprint is checked), they are
        loaded instead of retraining; otherwise the classifier is trained and
        saved there atomically.

    Returns
    -------
    (model, test_accuracy)
    """
    if train.labels is None or train.kind != "images" or train.shape != (1, 8, 8):
        raise ValueError(f"train: the digits classifier needs labelled (N, 1, 8, 8) images; got {train.kind} "
                         f"of shape {train.shape}{' without labels' if train.labels is None else ''}")
    if test is not None and (test.labels is None or test.shape != (1, 8, 8)):
        raise ValueError(f"test: expected labelled (N, 1, 8, 8) images; got shape {test.shape}")
    fingerprint = _fingerprint(train, test, seed, epochs)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = DigitsClassifier(train.num_classes)
    if cache is not None and os.path.exists(cache):
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved.get("fingerprint") == fingerprint:
                model.load_state_dict(saved["state_dict"])
                model.eval()
                return model, float(saved["test_accuracy"])
        except Exception:  # unreadable or foreign file: retrain and overwrite it
            pass

    fit, held_out = (train, test) if test is not None else train_test_split(train, 0.2, seed=seed)
    x = torch.from_numpy(np.ascontiguousarray(fit.x, dtype=np.float32))
    y = torch.from_numpy(fit.labels)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    model.train()
    with _one_thread():
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=generator).split(64):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            schedule.step()
    model.eval()
    accuracy = model.accuracy(held_out.x, held_out.labels)

    if cache is not None:
        atomic_torch_save({"fingerprint": fingerprint, "arch": DigitsClassifier.ARCH,
                            "num_classes": model.num_classes, "test_accuracy": accuracy,
                            "state_dict": model.state_dict()}, cache)
    return model, accuracy
