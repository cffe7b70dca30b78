"""Summaries of the whole data set on Nystrom landmarks: what the projected field is built from.

A :class:`Shard` is one landmark set (a class, or all the data) with its
per-temperature factors ``A = (K_UU + ridge I)^{-1/2}`` and summaries ``t =
sum_j phi(y_j)``, ``G = sum_j phi(y_j) y_j^T`` and ``n``.  :class:`Summaries`
holds the shards with the kernel settings, streams more data into them
(:meth:`Summaries.add_summaries`), merges and flattens them (summaries are sums
over the data, so disjoint shards add, and processes all-reduce one vector),
and keeps their working-dtype copies per device.  :class:`RowSource` reads the
data in chunks from arrays, memory maps or HDF5 datasets.  Math:
docs/design.md section 2.4; file format: section 6 (:mod:`dxfield.cache`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field as dc_field
from typing import Any

import numpy as np

from . import checks
from .backend import Device, Placement, device_context, place, to_host
from .kernels import kernel_tiles, log_kernel_from_sqdist, sq_norms, sqdist
from .memory import SLACK, parse_budget
from .nystrom import inverse_sqrt, warn_if_ill_conditioned
from .progress import progress_bar

DEFAULT_DEN_FLOOR = 1e-8

@dataclass
class Shard:
    """One landmark set (a class, or all data) with its per-temperature factors and summaries.

    Host float64 copies are the source of truth (they are what is saved and
    merged); device copies in the working dtype are made on first use.
    """

    label: int | None
    landmarks: np.ndarray  # (m, D) float64
    factors: list  # per temperature (m, m) float64: A
    t: list  # per temperature (m,) float64
    G: list  # per temperature (m, D) float64, centred on the field's centre
    n: int
    spectra: list = dc_field(default_factory=list)  # per temperature dict

    @property
    def m(self) -> int:
        return int(self.landmarks.shape[0])

    def folded(self, k: int) -> np.ndarray:
        """``A [G | t | |t|]`` (m x (D+2)), float64.

        The last column, ``|A t|``, gives the size of the terms that make up the
        denominator ``k(x, U) A t``, for the cancellation test of the fallback.
        """
        a = self.factors[k]
        at = a @ self.t[k]
        return np.concatenate([a @ self.G[k], at[:, None], np.abs(at)[:, None]], axis=1)


class Summaries:
    """The shards of a data set with the kernel settings they were built for.

    Host float64 arrays are the source of truth (saved, merged, all-reduced);
    :meth:`on_device` makes working-dtype copies per device on first use, and
    any change of the summaries drops them.
    """

    def __init__(self, *, kernel: str, temperatures, ridge: float, eig_clamp: float, feature_scale,
                 dim: int, centre: np.ndarray, shards: list[Shard], fingerprint: dict | None = None,
                 dtype=np.float32, den_floor: float = DEFAULT_DEN_FLOOR, placement: Placement | None = None,
                 memory_budget=None):
        self.kernel = kernel
        self.temperatures = tuple(float(t) for t in temperatures)
        self.ridge = float(ridge)
        self.eig_clamp = float(eig_clamp)
        self.feature_scale = None if feature_scale is None else float(feature_scale)
        self.dim = int(dim)
        self.centre = np.asarray(centre, dtype=np.float64)
        self.shards = list(shards)
        self.fingerprint = dict(fingerprint or {})
        self.dtype = np.dtype(dtype)
        self.den_floor = float(den_floor)
        self.memory_budget = parse_budget(memory_budget)
        self.last_stats: dict[str, Any] = {}
        self._device_cache: dict[Device, dict] = {}

    # -- properties ----------------------------------------------------------------
    @property
    def classes(self) -> list:
        """Class labels of the shards ([None] for an unconditional cache)."""
        return [s.label for s in self.shards]

    @property
    def n_landmarks(self) -> int:
        return sum(s.m for s in self.shards)

    @property
    def n_samples(self) -> int:
        return sum(s.n for s in self.shards)

    @property
    def taus(self) -> tuple[float, ...]:
        """Kernel length scales in raw feature units (``tau * S * sqrt(D)``, or ``tau``)."""
        unit = 1.0 if self.feature_scale is None else self.feature_scale * math.sqrt(self.dim)
        return tuple(t * unit for t in self.temperatures)

    def __repr__(self) -> str:
        cls = "unconditional" if self.classes == [None] else f"{len(self.shards)} classes"
        return (f"{type(self).__name__}({self.kernel}, temperatures={self.temperatures}, D={self.dim}, "
                f"{self.n_landmarks} landmarks, {self.n_samples} samples, {cls}, S={self.feature_scale})")

    # -- adding data ----------------------------------------------------------------
    def add_summaries(self, pos, labels=None, *, chunk_size: int | None = None, progress: bool = False,
                      backend=None) -> "Summaries":
        """Add the summaries (``t``, ``G``, ``n``) of more positives ``pos`` on this cache's landmarks.

        ``labels`` (one per row) is required for a class-conditional cache and
        refused for an unconditional one; every label must be a class of this
        cache.  Adding disjoint subsets of the rows one after another (or in
        different processes and summing the host arrays) gives the summaries of
        their union, up to float64 rounding.  Returns ``self``.
        """
        rows = RowSource(pos, "pos", backend)
        if rows.d != self.dim:
            raise ValueError(f"pos has {rows.d} features per row but this cache was built for D={self.dim}")
        lab = None
        conditional = self.classes != [None]
        if labels is not None:
            if not conditional:
                raise ValueError("labels were given but this cache is unconditional (built without labels)")
            lab = host_labels(labels, rows.n, "one per row of pos")
            unknown = sorted(set(np.unique(lab).tolist()) - {s.label for s in self.shards})
            if unknown:
                raise ValueError(f"labels contains classes {unknown[:5]} that this cache has no shards for")
        elif conditional:
            raise ValueError("this cache is class-conditional: pass the labels of pos")
        with device_context(rows.placement):
            self.accumulate(rows, lab, chunk_size=chunk_size, progress=progress)
        return self

    def accumulate(self, rows: "RowSource", lab, *, chunk_size, progress: bool) -> None:
        """One streaming pass: kernel sums ``sum_j k(U, y_j)`` and ``sum_j k(U, y_j) y_j^T``, then t, G."""
        xp = rows.placement.xp
        dev = self.on_device(rows.placement)
        d = self.dim
        it = self.dtype.itemsize
        m_max = max(s.m for s in self.shards)
        if chunk_size is None:
            # per entry of a chunk x m block: the distances, one kernel block per temperature and
            # an exponent (the distance pass's scratch and hit mask come before them); per row the
            # chunk, centred, and its class's rows
            per_row = m_max * ((len(self.temperatures) + 2) * it + 1) + it * (3 * d + 4)
            fixed = 8 * (d + 1) * len(self.temperatures) * self.n_landmarks  # the float64 sums below
            chunk_size = max(1, min(rows.n, (self.memory_budget - SLACK - fixed) // per_row,
                                    max(1, (1 << 22) // m_max)))
        chunk_size = int(chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        sums = [[xp.zeros(s.m, dtype=xp.float64) for _ in self.temperatures] for s in self.shards]
        outer = [[xp.zeros((s.m, d), dtype=xp.float64) for _ in self.temperatures] for s in self.shards]
        counts = [0 for _ in self.shards]
        with progress_bar(rows.n, "dxfield summaries", enabled=progress) as bar:
            for i0, chunk in rows.chunks(chunk_size, self.dtype):
                yc = chunk - dev["centre"]
                for si, shard in enumerate(self.shards):
                    if lab is None:
                        part = yc
                    else:
                        sel = np.flatnonzero(lab[i0:i0 + chunk.shape[0]] == shard.label)
                        if sel.size == 0:
                            continue
                        part = yc[xp.asarray(sel)]
                    counts[si] += int(part.shape[0])
                    # k(y, U) per temperature, unshifted: these are sums over the data
                    ks = kernel_tiles(part, dev["uc"][si], self.taus, self.kernel, bb=dev["uu"][si])
                    for k, kr in enumerate(ks):
                        sums[si][k] += kr.sum(axis=0).astype(xp.float64)
                        outer[si][k] += (kr.T @ part).astype(xp.float64)
                    del ks, kr  # before the next chunk's blocks: the budget holds one set
                bar.update(chunk.shape[0])
        for si, shard in enumerate(self.shards):
            shard.n += counts[si]
            for k in range(len(self.temperatures)):
                a = shard.factors[k]
                shard.t[k] = shard.t[k] + a @ to_host(sums[si][k])
                shard.G[k] = shard.G[k] + a @ to_host(outer[si][k])
        self._device_cache.clear()

    # -- device copies ---------------------------------------------------------------
    def on_device(self, placement: Placement) -> dict:
        """Working-dtype arrays of this cache on ``placement``'s device (made once per device)."""
        key = placement.device
        if key not in self._device_cache:
            xp = placement.xp
            to = lambda a: xp.asarray(np.asarray(a, dtype=self.dtype))  # noqa: E731
            with device_context(placement):
                centre = to(self.centre)
                uc = [to(s.landmarks - self.centre) for s in self.shards]
                self._device_cache[key] = dict(
                    centre=centre,
                    uc=uc,
                    uu=[sq_norms(u) for u in uc],
                    folded=[[to(s.folded(k)) for k in range(len(self.temperatures))] for s in self.shards],
                    uc_all=xp.concatenate(uc),
                    # data points each landmark stands for (n / m of its shard): the landmarks'
                    # mass when they replace the data (bidirectional fallback)
                    mass=[xp.full(s.m, s.n / max(s.m, 1), dtype=self.dtype) for s in self.shards],
                )
                dev = self._device_cache[key]
                dev["uu_all"] = sq_norms(dev["uc_all"])
                dev["mass_all"] = xp.concatenate(dev["mass"])
                dev["folded_all"] = [xp.concatenate([f[k] for f in dev["folded"]]) for k in range(len(self.temperatures))]
        return self._device_cache[key]

    @staticmethod
    def per_device(dev: dict, key, make):
        """``dev[key]``, made by ``make()`` on first use (the device copies are dropped when summaries change)."""
        if key not in dev:
            dev[key] = make()
        return dev[key]

    def block_factors(self, dev: dict, xp, shards, k: int):
        """The factors ``A`` of the given shards at temperature ``k``, block diagonal, float64, made once per
        device."""
        return self.per_device(dev, ("factors", tuple(shards), k), lambda: _block_diag(
            xp, [self.shards[i].factors[k] for i in shards]))

    def inverse_gram(self, dev: dict, xp, shards, k: int):
        """``W^{-1} = A A`` of the given shards (block diagonal), float64, made once per device."""
        return self.per_device(dev, ("winv", tuple(shards), k), lambda: _block_diag(
            xp, [self.shards[i].factors[k] @ self.shards[i].factors[k] for i in shards]))

    # -- which shards serve which rows ------------------------------------------------
    def class_groups(self, labels, n: int):
        """Map query labels to shard indices: ``(groups, host labels)``, groups a list of
        (shard index, host row indices); ``(None, None)`` without labels."""
        if labels is None:
            if self.n_samples == 0:
                raise ValueError("this cache holds no summaries yet (n = 0), so it would attract nothing: build it "
                                 "with summarize=True, or add the data with add_summaries()")
            return None, None
        lab = host_labels(labels, n, "one per query")
        if self.classes == [None]:
            raise ValueError("labels were given but this cache is unconditional (built without labels)")
        known = {s.label: i for i, s in enumerate(self.shards)}
        out = []
        for c in np.unique(lab):
            if int(c) not in known:
                raise ValueError(f"labels contains class {int(c)}, which this cache has no summaries for; "
                                 f"known classes: {sorted(known)}")
            out.append((known[int(c)], np.flatnonzero(lab == c)))
        empty = [self.shards[si].label for si, _ in out if self.shards[si].n == 0]
        if empty:
            raise ValueError(f"labels contains class(es) {empty[:10]} whose summaries are empty (n = 0: no data row "
                             "of them was summarised), so those queries would get no attraction; add their rows "
                             "with add_summaries()")
        return out, lab

    def sample_groups(self, labels, b: int, groups):
        """Rows of ``pos_sample`` per query group (all rows without classes)."""
        if groups is None:
            if labels is not None and self.classes != [None]:
                # unconditional queries on a class cache: every class's rows, one shard each
                lab = host_labels(labels, b, "one per row of pos_sample")
                return {i: np.flatnonzero(lab == s.label) for i, s in enumerate(self.shards)}
            if self.classes != [None]:
                raise ValueError("pos_sample_labels are needed to correct a class-conditional cache")
            return {None: np.arange(b)}
        if labels is None:
            raise ValueError("pos_sample_labels are needed with labels (one class per row of pos_sample)")
        lab = host_labels(labels, b, "one per row of pos_sample")
        return {si: np.flatnonzero(lab == self.shards[si].label) for si, _ in groups}


    # -- summaries as one vector (all-reduce) ---------------------------------------------
    def summary_vector(self) -> np.ndarray:
        """Every shard's ``t``, ``G`` and ``n`` as one float64 vector (host), e.g. to all-reduce.

        Summaries are sums over the data, so the element-wise sum of the vectors
        of caches built on the same landmarks from disjoint rows is the vector of
        their union; :meth:`set_summary_vector` takes it back.
        """
        parts = []
        for s in self.shards:
            parts += [np.asarray(t, np.float64).ravel() for t in s.t]
            parts += [np.asarray(g, np.float64).ravel() for g in s.G]
            parts.append(np.array([s.n], np.float64))  # exact: counts are far below 2**53
        return np.concatenate(parts)

    def set_summary_vector(self, flat) -> "Summaries":
        """Replace the summaries by a vector laid out as :meth:`summary_vector`'s; returns ``self``."""
        flat = np.asarray(flat, np.float64).ravel()
        size = sum(sum(t.size for t in s.t) + sum(g.size for g in s.G) + 1 for s in self.shards)
        if flat.shape[0] != size:
            raise ValueError(f"flat must hold {size} values (the layout of summary_vector()), got {flat.shape[0]}")
        i = 0
        for s in self.shards:
            for k, t in enumerate(s.t):
                s.t[k] = flat[i:i + t.size].reshape(t.shape).copy()
                i += t.size
            for k, g in enumerate(s.G):
                s.G[k] = flat[i:i + g.size].reshape(g.shape).copy()
                i += g.size
            s.n = int(round(flat[i]))
            i += 1
        self._device_cache.clear()
        return self


    # -- merge / save / load -------------------------------------------------------------
    def merge(self, *others: "Summaries") -> "Summaries":
        """Summaries of disjoint data shards built on the same landmarks, added: a new cache."""
        return merge(self, *others)


def merge(first: Summaries, *others: Summaries) -> Summaries:
    """Add the summaries of caches built with the same kernel, temperatures, scale and landmarks."""
    out = type(first)(kernel=first.kernel, temperatures=first.temperatures, ridge=first.ridge,
                         eig_clamp=first.eig_clamp, feature_scale=first.feature_scale, dim=first.dim,
                         centre=first.centre, shards=[copy_shard(s) for s in first.shards],
                         fingerprint={"merged": True}, dtype=first.dtype, den_floor=first.den_floor,
                         memory_budget=first.memory_budget)
    for other in others:
        for attr in ("kernel", "temperatures", "ridge", "eig_clamp", "feature_scale", "dim"):
            if getattr(other, attr) != getattr(first, attr):
                raise ValueError(f"cannot merge caches with different {attr}: {getattr(first, attr)!r} vs "
                                 f"{getattr(other, attr)!r}")
        by_label = {s.label: s for s in out.shards}
        for s in other.shards:
            mine = by_label.get(s.label)
            if mine is None:
                raise ValueError(f"cannot merge: class {s.label!r} has no shard in the first cache; "
                                 "build every part with the same labels/landmarks")
            if mine.landmarks.shape != s.landmarks.shape or not np.array_equal(mine.landmarks, s.landmarks):
                raise ValueError(f"cannot merge: the shards of class {s.label!r} were built on different landmarks")
            if any(not np.allclose(fa, fb, rtol=1e-10, atol=0) for fa, fb in zip(mine.factors, s.factors)):
                raise ValueError(f"cannot merge: the shards of class {s.label!r} have different Nystrom factors "
                                 "(another ridge/clamp or kernel setting)")
            # G is stored centred on each cache's centre: re-centre before adding
            offset = other.centre - out.centre
            for k in range(len(out.temperatures)):
                mine.t[k] = mine.t[k] + s.t[k]
                mine.G[k] = mine.G[k] + s.G[k] + np.outer(s.t[k], offset)
            mine.n += s.n
    return out


def distinct_rows(u: np.ndarray) -> np.ndarray:
    """The rows of ``u`` without exact repeats, in their first-seen order."""
    _, first = np.unique(u, axis=0, return_index=True)
    return u[np.sort(first)]


def host_labels(labels, n: int, what: str) -> np.ndarray:
    """Class labels from any array type as a checked host int64 array of shape (n,)."""
    return checks.class_labels(to_host(place({"labels": labels}, "numpy")[1]["labels"]), n, "labels", what)


def copy_shard(s: Shard) -> Shard:
    return Shard(s.label, s.landmarks.copy(), [f.copy() for f in s.factors], [t.copy() for t in s.t],
                 [g.copy() for g in s.G], s.n, [dict(sp) for sp in s.spectra])


def factor_landmarks(u: np.ndarray, taus, kernel: str, ridge: float, eig_clamp: float, dtype):
    """Per temperature ``A = (K_UU + ridge I)^{-1/2}`` (host float64) and spectrum summaries;
    warns when a factor is too ill-conditioned for the working ``dtype``."""
    d2 = sqdist(u, u)
    factors, spectra = [], []
    for tau in taus:
        gram = np.exp(log_kernel_from_sqdist(d2.copy(), tau, kernel))
        a, sp = inverse_sqrt(np, gram, ridge, eig_clamp)
        warn_if_ill_conditioned(sp.condition_number, dtype, ridge, f"ProjectedField (tau={tau:.4g})", stacklevel=5)
        factors.append(a)
        spectra.append({"condition_number": sp.condition_number, "effective_rank": sp.effective_rank,
                        "n_clamped": sp.n_clamped, "eigenvalue_min": float(sp.eigenvalues.min()),
                        "eigenvalue_max": float(sp.eigenvalues.max())})
    return factors, spectra



def _block_diag(xp, blocks):
    size = sum(b.shape[0] for b in blocks)
    out = np.zeros((size, size))
    i = 0
    for b in blocks:
        out[i:i + b.shape[0], i:i + b.shape[0]] = b
        i += b.shape[0]
    return xp.asarray(out)


class RowSource:
    """Rows of a data set read in chunks: an in-memory array (any backend), a memmap or an HDF5 dataset."""

    def __init__(self, data, name: str, backend=None):
        self.name = name
        mod = type(data).__module__.split(".")[0]
        if mod == "h5py" or (isinstance(data, np.memmap)):
            self.data = data
            self.in_memory = False
            self.placement = place({}, backend)[0]
        else:
            self.placement, a = place({name: data}, backend)
            self.data = a[name]
            self.in_memory = True
        shape = tuple(self.data.shape)
        if len(shape) != 2:
            raise ValueError(f"{name} must be a 2-D array (n x D), got shape {shape}")
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"{name} must have at least one row and one column, got shape {shape}")
        self.n, self.d = int(shape[0]), int(shape[1])
        self.dtype = np.dtype(str(self.data.dtype)) if not hasattr(self.data.dtype, "kind") else self.data.dtype
        if np.dtype(self.dtype).kind not in "fiub":
            raise TypeError(f"{name} must hold real numbers, got dtype {self.dtype}")

    def _read(self, sl, dtype):
        xp = self.placement.xp
        block = self.data[sl]
        if not self.in_memory:
            block = xp.asarray(np.asarray(block))
        block = block.astype(dtype, copy=False)
        lo, hi = checks.extent(block)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            checks.finite(block, self.name)  # raises, saying where
        limit = checks.largest_magnitude(dtype, self.d)
        if max(-lo, hi) > limit:
            raise checks.magnitude_error(self.name, max(-lo, hi), limit,
                                         f"by a {np.dtype(dtype).name} ProjectedField of D={self.d}", dtype)
        return block

    def chunks(self, size: int, dtype):
        for i0 in range(0, self.n, size):
            yield i0, self._read(slice(i0, min(self.n, i0 + size)), dtype)

    def take(self, idx: np.ndarray, dtype):
        """Rows at sorted host indices."""
        if self.in_memory:
            return self._read(self.placement.xp.asarray(idx), dtype)
        return self._read(np.asarray(idx), dtype)

    def array(self, dtype):
        return self._read(slice(None), dtype)

    def fingerprint(self) -> dict:
        """Shape, dtype and a hash of up to 64 evenly spaced rows: identifies the data set cheaply."""
        idx = np.unique(np.linspace(0, self.n - 1, num=min(self.n, 64)).astype(np.int64))
        rows = self.data[idx] if not self.in_memory else self.data[self.placement.xp.asarray(idx)]
        rows = np.ascontiguousarray(to_host(rows) if self.in_memory else np.asarray(rows))
        return {"shape": [self.n, self.d], "dtype": str(self.dtype),
                "sampled_rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()}

