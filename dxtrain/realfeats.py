"""The training split's real features for a run: computed once, then held in RAM or read from a file.

The encoder is frozen, so a real sample's features never change (docs/design.md section 8.13):
they are computed once, and the summaries, the exact field's positives and the correction's
samples are all rows of them.

* **Without an encoder** (vectors) the only group is the data itself, held in RAM.
* **With an encoder** (images) the features go to a feature file (:mod:`dxtrain.featcache`): one
  per (samples, encoder spec, encoder weights), at ``--features PATH`` or by default in
  ``$DXTRAIN_CACHE/features/`` under a name made from that fingerprint, so that every run on the
  same data and encoder reuses it.  Its build shows a progress bar, resumes after an
  interruption, and holds one chunk at a time.  Concurrent builds of one file (two runs started
  together) wait for each other on a lock instead of writing it twice.
* **RAM or disk.** When the features fit ``--feature-ram`` (default
  :data:`DEFAULT_FEATURE_RAM`) they are read into RAM once.  Otherwise they stay in the file:
  the summaries stream it chunk by chunk (:class:`dxfield.summaries.RowSource` reads HDF5
  datasets), and a step's positives are read as rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import numpy as np
import torch

from .featcache import FeatureFile, build_features, cache_home, fingerprint
from .features import FeatureGroups

DEFAULT_FEATURE_RAM = 4 << 30  # bytes of features read into RAM; more stay in the feature file
ENCODE_CHUNK = 512  # samples per encoder call while computing features

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: builds are not locked
    fcntl = None


class RealFeatures:
    """The training split's feature groups: NumPy arrays in RAM, or HDF5 datasets of a feature file.

    ``arrays`` is what the summaries read (either kind: dxfield streams both in chunks);
    :meth:`take` gives a step's rows as CPU tensors.  ``ram_left``: bytes of ``--feature-ram`` the
    features left free (0 when they stay in the file).
    """

    def __init__(self, arrays: dict, file: FeatureFile | None = None, ram: int = 0):
        self.arrays = arrays
        self.file = file
        self.ram_left = max(int(ram) - self.nbytes, 0) if file is None else 0

    @property
    def in_ram(self) -> bool:
        return self.file is None

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.arrays.values())

    def take(self, idx) -> dict[str, torch.Tensor]:
        """The features of rows ``idx`` (a NumPy or torch index array), per group."""
        idx = np.asarray(idx)
        rows = {n: a[idx] for n, a in self.arrays.items()} if self.in_ram else self.file.rows(idx)
        return {name: torch.from_numpy(np.ascontiguousarray(r)) for name, r in rows.items()}

    def describe(self) -> str:
        size = f"{self.nbytes / 2**20:.1f} MiB"
        return f"{size} in RAM" if self.in_ram else f"{size} read from {self.file.path} (more than --feature-ram)"

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def compute_features(groups: FeatureGroups, data: np.ndarray, device, chunk: int = 2048) -> dict[str, np.ndarray]:
    """Feature groups of ``data`` (N x sample shape), computed in chunks, as float32 NumPy arrays."""
    out: dict[str, list] = {}
    for i in range(0, data.shape[0], chunk):
        for name, f in _encode(groups, data[i:i + chunk], device).items():
            out.setdefault(name, []).append(f)
    return {k: np.concatenate(v) for k, v in out.items()}


def _encode(groups: FeatureGroups, samples: np.ndarray, device) -> dict[str, np.ndarray]:
    with torch.no_grad():
        feats = groups(torch.from_numpy(np.ascontiguousarray(samples)).to(device))
    return {name: f.float().cpu().numpy() for name, f in feats.items()}


def default_feature_path(fp: dict) -> str:
    """``$DXTRAIN_CACHE/features/<16 hex digits of the fingerprint's SHA-256>.h5`` (default cache:
    ``~/.cache/dxtrain``)."""
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_home(), "features", f"{key}.h5")


def run_features(groups: FeatureGroups, encoder_spec: str, samples: np.ndarray, device, *, path: str | None = None,
                 ram: int | None = None, progress: bool = False, log=None, main: bool = True,
                 wait=None) -> RealFeatures:
    """The real features of ``samples`` for a run (see the module's docstring).

    ``path``: the feature file (default :func:`default_feature_path`); ``ram``: bytes of features
    read into RAM (default :data:`DEFAULT_FEATURE_RAM`).  Under DDP only the ``main`` rank builds
    the file; ``wait()`` (a collective) holds the others until it is complete.
    """
    log = log or (lambda msg: None)
    ram = DEFAULT_FEATURE_RAM if ram is None else int(ram)
    if groups.encoder is None:
        return RealFeatures(compute_features(groups, samples, device), ram=ram)
    fp = fingerprint(samples, encoder_spec, groups.encoder, groups.dims)
    path = path or default_feature_path(fp)
    if main:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with _build_lock(path):
            if not os.path.exists(path):
                log(f"computing the features of {samples.shape[0]} samples ({len(groups.names)} groups) -> {path}")
            build_features(path, samples, lambda chunk: _encode(groups, chunk, device), fp, chunk=ENCODE_CHUNK,
                           progress=progress, log=log).close()
    if wait is not None:
        wait()
    ff = FeatureFile.open(path, fp)
    if RealFeatures(ff.groups, ff).nbytes <= ram:
        arrays = {name: ds[...] for name, ds in ff.groups.items()}
        ff.close()
        return RealFeatures(arrays, ram=ram)
    return RealFeatures(ff.groups, ff)


@contextlib.contextmanager
def _build_lock(path: str):
    """An exclusive OS lock on ``<path>.lock`` while the file is built (blocking; none without fcntl).

    The lock file is removed before it is released, so none is left next to the feature file. A process
    that was waiting on the removed file finds, once it holds it, that the path no longer names it, and
    locks the path afresh: two builders never hold the lock at once."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock = path + ".lock"
    while True:
        fh = open(lock, "a")
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()  # removed (or replaced) by the holder before us: lock the path again
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
