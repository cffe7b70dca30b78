"""The projected drifting field (DriftXpress): attraction from cached Nystrom summaries.

Math (design.md 2.4).  Landmarks ``U`` (real samples), per temperature a
Nystrom map ``phi(x) = k(x, U) A`` with ``A = (K_UU + ridge I)^{-1/2}``, and
summaries of the positives ``Y``::

    t = sum_j phi(y_j)   (m),    G = sum_j phi(y_j) y_j^T   (m x D),    n = |Y|

so the attraction (the row-normalised barycentre of the positives) is::

    b+(x) = phi(x) G / phi(x) t = k(x, U) [A G] / k(x, U) [A t]

The "folded" matrix ``F = A [G | t]`` (m x (D+1)) makes a step cost one
``k(x, U)`` block times ``F``: O(N m D), whatever the number of positives.
Summaries are sums over the data, so shards built on the same landmarks add.

Class shards (``labels``) have their own landmarks, factors and summaries; the
unconditional attraction combines them block-diagonally,
``sum_s phi_s G_s / sum_s phi_s t_s``; ``field(x, labels=...)`` uses each
query's own class.

Numerics.  Kernel rows are shifted by their maximum before ``exp`` (the ratio
is unchanged), so small temperatures do not underflow.  When the Nystrom
denominator ``k(x, U) A t`` is not positive, or is below ``den_floor`` (default
1e-8, the paper's clamp) times the sum of the magnitudes of its terms
``k(x, U) |A t|`` (so that cancellation has eaten its digits), the
approximation has broken down for that row, and its attraction falls back to
the kernel-weighted mean of the landmarks (the exact barycentre with the
landmarks as positives).  The
number of such rows is reported in :attr:`ProjectedField.last_stats`.

Bidirectional normalisation (``field(..., normalization="bidirectional")``):
Algorithm 2 (design.md 2.1) with the whole summarised data as positives.  Its
column sums over the queries, ``c_j = sum_i k(x_i, y_j)``, are taken at the
landmarks, ``c_u``, which stand for the data around them::

    sum_j k(x, y_j) c_j^{-1/2} [y_j, 1]  ~  k(x, U) diag(c_U^{-1/2}) W^{-1} [G_raw | t_raw]
                                          =  k(x, U) diag(c_U^{-1/2}) A [G | t]

(the same folded matrix, columns reweighted per step; exact with every
positive a landmark and ridge -> 0).  Data far from every query has small
column sums and keeps its pull, so a generator does not settle on the
heaviest modes as under the row-normalised mean shift, where a batch sitting
on one mode feels almost nothing of the others.  The negatives' side is the
exact sweep with its own column sums; the row sums add both sides.  Rows
where a Nystrom sum is not positive or lost its digits use the landmarks as
the data (each with mass ``n / m`` of its shard).  With ``repulsion="nystrom"``
the negatives (the batch) are summarised on the same landmarks each call, so
both sides go through one kernel (see :meth:`ProjectedField.field`).

Repulsion is exact over the negatives by default (the blockwise exact code,
row-normalised, self pairs masked), or ``"nystrom"``: the batch's own summaries
on the same landmarks with each query's self-interaction ``||phi(x_i)||^2``
removed from numerator and denominator (computed in float64; rows whose
denominator is not positive fall back to exact repulsion).

Limits.  ``k(x, U) A t`` sums O(1) terms to a value as small as the true
kernel sum over the positives.  With landmarks among the positives (as
:func:`dxfield.landmarks.select` picks them) that sum is at least the nearest
landmark's own term, so the ratio is accurate at any temperature.  With
landmarks that are not positives, at temperatures so small that a query's
whole kernel sum falls below float64 rounding of those terms (about
``exp(-35)``), no floating-point evaluation of the Nystrom formula can be
accurate, and the cancellation test cannot always see it; keep landmarks
among the positives.

The feature scale ``S`` is fixed when the cache is built and stored with it:
kernels use ``tau * S * sqrt(D)`` in raw units and the field is returned in
units of ``S``, like :func:`dxfield.drift_field`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field as dc_field
from typing import Any

import numpy as np

from . import _checks
from ._backend import Device, Placement, device_context, device_of, place
from ._cuda import PRECISIONS
from ._fused import resolve as resolve_engine
from ._memory import SLACK, parse_budget, tile_cap
from ._progress import Progress
from .field import (DEFAULT_TEMPERATURES, NORMALIZATIONS, ExactSums, LogSumExp, RowSums, Targets, _weights, combine,
                    normalize_drift, resolve_negatives)
from .kernels import check_kernel, kernel_tiles, log_kernel_from_sqdist, logit_coef, sq_norms, sqdist
from .landmarks import METHODS, _mean_distance, nearest, select
from .nystrom import _host, _non_negative, column_log_sums, inverse_sqrt, kernel_products, warn_if_ill_conditioned

REPULSIONS = ("exact", "nystrom")
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


class ProjectedField:
    """DriftXpress field: Nystrom attraction from cached summaries + exact (or Nystrom) repulsion.

    Build once from the real data (``build``), save/load it as an HDF5 cache,
    then call ``field(x)`` every training step.

    Examples
    --------
    >>> import numpy as np, dxfield
    >>> rng = np.random.default_rng(0)
    >>> data = rng.normal(size=(5000, 8)).astype(np.float32) + 2
    >>> pf = dxfield.ProjectedField.build(data, landmarks=256, method="uniform", temperatures=(0.05, 0.2))
    >>> x = rng.normal(size=(64, 8)).astype(np.float32)
    >>> V = pf.field(x)                 # (64, 8), like drift_field(x, data, normalization="row")
    >>> V.shape
    (64, 8)
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
        self._home = placement

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
        return (f"ProjectedField({self.kernel}, temperatures={self.temperatures}, D={self.dim}, "
                f"{self.n_landmarks} landmarks, {self.n_samples} samples, {cls}, S={self.feature_scale})")

    # -- building ------------------------------------------------------------------
    @classmethod
    def build(cls, pos, *, temperatures=DEFAULT_TEMPERATURES, landmarks=1024, method: str = "kmeans",
              labels=None, ridge: float = 1e-4, eig_clamp: float = 1e-8, kernel: str = "laplace",
              feature_scale="auto", seed: int = 0, chunk_size: int | None = None, progress: bool = False,
              den_floor: float = DEFAULT_DEN_FLOOR, memory_budget=None, backend=None, dtype=None,
              selection_pool: int = 100_000, summarize: bool = True) -> "ProjectedField":
        """Choose landmarks, factor their Gram matrices and stream the summaries of ``pos``.

        Parameters
        ----------
        pos : array (P, D)
            Real samples (features).  NumPy/CuPy/DLPack arrays, a memory-mapped
            ``.npy`` (``np.load(..., mmap_mode="r")``) or an HDF5 dataset
            (``h5py``); read in chunks, so it may be larger than memory.
        temperatures : float or sequence
            As in :func:`dxfield.drift_field` (in units of the feature scale).
        landmarks : int or array (m, D)
            Landmarks per class (or in all) to select with ``method``, or the
            landmark points themselves (shared by every class shard).
        method : {"uniform", "kmeans", "kcenter", "rls"}
            Landmark selection (see :mod:`dxfield.landmarks`); for data that is
            not in memory it runs on a uniform pool of ``selection_pool`` rows.
        labels : array (P,) of ints, optional
            Build one shard per class (class-conditional fields).
        ridge, eig_clamp : Nystrom regularisation (see :class:`dxfield.Nystrom`).
        feature_scale : "auto", float or None
            "auto": ``S = mean pairwise distance / sqrt(D)`` over up to 2048
            sampled positives, fixed here and stored with the cache.
        chunk_size : int, optional
            Rows per streamed chunk (default: from ``memory_budget``).
        progress : bool
            Show a progress bar on stderr while streaming.
        summarize : bool
            False: choose the landmarks, feature scale and factors from ``pos``
            (deterministic given ``seed``) but leave the summaries empty
            (``n == 0``); add them with :meth:`add_summaries`, e.g. one subset of
            the rows per process, then sum ``t``, ``G`` and ``n`` over the
            processes (summaries are sums over the data).
        """
        temps = _checks.temperatures(temperatures)
        kernel = check_kernel(kernel)
        method = _checks.choice(method, "method", METHODS)
        ridge = _non_negative(ridge, "ridge")
        eig_clamp = _checks.positive_float(eig_clamp, "eig_clamp")
        den_floor = _checks.positive_float(den_floor, "den_floor")
        budget = parse_budget(memory_budget)
        rows = RowSource(pos, "pos", backend)
        placement, xp = rows.placement, rows.placement.xp
        wdtype = np.dtype(dtype) if dtype is not None else (np.dtype(np.float64) if rows.dtype == np.float64 else np.dtype(np.float32))
        n, d = rows.n, rows.d
        lab = None if labels is None else _host_labels(labels, n, "one per row of pos")
        rng = np.random.default_rng(seed)
        with device_context(placement):
            # feature scale, fixed now
            if isinstance(feature_scale, str):
                if feature_scale != "auto":
                    raise ValueError(f"feature_scale={feature_scale!r} is not valid; use 'auto', a number > 0, or None")
                sample = rows.take(np.sort(rng.choice(n, size=min(n, 2048), replace=False)), wdtype)
                scale = _mean_distance(xp, sample, rng, sample=sample.shape[0]) / math.sqrt(d) if n > 1 else 1.0
            elif feature_scale is None:
                scale = None
            else:
                scale = _checks.positive_float(feature_scale, "feature_scale")
            unit = 1.0 if scale is None else scale * math.sqrt(d)
            taus = [t * unit for t in temps]
            # landmarks per shard
            groups = [(None, None)] if lab is None else [(int(c), np.flatnonzero(lab == c)) for c in np.unique(lab)]
            if isinstance(landmarks, (int, np.integer)) and not isinstance(landmarks, bool):
                m = int(landmarks)
                pool = np.arange(n) if rows.in_memory or n <= selection_pool else np.sort(
                    rng.choice(n, size=selection_pool, replace=False))
                pool_y = rows.take(pool, wdtype) if not rows.in_memory else rows.array(wdtype)
                pool_lab = None if lab is None else lab[pool]
                idx = _host(select(pool_y, m, method=method, labels=pool_lab, seed=seed, kernel=kernel,
                                   tau=max(taus), memory_budget=budget))
                points = _host(pool_y[xp.asarray(idx)]).astype(np.float64)
                # identical points (e.g. blank corners of images) repeat a landmark: keep one of each
                per_shard = [_distinct_rows(points[i * m:(i + 1) * m]) for i in range(len(groups))]
            else:
                u = _host(place({"landmarks": landmarks}, "numpy")[1]["landmarks"])
                u = _checks.float_matrix(u, "landmarks", np.float64, dim=d)
                distinct = _distinct_rows(u)
                if distinct.shape[0] < u.shape[0]:
                    warnings.warn(f"landmarks: {u.shape[0] - distinct.shape[0]} duplicate row(s) dropped "
                                  f"({distinct.shape[0]} distinct landmarks kept)", stacklevel=2)
                per_shard = [distinct for _ in groups]
            centre = np.mean(np.concatenate(per_shard), axis=0)
            shards = []
            shared = {}
            for (label, _), u in zip(groups, per_shard):
                key = id(u)
                if key not in shared:
                    shared[key] = _factor(u, taus, kernel, ridge, eig_clamp, wdtype)
                factors, spectra = shared[key]
                shards.append(Shard(label, u, factors, [np.zeros(u.shape[0]) for _ in temps],
                                    [np.zeros((u.shape[0], d)) for _ in temps], 0, spectra))
            pf = cls(kernel=kernel, temperatures=temps, ridge=ridge, eig_clamp=eig_clamp, feature_scale=scale,
                     dim=d, centre=centre, shards=shards, fingerprint=rows.fingerprint(), dtype=wdtype,
                     den_floor=den_floor, placement=placement, memory_budget=budget)
            if summarize:
                pf._accumulate(rows, lab, chunk_size=chunk_size, progress=progress)
        return pf

    def add_summaries(self, pos, labels=None, *, chunk_size: int | None = None, progress: bool = False,
                      backend=None) -> "ProjectedField":
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
            lab = _host_labels(labels, rows.n, "one per row of pos")
            unknown = sorted(set(np.unique(lab).tolist()) - {s.label for s in self.shards})
            if unknown:
                raise ValueError(f"labels contains classes {unknown[:5]} that this cache has no shards for")
        elif conditional:
            raise ValueError("this cache is class-conditional: pass the labels of pos")
        with device_context(rows.placement):
            self._accumulate(rows, lab, chunk_size=chunk_size, progress=progress)
        return self

    def _accumulate(self, rows: "RowSource", lab, *, chunk_size, progress: bool) -> None:
        """One streaming pass: kernel sums ``sum_j k(U, y_j)`` and ``sum_j k(U, y_j) y_j^T``, then t, G."""
        xp = rows.placement.xp
        dev = self._on(rows.placement)
        d = self.dim
        it = self.dtype.itemsize
        m_max = max(s.m for s in self.shards)
        if chunk_size is None:
            per_row = m_max * (3 * it + 1) + it * (2 * d + 4)
            chunk_size = max(1, min(rows.n, (self.memory_budget - SLACK) // per_row, max(1, (1 << 22) // m_max)))
        chunk_size = int(chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        sums = [[xp.zeros(s.m, dtype=xp.float64) for _ in self.temperatures] for s in self.shards]
        outer = [[xp.zeros((s.m, d), dtype=xp.float64) for _ in self.temperatures] for s in self.shards]
        counts = [0 for _ in self.shards]
        with Progress(rows.n, "dxfield summaries", enabled=progress) as bar:
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
                bar.update(chunk.shape[0])
        for si, shard in enumerate(self.shards):
            shard.n += counts[si]
            for k in range(len(self.temperatures)):
                a = shard.factors[k]
                shard.t[k] = shard.t[k] + a @ _host(sums[si][k])
                shard.G[k] = shard.G[k] + a @ _host(outer[si][k])
        self._device_cache.clear()

    # -- device copies ---------------------------------------------------------------
    def _on(self, placement: Placement) -> dict:
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

    # -- evaluation ------------------------------------------------------------------
    def _prepare(self, x, extra: dict, backend, check_finite: bool):
        placement, a = place({"x": x, **extra}, backend)
        xp = placement.xp
        xa = _checks.float_matrix(a["x"], "x", self.dtype, check_finite=check_finite)
        if xa.shape[1] != self.dim:
            raise ValueError(f"x has {xa.shape[1]} features per row but this cache was built for D={self.dim}")
        return placement, xp, xa, a

    def _class_rows(self, labels, n: int):
        """Map query labels to shard indices: ``(groups, host labels)``, groups a list of
        (shard index, host row indices); ``(None, None)`` without labels."""
        if labels is None:
            return None, None
        lab = _host_labels(labels, n, "one per query")
        if self.classes == [None]:
            raise ValueError("labels were given but this cache is unconditional (built without labels)")
        known = {s.label: i for i, s in enumerate(self.shards)}
        out = []
        for c in np.unique(lab):
            if int(c) not in known:
                raise ValueError(f"labels contains class {int(c)}, which this cache has no summaries for; "
                                 f"known classes: {sorted(known)}")
            out.append((known[int(c)], np.flatnonzero(lab == c)))
        return out, lab

    def _engine(self, placement, engine, precision):
        """The fused engine's ops for this call, or None (composed); see :func:`dxfield._fused.resolve`."""
        return resolve_engine(engine, precision, placement, self.dtype, len(self.temperatures),
                              precisions=PRECISIONS)

    def _attraction(self, xp, xa, groups, ops=None, precision="float32"):
        """Per temperature b+ (N x D) in coordinates centred on the cache's centre; and fallback counts."""
        dev = self._on(self._placement_for(xp, xa))
        n, d = xa.shape
        nt = len(self.temperatures)
        out = [xp.empty((n, d), dtype=self.dtype) for _ in range(nt)]
        fallback = [0] * nt
        jobs = [(None, None)] if groups is None else groups
        for si, rows in jobs:
            if si is None:
                uc, uu, folded = dev["uc_all"], dev["uu_all"], dev["folded_all"]
                xs = xa
            else:
                uc, uu, folded = dev["uc"][si], dev["uu"][si], [dev["folded"][si][k] for k in range(nt)]
                xs = xa[xp.asarray(rows)]
            prods, _ = kernel_products(xp, xs, uc, uu, dev["centre"], folded, self.taus, self.kernel,
                                       budget=self.memory_budget, tile_entries=tile_cap(device_of(xa)),
                                       shift_rows=True, ops=ops, precision=precision)
            for k, pr in enumerate(prods):
                # Fallback where the denominator is not positive or is lost in cancellation:
                # below den_floor relative to the magnitude of the terms it sums.
                num, den = pr[:, :d], pr[:, d]
                bad = ~(den > self.den_floor * pr[:, d + 1])
                nbad = int(bad.sum())
                if nbad:
                    fallback[k] += nbad
                    bad_idx = xp.nonzero(bad)[0]
                    ext = xp.concatenate([uc, xp.ones((uc.shape[0], 1), dtype=uc.dtype)], axis=1)
                    fb, _ = kernel_products(xp, xs[bad_idx], uc, uu, dev["centre"], [ext], [self.taus[k]],
                                            self.kernel, budget=self.memory_budget,
                                            tile_entries=tile_cap(device_of(xa)), shift_rows=True, ops=ops)
                    num[bad_idx] = fb[0][:, :d]
                    den[bad_idx] = fb[0][:, d]
                b = num / den[:, None]
                if si is None:
                    out[k] = b
                else:
                    out[k][xp.asarray(rows)] = b
        return out, fallback

    def _bidirectional_attraction(self, xp, xa, groups):
        """The positives' side of Algorithm 2 against the whole summarised data, per temperature.

        Column sums over the queries are taken at the landmarks,
        ``c_u = sum_i k(x_i, u)``, and stand for those of the data points
        around them: ``sum_j k(x, y_j) c_j^{-1/2} [y_j, 1] ~ k(x, U) diag(c^{-1/2})
        W^{-1} [G_raw | t_raw]`` (exact with every point a landmark and ridge -> 0).
        Returns a list over temperatures of ``(b, log_w, log_r)``: ``b`` (N x D,
        centred on the cache's centre) the column-weighted barycentre, ``log_w =
        log sum_j k_ij c_j^{-1/2}`` and ``log_r = log sum_j k_ij`` (float64), and
        the fallback counts (rows where a Nystrom sum lost its sign or its digits
        use the landmarks as the data, each with the mass ``n / m`` of its shard).
        """
        dev = self._on(self._placement_for(xp, xa))
        n, d = xa.shape
        nt = len(self.temperatures)
        out = [(xp.empty((n, d), dtype=self.dtype), xp.empty(n), xp.empty(n)) for _ in range(nt)]
        fallback = [0] * nt
        kw = dict(budget=self.memory_budget, tile_entries=tile_cap(device_of(xa)))
        for si, rows in [(None, None)] if groups is None else groups:
            if si is None:
                uc, uu, folded, mass = dev["uc_all"], dev["uu_all"], dev["folded_all"], dev["mass_all"]
                xs = xa
            else:
                uc, uu, mass = dev["uc"][si], dev["uu"][si], dev["mass"][si]
                folded = [dev["folded"][si][k] for k in range(nt)]
                xs = xa[xp.asarray(rows)]
            lcs, dists = column_log_sums(xp, xs, uc, uu, dev["centre"], self.taus, self.kernel, **kw)
            colw, mats, tops, ws = [], [], [], []
            for k, lc in enumerate(lcs):
                top = float(lc.max())
                w = xp.exp(0.5 * (lc - top)).astype(self.dtype)  # c_u^{1/2} / max: k_iu = e_iu c_u^{1/2}
                # columns: [A G | A t | |A t| | (A t) w | |A t| w]
                mats.append(xp.concatenate([folded[k], folded[k][:, d:d + 2] * w[:, None]], axis=1))
                colw.append(-0.5 * lc)
                tops.append(0.5 * top)
                ws.append(w)
            prods, shifts = kernel_products(xp, xs, uc, uu, dev["centre"], mats, self.taus, self.kernel,
                                            shift_rows=True, col_log_weights=colw, distances=dists, **kw)
            for k, pr in enumerate(prods):
                shift = shifts[k]
                num, den, rsum = pr[:, :d], pr[:, d], pr[:, d + 2]
                bad = ~(den > self.den_floor * pr[:, d + 1]) | ~(rsum > self.den_floor * pr[:, d + 3])
                nbad = int(bad.sum())
                if nbad:
                    fallback[k] += nbad
                    bad_idx = xp.nonzero(bad)[0]
                    ext = xp.concatenate([uc * mass[:, None], mass[:, None], mass[:, None],
                                          (mass * ws[k])[:, None], (mass * ws[k])[:, None]], axis=1)
                    fb, fs = kernel_products(xp, xs[bad_idx], uc, uu, dev["centre"], [ext], [self.taus[k]],
                                             self.kernel, shift_rows=True, col_log_weights=[colw[k]], **kw)
                    pr[bad_idx] = fb[0]
                    shift[bad_idx] = fs[0]
                has = den > 0  # only without any data (n = 0)
                b = num / xp.where(has, den, 1.0)[:, None]
                shift64 = shift.astype(xp.float64)
                with np.errstate(divide="ignore"):
                    log_w = xp.where(has, shift64 + xp.log(xp.where(has, den, 1.0).astype(xp.float64)), -xp.inf)
                    log_r = xp.where(has, shift64 + tops[k] + xp.log(xp.where(has, rsum, 1.0).astype(xp.float64)),
                                     -xp.inf)
                if si is None:
                    out[k] = (b, log_w, log_r)
                else:
                    idx = xp.asarray(rows)
                    out[k][0][idx], out[k][1][idx], out[k][2][idx] = b, log_w, log_r
        return out, fallback

    def _placement_for(self, xp, a) -> Placement:
        dev = device_of(a)
        return Placement(xp=xp, device=dev, origin=dev)

    def attraction(self, x, *, labels=None, backend=None, check_finite: bool = True, engine=None,
                   precision: str = "float32"):
        """The barycentres ``b+(x)`` per temperature: array (T, N, D) in raw feature units.

        With ``labels``, each query uses its own class's summaries; otherwise all
        shards combine block-diagonally.  ``engine`` and ``precision`` as in
        :meth:`field`.
        """
        placement, xp, xa, _ = self._prepare(x, {}, backend, check_finite)
        ops = self._engine(placement, engine, precision)
        with device_context(placement):
            groups, _ = self._class_rows(labels, xa.shape[0])
            bs, fallback = self._attraction(xp, xa, groups, ops, precision)
            self.last_stats = {"attraction_fallback_rows": fallback}
            out = xp.stack(bs) + self._on(placement)["centre"]
            return placement.to_origin(out)

    def field(self, x, neg=None, *, labels=None, normalization: str = "row", repulsion: str = "exact",
              drift_norm: bool = True, neg_weight=None, include_self: bool | None = None, backend=None,
              check_finite: bool = True, engine=None, precision: str = "float32", pos_sample=None,
              pos_sample_labels=None):
        """The projected drifting field ``V = b+ - b-`` at ``x`` (N x D), summed over temperatures.

        Parameters
        ----------
        x : array (N, D)
            Queries (generated features), raw units.
        neg : array (M, D), optional
            Explicit negatives; default the queries themselves (self pairs masked).
        labels : array (N,) of ints, optional
            Class of each query (class-conditional caches): attraction to its
            class's summaries, repulsion from the other queries of its class.
        normalization : {"row", "bidirectional"}, default "row"
            ``"row"``: ``V = b+ - b-`` (design.md 2.2), what the summaries give
            directly.  ``"bidirectional"``: Algorithm 2 (design.md 2.1) with the
            WHOLE summarised data as positives -- the positives' column sums
            over the queries are taken at the landmarks (see
            :meth:`_bidirectional_attraction`), the negatives' exactly.  Data
            modes that no query is near keep their pull (their small column sums
            boost them), so the generator does not settle on the heaviest modes;
            exact with every positive a landmark and ``ridge -> 0``.  Costs a
            second query-landmark distance block when the block does not fit the
            memory budget.
        pos_sample : array (B, D), optional (bidirectional only)
            A uniform random sample of the summarised data (e.g. a fresh
            mini-batch of real features each step).  The Nystrom sums are then
            corrected by the sample's residual, ``sum_all k f ~ sum_all k^ f +
            (n / B) sum_sample (k - k^) f`` (``k^`` the Nystrom kernel with the
            landmark column weights): an unbiased estimate of Algorithm 2's sums
            over ALL the data whose variance is the residual's, small where the
            Nystrom kernel is good.  With the whole data as the sample it is
            Algorithm 2 exactly, whatever the landmarks.  Costs an exact
            N x B block and O(m^2 B + N m B) per call (dense, float64).
            ``pos_sample_labels``: the sample's classes (class-conditional
            caches; each class is corrected by its own rows, scaled by its own
            count).
        repulsion : {"exact", "nystrom"}
            ``"exact"``: the blockwise exact sweep over the negatives.
            ``"nystrom"`` (negatives = the queries): row normalisation uses the
            batch's own summaries with the self-interaction removed; the
            bidirectional field summarises the batch on the same landmarks as
            the data every call (dense N x m blocks in float64, O(N m (m + D))),
            so attraction and repulsion go through one kernel and the field
            vanishes where the generated and real samples agree, which exact
            repulsion against a Nystrom attraction does not do.  Rows whose
            Nystrom sums fail use the exact negatives.
        drift_norm : bool
            Per-temperature ``V / sqrt(mean ||V||^2 / D)`` before summing.
        neg_weight, include_self : as in :func:`dxfield.drift_field` (exact repulsion).
        engine : {"auto", "composed", "fused"}, optional
            As in :func:`dxfield.drift_field`: ``"fused"`` computes the
            query-landmark kernel block with a CUDA kernel fused with the
            distances, the folded products with cuBLAS, and the exact repulsion
            with the fused exact-field kernels (GPU, float32 caches).
        precision : {"float32", "tf32", "bf16"}, default "float32"
            Precision of the fused engine's matrix products (GPU only):
            ``"tf32"`` and ``"bf16"`` use the tensor cores with float32
            accumulation.  The exact repulsion uses TF32 when ``"bf16"`` is asked.

        Returns
        -------
        V : (N, D) in units of the stored feature scale, in ``x``'s namespace/device.
        Statistics of the call (fallback rows) are left in :attr:`last_stats`.
        """
        normalization = _checks.choice(normalization, "normalization", NORMALIZATIONS)
        repulsion = _checks.choice(repulsion, "repulsion", REPULSIONS)
        include_self, neg_weight = resolve_negatives(neg, neg_weight, include_self)
        if repulsion == "nystrom" and (neg is not None or not include_self):
            raise ValueError("repulsion='nystrom' uses the queries themselves as negatives; "
                             "use repulsion='exact' for explicit negatives")
        if pos_sample is not None and (normalization != "bidirectional" or repulsion != "exact"):
            raise ValueError("pos_sample corrects the bidirectional field with exact repulsion: "
                             "use normalization='bidirectional', repulsion='exact'")
        extra = {"neg": neg}
        if neg_weight is not None and not isinstance(neg_weight, float):
            extra["neg_weight"] = neg_weight
        if pos_sample is not None:
            extra["pos_sample"] = pos_sample
        placement, xp, xa, a = self._prepare(x, extra, backend, check_finite)
        ops = self._engine(placement, engine, precision)
        with device_context(placement):
            n, d = xa.shape
            groups, lab = self._class_rows(labels, n)
            rep = dict(ops=ops, precision="tf32" if precision == "bf16" else precision)
            centre = self._on(placement)["centre"]
            if normalization == "bidirectional":
                sample = None
                if pos_sample is not None:
                    ys = _checks.float_matrix(a["pos_sample"], "pos_sample", self.dtype, dim=d,
                                              check_finite=check_finite)
                    sample = (ys, self._sample_groups(pos_sample_labels, ys.shape[0], groups))
                total, fallback, nys_fallback = self._bidirectional_field(
                    xp, xa, a, groups, lab, include_self, neg_weight, centre, check_finite, drift_norm, rep,
                    repulsion, sample)
                self.last_stats = {"attraction_fallback_rows": fallback, "repulsion_fallback_rows": nys_fallback}
                return placement.to_origin(total)
            bplus, fallback = self._attraction(xp, xa, groups, ops, precision)
            def repel(q):
                if repulsion == "exact":
                    return self._exact_repulsion(xp, q, a, include_self, neg_weight, centre, check_finite,
                                                 **rep), 0
                return self._nystrom_repulsion(xp, q, centre)

            if groups is None:
                bminus, nys_fallback = repel(xa)
            elif repulsion == "exact":
                # class-conditional: one sweep, pairs of different classes masked
                bminus = self._exact_repulsion(xp, xa, a, include_self, neg_weight, centre, check_finite,
                                               xp.asarray(lab), **rep)
                nys_fallback = 0
            else:
                # class-conditional: each query is repelled by the generated samples of its own class
                # (and by the explicit negatives, shared by all classes)
                bminus = [xp.empty_like(xa) for _ in self.temperatures]
                nys_fallback = 0
                for _, rows in groups:
                    idx = xp.asarray(rows)
                    part, nf = repel(xa[idx])
                    nys_fallback += nf
                    for k, b in enumerate(part):
                        bminus[k][idx] = b
            total = None
            for k in range(len(self.temperatures)):
                v = bplus[k]
                v -= bminus[k]
                if drift_norm:
                    v = normalize_drift(xp, v)
                total = v if total is None else total + v
            if self.feature_scale is not None and not drift_norm:
                total /= self.feature_scale
            self.last_stats = {"attraction_fallback_rows": fallback, "repulsion_fallback_rows": nys_fallback}
            return placement.to_origin(total)

    def _sample_groups(self, labels, b: int, groups):
        """Rows of ``pos_sample`` per query group (all rows without classes)."""
        if groups is None:
            if labels is not None and self.classes != [None]:
                # unconditional queries on a class cache: every class's rows, one shard each
                lab = _host_labels(labels, b, "one per row of pos_sample")
                return {i: np.flatnonzero(lab == s.label) for i, s in enumerate(self.shards)}
            if self.classes != [None]:
                raise ValueError("pos_sample_labels are needed to correct a class-conditional cache")
            return {None: np.arange(b)}
        if labels is None:
            raise ValueError("pos_sample_labels are needed with labels (one class per row of pos_sample)")
        lab = _host_labels(labels, b, "one per row of pos_sample")
        return {si: np.flatnonzero(lab == self.shards[si].label) for si, _ in groups}

    def _bidirectional_field(self, xp, xa, a, groups, lab, include_self, neg_weight, centre, check_finite,
                             drift_norm, rep, repulsion, sample=None):
        """Algorithm 2 with the summarised data as positives; the negatives swept exactly, or
        (``repulsion="nystrom"``) summarised on the same landmarks as the positives."""
        n, d = xa.shape
        qlab = None if groups is None else xp.asarray(lab)
        nys_fallback = 0
        if repulsion == "nystrom":
            pos_side, neg_side, fallback, bad = self._bidirectional_nystrom(xp, xa, groups)
            if any(b is not None for b in bad):  # negatives' Nystrom sums failed there: exact for those rows
                sweeper = self._negatives_sweeper(xp, xa, {}, True, None, False, qlab, bidirectional=True, **rep)
                sums, row_lse = sweeper.sweep()
                shift = sweeper.mu - centre
                for k, rows in enumerate(bad):
                    if rows is None:
                        continue
                    nys_fallback += int(rows.shape[0])
                    ex = sums[k][1]
                    has = ex.s[rows] > 0
                    b, log_w, log_r = neg_side[k]
                    b[rows] = ex.acc[rows] / xp.where(has, ex.s[rows], 1.0)[:, None] + shift
                    with np.errstate(divide="ignore"):
                        log_w[rows] = xp.where(has, ex.m[rows] + xp.log(xp.where(has, ex.s[rows], 1.0)), -xp.inf)
                    log_r[rows] = row_lse[k].value()[rows]
            sums = [[self._row_sums(xp, *pos_side[k][:2]), self._row_sums(xp, *neg_side[k][:2])]
                    for k in range(len(self.temperatures))]
            row_lse = [self._log_sum(xp, xp.logaddexp(pos_side[k][2], neg_side[k][2]))
                       for k in range(len(self.temperatures))]
        else:
            if sample is None:
                pos_side, fallback = self._bidirectional_attraction(xp, xa, groups)
            else:
                pos_side, fallback = self._bidirectional_corrected(xp, xa, groups, *sample)
            sweeper = self._negatives_sweeper(xp, xa, a, include_self, neg_weight, check_finite, qlab,
                                              bidirectional=True, **rep)
            sums, row_lse = sweeper.sweep()
            shift = sweeper.mu - centre  # the sweep's sums are centred on the queries' mean
            for k, (b, log_w, log_r) in enumerate(pos_side):
                b -= shift
                sums[k][0] = self._row_sums(xp, b, log_w)
                row_lse[k] = self._log_sum(xp, xp.logaddexp(row_lse[k].value(), log_r))
        v = combine(xp, sums, row_lse, drift_norm=drift_norm)
        if self.feature_scale is not None and not drift_norm:
            v /= self.feature_scale
        return v, fallback, nys_fallback

    def _row_sums(self, xp, b, log_w) -> RowSums:
        """Settled :class:`RowSums` (``s = 1``) from a barycentre and its log weight."""
        n, d = b.shape
        rs = RowSums(xp, n, d, self.dtype)
        rs.m = log_w
        rs.s = xp.isfinite(log_w).astype(self.dtype)
        rs.acc = b.astype(self.dtype, copy=False)
        return rs

    def _log_sum(self, xp, value) -> LogSumExp:
        out = LogSumExp(xp, value.shape[0], self.dtype)
        out.m = value
        out.s = xp.ones(value.shape[0], dtype=self.dtype)
        return out

    def _bidirectional_nystrom(self, xp, xa, groups):
        """Both sides of Algorithm 2 through the same Nystrom kernel, dense over N x m (float64).

        Positives: the cached summaries.  Negatives: the queries (of the same
        class), summarised on the same landmarks every call,
        ``W^{-1} k(U, X) [X, 1]``, with each query's self term
        ``k(x_i, U) diag(c^{-1/2}) W^{-1} k(U, x_i)`` removed.  Column sums are
        taken at the landmarks for both sides.  Attraction and repulsion are
        then one functional of the data and of the generated samples, so where
        the two distributions agree the field vanishes (with exact repulsion
        the Nystrom error of the attraction alone does not cancel).

        Returns per temperature ``(b, log_w, log_r)`` for each side (cache-centred,
        as in :meth:`_bidirectional_attraction`), the attraction fallback counts
        and per temperature the rows (or None) whose negative sums failed.
        """
        dev = self._on(self._placement_for(xp, xa))
        n, d = xa.shape
        nt = len(self.temperatures)
        f64 = xp.float64
        new = lambda: (xp.empty((n, d), dtype=f64), xp.empty(n, dtype=f64), xp.empty(n, dtype=f64))  # noqa: E731
        pos_out, neg_out = [new() for _ in range(nt)], [new() for _ in range(nt)]
        fallback, bad_rows = [0] * nt, [[] for _ in range(nt)]
        centre = dev["centre"].astype(f64)
        for si, rows in [(None, None)] if groups is None else groups:
            shards, xs, idx = self._group(xp, xa, si, rows)
            uc = xp.concatenate([dev["uc"][i] for i in shards]).astype(f64)
            mass = xp.concatenate([dev["mass"][i] for i in shards]).astype(f64)
            xc = xs.astype(f64) - centre
            ones = xp.ones((xc.shape[0], 1), dtype=f64)
            xc1 = xp.concatenate([xc, ones], axis=1)
            dist = sqdist(xc, uc)
            if self.kernel == "laplace":
                dist = xp.sqrt(dist, out=dist)
            for k in range(nt):
                winv = self._winv(xp, dev, shards, k)
                folded = self._per_device(dev, ("folded64", tuple(shards), k), lambda: xp.asarray(
                    np.concatenate([self.shards[i].folded(k) for i in shards])))  # A [G | t | |At|], float64
                L = dist * -logit_coef(self.kernel, self.taus[k])
                top_row = L.max(axis=1)
                K = xp.exp(L - top_row[:, None])  # k(x_i, U) / exp(top_row_i)
                lc = _logsumexp(xp, L, 0)  # log c_u
                e = L - 0.5 * lc[None, :]
                shift = e.max(axis=1)
                E = xp.exp(e - shift[:, None])  # k_iu c_u^{-1/2} / exp(shift_i)
                # positives: E [A G | A t], and plain row sums K A t
                num, den, den_abs = E @ folded[:, :d], E @ folded[:, d], E @ folded[:, d + 1]
                rsum, rsum_abs = K @ folded[:, d], K @ folded[:, d + 1]
                bad = ~(den > self.den_floor * den_abs) | ~(rsum > self.den_floor * rsum_abs)
                if bool(bad.any()):  # the landmarks stand for the data, mass n / m each
                    fallback[k] += int(bad.sum())
                    num[bad] = E[bad] @ (uc * mass[:, None])
                    den[bad] = E[bad] @ mass
                    rsum[bad] = K[bad] @ mass
                # negatives: W^{-1} k(U, X) [X, 1] (scaled by exp(-top)), self terms removed
                top = float(top_row.max())
                g = xp.exp(top_row - top)  # exp(top_row_k - top)
                fneg = winv @ (K.T @ (xc1 * g[:, None]))  # m x (D + 1)
                q = K @ winv  # row i: W^{-1} k(U, x_i) / exp(top_row_i)
                self_w = g * (E * q).sum(axis=1)  # self term of the weighted sums, units exp(shift_i + top)
                self_k = g * (K * q).sum(axis=1)  # k~(x_i, x_i), units exp(top_row_i + top)
                nnum = E @ fneg[:, :d] - self_w[:, None] * xc
                nden = E @ fneg[:, d] - self_w
                nden_abs = xp.abs(E) @ xp.abs(fneg[:, d]) + xp.abs(self_w)
                nr = K @ fneg[:, d] - self_k
                nr_abs = K @ xp.abs(fneg[:, d]) + xp.abs(self_k)
                nbad = ~(nden > self.den_floor * nden_abs) | ~(nr > self.den_floor * nr_abs)
                with np.errstate(divide="ignore", invalid="ignore"):
                    pos = (num / den[:, None], shift + xp.log(den), top_row + xp.log(rsum))
                    neg = (nnum / xp.where(nbad, 1.0, nden)[:, None], shift + top + xp.log(xp.where(nbad, 1.0, nden)),
                           top_row + top + xp.log(xp.where(nbad, 1.0, nr)))
                for out, part in ((pos_out[k], pos), (neg_out[k], neg)):
                    for o, p in zip(out, part):
                        o[idx] = p
                if bool(nbad.any()):
                    bad_rows[k].append(xp.nonzero(nbad)[0] if si is None else idx[xp.nonzero(nbad)[0]])
        bad = [xp.concatenate(r) if r else None for r in bad_rows]
        return pos_out, neg_out, fallback, bad

    def _bidirectional_corrected(self, xp, xa, groups, ys, sample_rows):
        """The positives' side like :meth:`_bidirectional_attraction`, with the Nystrom sums corrected
        by the residual of a uniform sample of the data (see ``pos_sample`` in :meth:`field`).

        The residual's sums regroup into cheap pieces: the sample's own Nystrom
        summaries, ``(n / B) W^{-1} k(U, Y_s) [Y_s, 1]`` (m x (D+1), float64), are
        subtracted from the cached ones, and its exact terms
        ``(n / B) k(x, y) c_y^{-1/2} [y, 1]`` (an N x B block, exact column sums
        over the queries) are added: per call O(N (m + B) D + m B D + m^2 D).
        Rows whose corrected sums are not positive keep the Nystrom values
        (counted as fallback rows).
        """
        dev = self._on(self._placement_for(xp, xa))
        n, d = xa.shape
        nt = len(self.temperatures)
        dt, f64 = self.dtype, xp.float64
        out = [(xp.empty((n, d), dtype=dt), xp.empty(n, dtype=f64), xp.empty(n, dtype=f64)) for _ in range(nt)]
        fallback = [0] * nt
        centre = dev["centre"]
        ysc = ys - centre
        dist = (lambda a, b: xp.sqrt(sqdist(a, b))) if self.kernel == "laplace" else sqdist  # noqa: E731
        for si, rows in [(None, None)] if groups is None else groups:
            shards, xs, idx = self._group(xp, xa, si, rows)
            xc = xs - centre
            uc = xp.concatenate([dev["uc"][i] for i in shards])
            offsets = np.concatenate([[0], np.cumsum([self.shards[i].m for i in shards])])
            # the sample, split by shard: (landmark slice, sample rows, shard's data count)
            parts = []
            for j, i in enumerate(shards):
                key = None if self.classes == [None] else i
                mine = sample_rows.get(key)
                if mine is not None and len(mine):
                    parts.append((slice(int(offsets[j]), int(offsets[j + 1])), xp.asarray(mine), self.shards[i].n))
            du = dist(xc, uc)  # N x m
            samples = [(sl, ysc[mine], count / int(mine.shape[0])) for sl, mine, count in parts]
            dys = [dist(xc, yb) for _, yb, _ in samples]  # N x B_j
            duys = [dist(uc[sl], yb) for sl, yb, _ in samples]  # m_j x B_j
            for k in range(nt):
                coef = logit_coef(self.kernel, self.taus[k])
                winv = self._winv(xp, dev, shards, k)
                folded = xp.concatenate([dev["folded"][i][k] for i in shards])[:, :d + 1]  # A [G | t]
                # k_iu c_u^{-1/2} = exp(e_iu) and k_iu = exp(e_iu) c_u^{1/2}: column sums over the queries
                Lu = du * -coef
                half = 0.5 * _logsumexp(xp, Lu, 0)
                e_u = Lu - half.astype(dt)[None, :]
                shift = xp.maximum(e_u.max(axis=1), Lu.max(axis=1))  # every term below is <= 1 in its units
                halves, e_y = [], []
                for dy in dys:
                    L = dy * -coef
                    halves.append(0.5 * _logsumexp(xp, L, 0))  # the sample points' exact column sums
                    e_y.append(L - halves[-1].astype(dt)[None, :])
                    shift = xp.maximum(shift, xp.maximum(e_y[-1].max(axis=1), L.max(axis=1)))
                # the sample's Nystrom summaries, subtracted from the cached ones (float64, m x (D+1))
                corrected = folded.astype(f64)
                for (sl, yb, scale), duy in zip(samples, duys):
                    # the sums k(U, Y_s) [Y_s, 1] in the working dtype, like the cached ones (_accumulate)
                    kuy = xp.exp(duy * -coef)
                    yb1 = xp.concatenate([yb, xp.ones((yb.shape[0], 1), dtype=dt)], axis=1)
                    corrected[sl] -= scale * (winv[sl, sl] @ (kuy @ yb1).astype(f64))
                E = xp.exp(e_u - shift[:, None])  # units exp(shift_i)
                mats = corrected.astype(dt)
                pr = E @ mats  # [acc | s_w]
                root_c = xp.exp(half).astype(dt)  # c_u^{1/2}
                r = E @ (mats[:, d] * root_c)  # plain row sums k_i. W^{-1} t
                for (sl, yb, scale), h, e in zip(samples, halves, e_y):
                    ay = xp.exp(e - shift[:, None])
                    pr[:, :d] += scale * (ay @ yb)
                    pr[:, d] += scale * ay.sum(axis=1)
                    r += scale * (ay @ xp.exp(h).astype(dt))
                bad = ~(pr[:, d] > 0) | ~(r > 0)
                if samples and bool(bad.any()):  # the sample's estimate went negative there: Nystrom alone
                    fallback[k] += int(bad.sum())
                    pr[bad] = E[bad] @ folded
                    r[bad] = E[bad] @ (folded[:, d] * root_c)
                s_w = pr[:, d]
                has = (s_w > 0) & (r > 0)  # False only without any data
                safe_s = xp.where(has, s_w, 1.0)
                b = pr[:, :d] / safe_s[:, None]
                shift64 = shift.astype(f64)
                log_w = xp.where(has, shift64 + xp.log(safe_s.astype(f64)), -xp.inf)
                log_r = xp.where(has, shift64 + xp.log(xp.where(has, r, 1.0).astype(f64)), -xp.inf)
                for o, p in zip(out[k], (b, log_w, log_r)):
                    o[idx] = p
        return out, fallback

    def _winv(self, xp, dev, shards, k):
        """``W^{-1} = A A`` of the given shards (block diagonal), float64, made once per device."""
        return self._per_device(dev, ("winv", tuple(shards), k), lambda: _block_diag(
            xp, [self.shards[i].factors[k] @ self.shards[i].factors[k] for i in shards]))

    @staticmethod
    def _per_device(dev: dict, key, make):
        """``dev[key]``, made by ``make()`` on first use (the device cache is cleared when summaries change)."""
        if key not in dev:
            dev[key] = make()
        return dev[key]

    def _group(self, xp, xa, si, rows):
        """One query group of a dense path: ``(shard indices, its queries, where its rows go)``; all
        shards and all queries (``idx`` a full slice) for ``si`` None."""
        if si is None:
            return list(range(len(self.shards))), xa, slice(None)
        idx = xp.asarray(rows)
        return [si], xa[idx], idx

    def _negatives_sweeper(self, xp, xa, a, include_self, neg_weight, check_finite, query_labels=None,
                           bidirectional=False, ops=None, precision="float32") -> ExactSums:
        """The exact sweep over the negatives (the other queries and/or explicit ones)."""
        n, d = xa.shape
        targets = []
        if include_self:
            targets.append(Targets(xa, True, is_queries=True, labels=query_labels))
        if a.get("neg") is not None:
            na = _checks.float_matrix(a["neg"], "neg", self.dtype, dim=d, check_finite=check_finite)
            logw = None
            if neg_weight is not None:
                logw = _weights(xp, a["neg_weight"] if "neg_weight" in a else neg_weight, na.shape[0],
                                self.dtype, check_finite)
            targets.append(Targets(na, True, log_weight=logw))
        coefs = [logit_coef(self.kernel, t) for t in self.taus]
        sweeper = ExactSums(xp, xa, targets, log_kernel_scales=coefs, kernel=self.kernel,
                            bidirectional=bidirectional, budget=self.memory_budget,
                            tile_cap=tile_cap(device_of(xa)), sides=(1,), query_labels=query_labels)
        sweeper.ops, sweeper.precision = ops, precision
        return sweeper

    def _exact_repulsion(self, xp, xa, a, include_self, neg_weight, centre, check_finite, query_labels=None,
                         ops=None, precision="float32"):
        """Row-normalised barycentre of the negatives per temperature, centred on ``centre``.

        With ``query_labels``, a query is repelled only by the queries of its own class
        (explicit negatives, if any, by all)."""
        sweeper = self._negatives_sweeper(xp, xa, a, include_self, neg_weight, check_finite, query_labels,
                                          ops=ops, precision=precision)
        sums, _ = sweeper.sweep()
        shift = sweeper.mu - centre  # sums are centred on the queries' mean
        out = []
        for k in range(len(self.temperatures)):
            neg = sums[k][1]
            has = neg.s > 0
            b = neg.acc
            b /= xp.where(has, neg.s, 1.0)[:, None]
            if not bool(has.all()):  # no negative mass: b- := x_i (pure mean shift)
                b[~has] = sweeper.xc[~has]
            b += shift
            out.append(b)
        return out

    def _nystrom_repulsion(self, xp, xa, centre):
        """Barycentre of the other queries from their own Nystrom summaries (float64), self removed."""
        dev = self._on(self._placement_for(xp, xa))
        n, d = xa.shape
        x64 = xa.astype(xp.float64)
        xc64 = x64 - centre.astype(xp.float64)
        uc64 = dev["uc_all"].astype(xp.float64)
        uu64 = sq_norms(uc64)
        out, bad_total = [], 0
        factors = [_block_diag(xp, [s.factors[k] for s in self.shards]) for k in range(len(self.temperatures))]
        phis, _ = kernel_products(xp, x64, uc64, uu64, centre.astype(xp.float64), factors, self.taus, self.kernel,
                                  budget=self.memory_budget, tile_entries=tile_cap(device_of(xa)))
        need_exact = []
        for k, phi in enumerate(phis):
            t = phi.sum(axis=0)
            g = phi.T @ xc64
            self_k = (phi * phi).sum(axis=1)
            num = phi @ g - self_k[:, None] * xc64
            den = phi @ t - self_k
            bad = ~(den > self.den_floor * xp.maximum(self_k, 1e-300))
            nbad = int(bad.sum())
            b = (num / xp.where(bad, 1.0, den)[:, None]).astype(self.dtype)
            if nbad:
                bad_total += nbad
                need_exact.append((k, bad))
            out.append(b)
        if need_exact:
            exact = self._exact_repulsion(xp, xa, {}, True, None, centre, False)
            for k, bad in need_exact:
                out[k][bad] = exact[k][bad]
        return out, bad_total

    # -- diagnostics -------------------------------------------------------------------
    def diagnostics(self, x, pos=None, *, labels=None, backend=None) -> dict:
        """Fidelity of the cache at probe points ``x`` (e.g. the current generated batch).

        Returns a JSON-ready dict: per temperature the relative error of the
        projected attraction against the exact row-normalised barycentre over
        ``pos`` (when given), rows that took the fallback, the distance from
        each probe to its nearest landmark (p50/p95/max, in units of
        ``S * sqrt(D)`` when scaled), and each shard's condition numbers and
        effective ranks.
        """
        placement, xp, xa, a = self._prepare(x, {"pos": pos}, backend, True)
        with device_context(placement):
            groups, _ = self._class_rows(labels, xa.shape[0])
            bs, fallback = self._attraction(xp, xa, groups)
            dev = self._on(placement)
            xc = xa - dev["centre"]
            _, d2 = nearest(xp, xc, sq_norms(xc), dev["uc_all"], budget=self.memory_budget, tt=dev["uu_all"])
            unit = 1.0 if self.feature_scale is None else self.feature_scale * math.sqrt(self.dim)
            dist = np.sqrt(np.maximum(_host(d2).astype(np.float64), 0.0)) / unit
            report = {
                "temperatures": list(self.temperatures),
                "n_landmarks": self.n_landmarks,
                "n_samples": self.n_samples,
                "attraction_fallback_rows": fallback,
                "nearest_landmark_distance": {"p50": float(np.percentile(dist, 50)),
                                              "p95": float(np.percentile(dist, 95)), "max": float(dist.max())},
                "shards": [{"label": s.label, "m": s.m, "n": s.n,
                            "condition_number": [sp["condition_number"] for sp in s.spectra],
                            "effective_rank": [sp["effective_rank"] for sp in s.spectra],
                            "n_clamped": [sp["n_clamped"] for sp in s.spectra],
                            "eigenvalue_range": [[sp.get("eigenvalue_min"), sp.get("eigenvalue_max")]
                                                 for sp in s.spectra]} for s in self.shards],
            }
            if a.get("pos") is not None:
                pa = _checks.float_matrix(a["pos"], "pos", self.dtype, dim=self.dim)
                coefs = [logit_coef(self.kernel, t) for t in self.taus]
                errs = []
                if groups is None:
                    # relative error of the attraction displacement b+(x) - x (translation invariant)
                    exact = _exact_barycentres(xp, xa, pa, coefs, self.kernel, self.memory_budget)
                    mu = xa.mean(axis=0)
                    for k in range(len(self.temperatures)):
                        ex = exact[k] + mu
                        errs.append(float(xp.linalg.norm(bs[k] + dev["centre"] - ex))
                                    / max(float(xp.linalg.norm(ex - xa)), 1e-300))
                report["attraction_relative_error"] = errs if errs else None
            return report

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

    def set_summary_vector(self, flat) -> "ProjectedField":
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
    def merge(self, *others: "ProjectedField") -> "ProjectedField":
        """Summaries of disjoint data shards built on the same landmarks, added: a new cache."""
        return merge(self, *others)

    def save(self, path) -> None:
        """Write the cache to an HDF5 file, atomically (temp file + rename)."""
        from ._cache import save

        save(self, path)

    @classmethod
    def load(cls, path, *, kernel: str | None = None, temperatures=None, dim: int | None = None,
             feature_scale=None, backend=None, memory_budget=None) -> "ProjectedField":
        """Read a cache written by :meth:`save`, verifying format, checksum and any expectations given."""
        from ._cache import load

        return load(cls, path, kernel=kernel, temperatures=temperatures, dim=dim, feature_scale=feature_scale,
                    memory_budget=memory_budget)


def merge(first: ProjectedField, *others: ProjectedField) -> ProjectedField:
    """Add the summaries of caches built with the same kernel, temperatures, scale and landmarks."""
    out = ProjectedField(kernel=first.kernel, temperatures=first.temperatures, ridge=first.ridge,
                         eig_clamp=first.eig_clamp, feature_scale=first.feature_scale, dim=first.dim,
                         centre=first.centre, shards=[_copy_shard(s) for s in first.shards],
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


def _distinct_rows(u: np.ndarray) -> np.ndarray:
    """The rows of ``u`` without exact repeats, in their first-seen order."""
    _, first = np.unique(u, axis=0, return_index=True)
    return u[np.sort(first)]


def _host_labels(labels, n: int, what: str) -> np.ndarray:
    """Class labels from any array type as a checked host int64 array of shape (n,)."""
    return _checks.class_labels(_host(place({"labels": labels}, "numpy")[1]["labels"]), n, "labels", what)


def _copy_shard(s: Shard) -> Shard:
    return Shard(s.label, s.landmarks.copy(), [f.copy() for f in s.factors], [t.copy() for t in s.t],
                 [g.copy() for g in s.G], s.n, [dict(sp) for sp in s.spectra])


def _factor(u: np.ndarray, taus, kernel: str, ridge: float, eig_clamp: float, dtype):
    """Per temperature ``A = (K_UU + ridge I)^{-1/2}`` (host float64) and spectrum summaries;
    warns when a factor is too ill-conditioned for the working ``dtype``."""
    d2 = sqdist(u, u)
    factors, spectra = [], []
    for tau in taus:
        gram = np.exp(log_kernel_from_sqdist(d2.copy(), tau, kernel))
        a, sp = inverse_sqrt(np, gram, ridge, eig_clamp)
        warn_if_ill_conditioned(sp.condition_number, dtype, ridge, f"ProjectedField (tau={tau:.4g})", stacklevel=4)
        factors.append(a)
        spectra.append({"condition_number": sp.condition_number, "effective_rank": sp.effective_rank,
                        "n_clamped": sp.n_clamped, "eigenvalue_min": float(sp.eigenvalues.min()),
                        "eigenvalue_max": float(sp.eigenvalues.max())})
    return factors, spectra


def _logsumexp(xp, a, axis: int):
    top = a.max(axis=axis, keepdims=True)
    return (top + xp.log(xp.exp(a - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def _block_diag(xp, blocks):
    size = sum(b.shape[0] for b in blocks)
    out = np.zeros((size, size))
    i = 0
    for b in blocks:
        out[i:i + b.shape[0], i:i + b.shape[0]] = b
        i += b.shape[0]
    return xp.asarray(out)


def _exact_barycentres(xp, x, pos, coefs, kernel, budget):
    """Exact row-normalised barycentres of ``pos`` per temperature, centred on x's mean."""
    sweeper = ExactSums(xp, x, [Targets(pos, False)], log_kernel_scales=coefs, kernel=kernel,
                        bidirectional=False, budget=budget, tile_cap=tile_cap(device_of(x)), sides=(0,))
    sums, _ = sweeper.sweep()
    return [s[0].acc / s[0].s[:, None] for s in sums]


class RowSource:
    """Rows of a data set read in chunks: an in-memory array (any backend), a memmap or an HDF5 dataset."""

    def __init__(self, data, name: str, backend=None):
        self.name = name
        mod = type(data).__module__.split(".")[0]
        if mod == "h5py" or (isinstance(data, np.memmap)):
            self.data = data
            self.in_memory = False
            self.placement = place({}, backend)[0]
            if self.placement.device.kind == "cpu" and backend not in (None, "auto", "numpy"):
                pass
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
        _checks.finite(block, self.name)
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
        import hashlib

        idx = np.unique(np.linspace(0, self.n - 1, num=min(self.n, 64)).astype(np.int64))
        rows = self.data[idx] if not self.in_memory else self.data[self.placement.xp.asarray(idx)]
        rows = np.ascontiguousarray(_host(rows) if self.in_memory else np.asarray(rows))
        return {"shape": [self.n, self.d], "dtype": str(self.dtype),
                "sampled_rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()}
