"""HDF5 cache files for :class:`dxfield.ProjectedField`: save and verified load.

A cache (format version 1) is one HDF5 file: a root attribute ``meta`` (a
JSON object with the settings, the centre, the fingerprint and each shard's
label, count and spectra), a root attribute ``checksum`` (SHA-256 of ``meta``
and of every array), and per shard ``shards/<i>/landmarks`` and per
temperature ``t_<k>``, ``G_<k>``, ``factor_<k>`` (float64); docs/design.md
section 6 gives the layout, the checksum and the versioning rule.  Writes are
atomic (:mod:`dxfield.atomic`).  ``load`` refuses truncated files, files whose
checksum does not match their contents, other format versions, and caches
built for another kernel, temperature set, dimension or feature scale than
the caller expects, saying what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np

from .atomic import atomic_path
from .summaries import Shard

FORMAT = "dxfield.ProjectedField"
VERSION = 1


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        raise RuntimeError("saving/loading summary caches needs h5py: pip install h5py") from None
    return h5py


def _digest(meta: dict, arrays: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, a in arrays:
        h.update(name.encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _contents(pf) -> tuple[dict, list[tuple[str, np.ndarray]], list[dict]]:
    meta = {
        "format": FORMAT, "version": VERSION, "kernel": pf.kernel,
        "temperatures": list(pf.temperatures), "ridge": pf.ridge, "eig_clamp": pf.eig_clamp,
        "feature_scale": pf.feature_scale, "dim": pf.dim, "dtype": str(pf.dtype),
        "den_floor": pf.den_floor, "centre": [float(c) for c in pf.centre],
        "fingerprint": pf.fingerprint, "n_shards": len(pf.shards),
    }
    arrays, shard_meta = [], []
    for i, s in enumerate(pf.shards):
        shard_meta.append({"label": s.label, "n": int(s.n), "spectra": s.spectra})
        arrays.append((f"shards/{i}/landmarks", np.asarray(s.landmarks, np.float64)))
        for k in range(len(pf.temperatures)):
            arrays.append((f"shards/{i}/t_{k}", np.asarray(s.t[k], np.float64)))
            arrays.append((f"shards/{i}/G_{k}", np.asarray(s.G[k], np.float64)))
            arrays.append((f"shards/{i}/factor_{k}", np.asarray(s.factors[k], np.float64)))
    meta["shards"] = shard_meta
    return meta, arrays, shard_meta


def save(pf, path) -> None:
    h5py = _h5py()
    path = os.fspath(path)
    meta, arrays, _ = _contents(pf)
    checksum = _digest(meta, arrays)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["meta"] = json.dumps(meta, sort_keys=True)
            f.attrs["checksum"] = checksum
            for name, a in arrays:
                f.create_dataset(name, data=a)


def load(cls, path, *, kernel=None, temperatures=None, dim=None, feature_scale=None, memory_budget=None):

    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no summary cache at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path} is not a readable summary cache (truncated, corrupted or not HDF5): {exc}") from None
    with f:
        try:
            meta = json.loads(f.attrs["meta"])
            stored = str(f.attrs["checksum"])
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise ValueError(f"{path} is not a dxfield summary cache, or its metadata is corrupted ({exc})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a dxfield summary cache (format {meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path} has cache format version {meta.get('version')}; this dxfield reads version "
                             f"{VERSION}: rebuild it (dxtrain summarize / ProjectedField.build)")
        _expect(path, meta, kernel=kernel, temperatures=temperatures, dim=dim, feature_scale=feature_scale)
        arrays = []
        try:
            for i in range(meta["n_shards"]):
                names = [f"shards/{i}/landmarks"] + [f"shards/{i}/{w}_{k}" for k in range(len(meta["temperatures"]))
                                                     for w in ("t", "G", "factor")]
                for name in names:
                    arrays.append((name, np.asarray(f[name][()])))
        except (KeyError, OSError, ValueError) as exc:
            raise ValueError(f"{path} is truncated or corrupted: cannot read its arrays ({exc})") from None
    if _digest({k: v for k, v in meta.items()}, arrays) != stored:
        raise ValueError(f"{path} is corrupted: its checksum does not match its contents; rebuild the cache")
    data = dict(arrays)
    shards = []
    nt = len(meta["temperatures"])
    for i, sm in enumerate(meta["shards"]):
        shards.append(Shard(
            label=sm["label"], landmarks=data[f"shards/{i}/landmarks"],
            factors=[data[f"shards/{i}/factor_{k}"] for k in range(nt)],
            t=[data[f"shards/{i}/t_{k}"] for k in range(nt)],
            G=[data[f"shards/{i}/G_{k}"] for k in range(nt)],
            n=int(sm["n"]), spectra=sm["spectra"]))
    return cls(kernel=meta["kernel"], temperatures=meta["temperatures"], ridge=meta["ridge"],
               eig_clamp=meta["eig_clamp"], feature_scale=meta["feature_scale"], dim=meta["dim"],
               centre=np.asarray(meta["centre"]), shards=shards, fingerprint=meta["fingerprint"],
               dtype=np.dtype(meta["dtype"]), den_floor=meta["den_floor"], memory_budget=memory_budget)


def _expect(path, meta, *, kernel, temperatures, dim, feature_scale) -> None:
    """Refuse a cache built for other settings than the caller's, naming each difference."""
    diffs = []
    if kernel is not None and kernel != meta["kernel"]:
        diffs.append(f"kernel {meta['kernel']!r} (expected {kernel!r})")
    if temperatures is not None:
        want = [float(t) for t in (temperatures if np.ndim(temperatures) else [temperatures])]
        if len(want) != len(meta["temperatures"]) or not np.allclose(want, meta["temperatures"], rtol=1e-12, atol=0):
            diffs.append(f"temperatures {tuple(meta['temperatures'])} (expected {tuple(want)})")
    if dim is not None and int(dim) != meta["dim"]:
        diffs.append(f"dimension D={meta['dim']} (expected D={int(dim)})")
    if feature_scale is not None and feature_scale != "auto":
        have = meta["feature_scale"]
        if have is None or not math.isclose(float(feature_scale), have, rel_tol=1e-9):
            diffs.append(f"feature scale {have} (expected {float(feature_scale)})")
    if diffs:
        raise ValueError(f"{path} was built for {', '.join(diffs)}; rebuild it for these settings")
