"""The real data's feature groups on disk: a chunked HDF5 file, built once per (data, encoder, weights).

The encoder is frozen, so the features of a real sample never change.
:func:`build_features` computes them, chunk by chunk, into an HDF5 file with one
``(N, D_g)`` float32 dataset per feature group, and :class:`FeatureFile` reads
them back: whole chunks for the summaries, random rows for a step's positives.

* **Identity.** The file records a fingerprint (:func:`fingerprint`): the
  samples' SHA-256 and shape, the encoder's spec and the SHA-256 of its weights,
  and each group's name and size.  A file with another fingerprint is refused,
  naming what differs.
* **Resumable.** The build writes ``<path>.partial`` and records how many rows
  are done after each chunk; an interrupted build continues there.  Only a
  complete file is renamed to ``<path>`` (atomic), so ``<path>`` is never
  half-written.
* **Memory.** Only one chunk of samples and its features are held at a time
  (``chunk`` rows): the peak does not grow with the data.

Format (version 1): a group ``features`` with one dataset per feature group
(chunked by rows, in the groups' order), and root attributes ``format``,
``fingerprint`` (JSON), ``rows_done`` and ``complete``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

FORMAT = 1
CHUNK_BYTES = 1 << 20  # about 1 MiB per HDF5 chunk of a feature dataset


def cache_home() -> str:
    """Where dxtrain keeps files between runs (feature files, the digits classifier): ``$DXTRAIN_CACHE``,
    or ``~/.cache/dxtrain``."""
    return os.environ.get("DXTRAIN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dxtrain"))


def array_sha256(a: np.ndarray, block: int = 1 << 24) -> str:
    """SHA-256 of an array's bytes (C order) with its dtype and shape, in blocks of ``block`` bytes."""
    h = hashlib.sha256(f"{a.dtype.str}{tuple(a.shape)}".encode())
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    for i in range(0, flat.size, block):
        h.update(flat[i:i + block].tobytes())
    return h.hexdigest()


def module_sha256(module: torch.nn.Module | None) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, values); "none" without one."""
    if module is None:
        return "none"
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(array_sha256(t.detach().cpu().contiguous().numpy()).encode())
    return h.hexdigest()


def fingerprint(samples: np.ndarray, encoder_spec: str, encoder: torch.nn.Module | None,
                dims: dict[str, int]) -> dict:
    """What a feature file is the features of: the samples, the encoder (spec and weights), the groups."""
    digest = samples.sha256() if hasattr(samples, "sha256") else array_sha256(samples)  # uint8 Pixels: their bytes
    return {"samples_sha256": digest, "samples_shape": list(samples.shape),
            "encoder": str(encoder_spec), "encoder_weights_sha256": module_sha256(encoder),
            "groups": {name: int(d) for name, d in dims.items()}}


def differences(there: dict, here: dict) -> list[str]:
    """The fingerprint fields that differ, as ``name: file value -> this run's value``."""
    return [f"{k}: {there.get(k)!r} -> {here.get(k)!r}" for k in sorted(set(there) | set(here))
            if there.get(k) != here.get(k)]


class FeatureFile:
    """A complete feature file, open for reading (:func:`build_features` or :meth:`open`)."""

    def __init__(self, path: str, fp: dict | None = None):
        import h5py

        self.path = path
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise ValueError(f"feature file {path!r} is not a readable HDF5 file ({exc})") from exc
        attrs = self.file.attrs
        if attrs.get("format") != FORMAT or not attrs.get("complete", False):
            self.file.close()
            raise ValueError(f"feature file {path!r} is not a complete dxtrain feature file (format {FORMAT})")
        self.fingerprint = json.loads(attrs["fingerprint"])
        if fp is not None and self.fingerprint != fp:
            self.file.close()
            raise ValueError(f"feature file {path!r} holds the features of other data, encoder or weights ("
                             + "; ".join(differences(self.fingerprint, fp)) + "): delete it, or give another path")
        self.groups = {name: self.file["features"][name] for name in self.fingerprint["groups"]}
        self.n = int(self.fingerprint["samples_shape"][0])

    @classmethod
    def open(cls, path: str, fp: dict | None = None) -> "FeatureFile":
        """The complete feature file at ``path``, checked against the fingerprint ``fp`` when given."""
        return cls(path, fp)

    def rows(self, idx) -> dict[str, np.ndarray]:
        """The features of rows ``idx`` (any order, repeats allowed), per group."""
        idx = np.asarray(idx, dtype=np.int64)
        uniq, back = np.unique(idx, return_inverse=True)  # h5py reads increasing indices
        return {name: ds[uniq][back] for name, ds in self.groups.items()}

    def chunks(self, name: str, rows: int) -> Iterator[np.ndarray]:
        """One group's features, ``rows`` at a time."""
        ds = self.groups[name]
        for i0 in range(0, self.n, rows):
            yield ds[i0:i0 + rows]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_features(path: str, samples: np.ndarray, encode: Callable[[np.ndarray], dict[str, np.ndarray]],
                   fp: dict, *, chunk: int = 1024, progress: bool = False, log=None) -> FeatureFile:
    """The feature file at ``path`` for ``samples``: opened if it exists (refused if its fingerprint ``fp``
    differs), else built with ``encode`` (a chunk of samples -> its features per group), resuming a
    ``<path>.partial`` with the same fingerprint."""
    import h5py
    from tqdm import tqdm

    log = log or (lambda msg: None)
    if os.path.exists(path):
        return FeatureFile(path, fp)
    partial = path + ".partial"
    n = int(samples.shape[0])
    done = _resumable(partial, fp, log)
    with h5py.File(partial, "a") as f:
        if done == 0:
            _create(f, fp, n)
        with tqdm(total=n, initial=done, desc="features", unit="sample", disable=not progress) as bar:
            for i0 in range(done, n, chunk):
                feats = encode(samples[i0:i0 + chunk])
                rows = slice(i0, min(n, i0 + chunk))
                for name in fp["groups"]:
                    f["features"][name][rows] = feats[name]
                f.attrs["rows_done"] = rows.stop
                f.flush()
                bar.update(rows.stop - rows.start)
        f.attrs["complete"] = True
    os.replace(partial, path)
    return FeatureFile(path, fp)


def _resumable(partial: str, fp: dict, log) -> int:
    """Rows already done in ``partial`` (0, after removing it, when it is not this build's)."""
    import h5py

    if not os.path.exists(partial):
        return 0
    try:
        with h5py.File(partial, "r") as f:
            same = json.loads(f.attrs["fingerprint"]) == fp and f.attrs.get("format") == FORMAT
            done = int(f.attrs["rows_done"]) if same else 0
    except (OSError, KeyError, ValueError):
        same, done = False, 0
    if same:
        log(f"resuming the feature file build at row {done} ({partial})")
        return done
    log(f"starting the feature file over: {partial} is unreadable or from other data, encoder or weights")
    os.remove(partial)
    return 0


def _create(f, fp: dict, n: int) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["fingerprint"] = json.dumps(fp, sort_keys=True)
    f.attrs["rows_done"] = 0
    f.attrs["complete"] = False
    g = f.create_group("features")
    for name, d in fp["groups"].items():
        rows = max(1, min(n, CHUNK_BYTES // (4 * d)))
        g.create_dataset(name, shape=(n, d), dtype="float32", chunks=(rows, d))
