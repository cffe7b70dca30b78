"""The projected drifting field (DriftXpress): attraction from cached Nystrom summaries.

:class:`ProjectedField` is the summaries of the whole data set on Nystrom
landmarks (:class:`dxfield.summaries.Summaries`: build once, save, load,
merge) plus the field evaluated from them every step.  ``field()`` picks one
estimator by normalisation and repulsion from :data:`dxfield.estimators.ESTIMATORS`
(row-normalised or bidirectional attraction, exact or Nystrom repulsion, the
residual correction with a real sample); the estimators live in
:mod:`dxfield.attraction` and :mod:`dxfield.repulsion`.  Math, cost and limits:
docs/design.md sections 2.4-2.8 (projected field, cost model, bidirectional
form, correction, Nystrom repulsion) and 3.5 (numerics of the Nystrom sums).

The feature scale ``S`` is fixed when the cache is built and stored with it:
kernels use ``tau * S * sqrt(D)`` in raw units and the field is returned in
units of ``S``, like :func:`dxfield.drift_field`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np

from . import checks
from .attraction import row_attraction, sample_maps
from .backend import device_context, place, to_host
from .cuda_ops import PRECISIONS
from .engine import resolve as resolve_engine
from .diagnostics import fidelity
from .estimators import ESTIMATORS, FieldCall
from .field import DEFAULT_TEMPERATURES, NORMALIZATIONS, resolve_negatives
from .inputs import class_counts, expand, finite_part, rows_of, some_rows, warn_zero_drift
from .kernels import check_kernel, logit_coefs
from .memory import SLACK, parse_budget
from .options import documented
from .landmarks import METHODS, mean_distance, select
from .repulsion import Negatives
from .targets import check_weight_shape
from .summaries import (DEFAULT_DEN_FLOOR, RowSource, Shard, Summaries, distinct_rows, factor_landmarks, merge,
                        host_labels)

REPULSIONS = ("exact", "nystrom")


POOL_PER_LANDMARK = 8  # rows of the selection pool per landmark to choose (data not in memory)

class ProjectedField(Summaries):
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


    # -- building ------------------------------------------------------------------
    @classmethod
    @documented("temperatures", "kernel", "nystrom.regularisation", "memory_budget", "backend")
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
        landmarks : int or array (m, D)
            Landmarks per class (or in all) to select with ``method``, or the
            landmark points themselves (shared by every class shard).
        method : {"uniform", "kmeans", "kcenter", "rls"}
            Landmark selection (see :mod:`dxfield.landmarks`); for data that is
            not in memory it runs on all rows if they fit ``memory_budget``, else
            on a uniform pool of 8 rows per landmark to choose,
            ``selection_pool`` at most (:func:`selection_pool_rows`).
        labels : array (P,) of ints, optional
            Build one shard per class (class-conditional fields).
        feature_scale : "auto", float or None
            "auto": ``S = mean pairwise distance / sqrt(D)`` over up to 2048
            sampled positives, fixed here and stored with the cache.
        chunk_size, progress : rows per streamed chunk (default: from the
            budget); a progress bar on stderr while streaming.
        summarize : bool
            False: choose the landmarks, feature scale and factors (deterministic
            given ``seed``) but leave the summaries empty; add them with
            :meth:`add_summaries`, e.g. a subset of the rows per process, then
            sum :meth:`summary_vector` over the processes.
        {options}
        """
        temps = checks.temperatures(temperatures)
        kernel = check_kernel(kernel)
        method = checks.choice(method, "method", METHODS)
        ridge = checks.non_negative(ridge, "ridge")
        eig_clamp = checks.positive_float(eig_clamp, "eig_clamp")
        den_floor = checks.positive_float(den_floor, "den_floor")
        budget = parse_budget(memory_budget)
        rows = RowSource(pos, "pos", backend)
        wdtype = np.dtype(dtype) if dtype is not None else (np.dtype(np.float64) if rows.dtype == np.float64 else np.dtype(np.float32))
        lab = None if labels is None else host_labels(labels, rows.n, "one per row of pos")
        rng = np.random.default_rng(seed)
        with device_context(rows.placement):
            scale = _measured_scale(rows, checks.feature_scale(feature_scale), rng, wdtype, budget)
            unit = 1.0 if scale is None else scale * math.sqrt(rows.d)
            taus = [t * unit for t in temps]
            logit_coefs(kernel, taus, wdtype)  # a kernel too short for the dtype fails here, not as NaN later
            groups = [None] if lab is None else [int(c) for c in np.unique(lab)]
            if isinstance(landmarks, (int, np.integer)) and not isinstance(landmarks, bool):
                per_shard = _selected_landmarks(rows, int(landmarks), len(groups), lab, rng, wdtype, method=method,
                                                seed=seed, kernel=kernel, tau=max(taus), budget=budget,
                                                selection_pool=selection_pool)
            else:
                per_shard = [_given_landmarks(landmarks, rows.d, wdtype)] * len(groups)
            shards = _empty_shards(groups, per_shard, taus, kernel, ridge, eig_clamp, wdtype, rows.d)
            pf = cls(kernel=kernel, temperatures=temps, ridge=ridge, eig_clamp=eig_clamp, feature_scale=scale,
                     dim=rows.d, centre=np.mean(np.concatenate(per_shard), axis=0), shards=shards,
                     fingerprint=rows.fingerprint(), dtype=wdtype, den_floor=den_floor,
                     placement=rows.placement, memory_budget=budget)
            if summarize:
                pf.accumulate(rows, lab, chunk_size=chunk_size, progress=progress)
        return pf

    # -- evaluation ------------------------------------------------------------------
    def place_queries(self, x, extra: dict, backend, check_finite: bool) -> "Queries":
        """The queries ``x`` (and the ``extra`` arrays) placed for a call, checked against this cache:
        with ``check_finite=False`` only their finite rows (docs/design.md section 3.7)."""
        placement, a = place({"x": x, **extra}, backend)
        with device_context(placement):
            xa, keep, n = _cache_rows(self, a["x"], "x", check_finite)
        return Queries(placement, placement.xp, xa, a, keep, n)

    def check_magnitude(self, name: str, top: float) -> None:
        """Refuse values whose squared distances could overflow this cache's working dtype."""
        limit = checks.largest_magnitude(self.dtype, self.dim)
        if top > limit:
            raise checks.magnitude_error(name, top, limit, f"by a {self.dtype.name} cache of D={self.dim}",
                                         self.dtype)

    def query_classes(self, labels, q: "Queries"):
        """``(groups, host labels)`` of the finite queries (:meth:`class_groups`); warns when a class
        cache is asked without labels (all classes then attract every query)."""
        lab = None if labels is None else rows_of(host_labels(labels, q.n, "one per query"), q.keep)
        groups, lab = self.class_groups(lab, q.x.shape[0])
        if groups is None and len(self.shards) > 1:
            warnings.warn(f"x comes without labels but this cache is class-conditional ({len(self.shards)} "
                          "classes): every query is attracted by all classes' summaries combined (the whole data "
                          "set); pass labels for a class-conditional field", ClassesCombinedWarning, stacklevel=3)
        return groups, lab

    def _engine(self, placement, engine, precision):
        """The fused engine's ops for this call, or None (composed); see :func:`dxfield.engine.resolve`."""
        return resolve_engine(engine, precision, placement, self.dtype, len(self.temperatures),
                              precisions=PRECISIONS)

    def attraction(self, x, *, labels=None, backend=None, check_finite: bool = True, engine=None,
                   precision: str = "float32"):
        """The barycentres ``b+(x)`` per temperature: array (T, N, D) in raw feature units.

        With ``labels``, each query uses its own class's summaries; otherwise all
        shards combine block-diagonally (with a :class:`ClassesCombinedWarning`
        on a class cache).  ``engine``, ``precision`` and ``check_finite`` as in
        :meth:`field` (rows left out get NaN).
        """
        q = self.place_queries(x, {}, backend, check_finite)
        xp = q.xp
        ops = self._engine(q.placement, engine, precision)
        with device_context(q.placement):
            groups, _ = self.query_classes(labels, q)
            if q.x.shape[0] == 0:
                out = xp.empty((len(self.temperatures), 0, self.dim), dtype=self.dtype)
            else:
                bs, fallback = row_attraction(self, xp, q.x, groups, ops, precision)
                self.last_stats = {"attraction_fallback_rows": fallback}
                out = xp.stack(bs) + self.on_device(q.placement)["centre"]
            return q.placement.to_origin(expand(xp, out, q.n, q.keep, axis=1))


    @documented("projected.normalization", "projected.repulsion", "projected.pos_sample", "projected.pos_mass",
                "drift_norm", "neg_weight", "include_self", "backend", "field.check_finite", "engine",
                "projected.precision")
    def field(self, x, neg=None, *, labels=None, normalization: str = "row", repulsion: str = "exact",
              drift_norm: bool = True, neg_weight=None, include_self: bool | None = None, backend=None,
              check_finite: bool = True, engine=None, precision: str = "float32", pos_sample=None,
              pos_sample_labels=None, pos_sample_maps=None, neg_labels=None, pos_mass=None):
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
            Without labels a class cache attracts every query by all classes
            combined, with a :class:`ClassesCombinedWarning`.
        neg_labels : array (M,) of ints, optional
            Class of each explicit negative: it repels only the queries of
            that class (needs ``labels``); without them every explicit negative
            repels every query (e.g. guidance's unconditional negatives).
        {options}

        Returns
        -------
        V : (N, D) in units of the stored feature scale, in ``x``'s namespace/device.
        Statistics of the call (fallback rows; with ``pos_mass="balanced"``, ``log_pos_mass``: the log of
        the mass chosen per class, on the call's device) are left in :attr:`last_stats`.
        """
        normalization = checks.choice(normalization, "normalization", NORMALIZATIONS)
        repulsion = checks.choice(repulsion, "repulsion", REPULSIONS)
        include_self, neg_weight = resolve_negatives(neg, neg_weight, include_self)
        if isinstance(pos_mass, str):
            if pos_mass != "balanced":
                raise ValueError(f"pos_mass={pos_mass!r} is not valid: give a mass > 0 or 'balanced'")
        elif pos_mass is not None:
            pos_mass = checks.positive_float(pos_mass, "pos_mass")
        if neg_labels is not None and (neg is None or labels is None):
            raise ValueError("neg_labels labels the explicit negatives by class: pass neg and the queries' labels too")
        if repulsion == "nystrom" and (neg is not None or not include_self):
            raise ValueError("repulsion='nystrom' uses the queries themselves as negatives; "
                             "use repulsion='exact' for explicit negatives")
        if pos_sample is not None and (normalization != "bidirectional" or repulsion != "exact"):
            raise ValueError("pos_sample corrects the bidirectional field with exact repulsion: "
                             "use normalization='bidirectional', repulsion='exact'")
        if pos_sample_maps is not None and pos_sample is None:
            raise ValueError("pos_sample_maps are the maps of pos_sample's rows (sample_maps): pass pos_sample too")
        extra = {"neg": neg, "pos_sample": pos_sample, "pos_sample_maps": pos_sample_maps}
        if neg_weight is not None and not isinstance(neg_weight, float):
            extra["neg_weight"] = neg_weight
        q = self.place_queries(x, extra, backend, check_finite)
        xp, a = q.xp, q.arrays
        ops = self._engine(q.placement, engine, precision)
        with device_context(q.placement):
            groups, lab = self.query_classes(labels, q)
            if q.x.shape[0] == 0:  # no finite query: every row is NaN
                return q.placement.to_origin(expand(xp, xp.empty((0, self.dim), dtype=self.dtype), q.n, q.keep))
            warn_zero_drift(xp, q.x.shape[0], class_counts(np, lab),
                            None if neg is None else a.get("neg_weight", neg_weight),
                            bidirectional=normalization == "bidirectional",
                            self_only=neg is None and repulsion == "exact", include_self=include_self)
            sample = None if pos_sample is None else _checked_sample(self, a["pos_sample"], pos_sample_labels,
                                                                     a["pos_sample_maps"], groups, check_finite)
            call = FieldCall(xp=xp, xa=q.x, groups=groups, labels=lab,
                             negatives=_checked_negatives(self, a, include_self, neg_weight, neg_labels,
                                                          check_finite),
                             centre=self.on_device(q.placement)["centre"], ops=ops, precision=precision,
                             drift_norm=drift_norm, sample=sample, pos_mass=pos_mass)
            estimate = ESTIMATORS[normalization, "corrected" if sample is not None else repulsion]
            total, fallback, rep_fallback = estimate(self, call)
            if self.feature_scale is not None and not drift_norm:
                total /= self.feature_scale
            self.last_stats = {"attraction_fallback_rows": fallback, "repulsion_fallback_rows": rep_fallback,
                               **call.stats}
            return q.placement.to_origin(expand(xp, total, q.n, q.keep))

    def sample_maps(self, y, labels=None, *, backend=None):
        """The Nystrom coefficients ``W^{-1} k(U, y)`` of data rows ``y`` (N x D) on their own class's
        landmarks: (N x T x m) in the working dtype, ``m`` the largest shard's (zero beyond a smaller one).

        Kept for the rows a run draws its correction samples from, they are passed with a sample as
        ``field(pos_sample=y[rows], pos_sample_maps=maps[rows])``: the call then skips the sample's
        landmark distances and ``m x m`` products (docs/design.md section 8.18).  They depend on the
        landmarks and temperatures only, not on the summaries.  Memory: ``N T m`` entries.
        ``labels``: the rows' classes, needed for a class-conditional cache.
        """
        placement, a = place({"y": y}, backend)
        with device_context(placement):
            ya, _, n = _cache_rows(self, a["y"], "y", check_finite=True)
            if self.classes == [None]:
                rows = {None: np.arange(n)}
            elif labels is None:
                raise ValueError("labels are needed for the sample maps of a class-conditional cache "
                                 "(one class per row of y)")
            else:
                lab = host_labels(labels, n, "one per row of y")
                known = {sh.label: i for i, sh in enumerate(self.shards)}
                unknown = sorted(set(np.unique(lab).tolist()) - set(known))
                if unknown:
                    raise ValueError(f"labels hold classes this cache has no shard for: {unknown[:5]} "
                                     f"(its classes: {sorted(known)[:10]})")
                rows = {known[c]: np.flatnonzero(lab == c) for c in known}
            centre = self.on_device(placement)["centre"]
            return placement.to_origin(sample_maps(self, placement.xp, ya - centre, rows))

    # -- diagnostics -------------------------------------------------------------------
    def diagnostics(self, x, pos=None, *, labels=None, backend=None) -> dict:
        """Fidelity of the cache at probe points ``x``: see :func:`dxfield.diagnostics.fidelity`."""
        return fidelity(self, x, pos, labels=labels, backend=backend)

    # -- save / load ----------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the cache to an HDF5 file, atomically (temp file + rename)."""
        from .cache import save

        save(self, path)

    @classmethod
    def load(cls, path, *, kernel: str | None = None, temperatures=None, dim: int | None = None,
             feature_scale=None, backend=None, memory_budget=None) -> "ProjectedField":
        """Read a cache written by :meth:`save`, verifying format, checksum and any expectations given."""
        from .cache import load

        return load(cls, path, kernel=kernel, temperatures=temperatures, dim=dim, feature_scale=feature_scale,
                    memory_budget=memory_budget)




class ClassesCombinedWarning(UserWarning):
    """A class-conditional cache was asked without labels: all classes attracted every query."""


class Queries(NamedTuple):
    """The queries of one call, placed and checked (:meth:`ProjectedField.place_queries`)."""

    placement: Any
    xp: Any
    x: Any  # the finite rows of x, working dtype
    arrays: dict  # every array of the call, placed
    keep: Any  # host indices of x's finite rows (None: all)
    n: int  # rows of x as given


def _cache_rows(pf, a, name: str, check_finite: bool):
    """``(rows, keep, n)``: ``a`` checked against the cache (its D, working dtype and largest magnitude),
    only its finite rows with ``check_finite=False`` (their host indices ``keep``, None: all of the ``n``)."""
    rows = checks.float_matrix(a, name, pf.dtype, dim=pf.dim, dim_of="this cache was built for D={dim}",
                               check_finite=False)
    n = rows.shape[0]
    rows, keep, top = finite_part(rows, name, check_finite)
    pf.check_magnitude(name, top)
    return rows, keep, n


def _checked_negatives(pf, a: dict, include_self: bool, neg_weight, neg_labels, check_finite: bool) -> Negatives:
    """The call's negatives: explicit ones checked against the cache, finite rows only (with their weights
    and labels)."""
    w = a.get("neg_weight", neg_weight)
    if a["neg"] is None:
        return Negatives(include_self, None, w, check_finite)
    na, keep, n = _cache_rows(pf, a["neg"], "neg", check_finite)
    weighted = w is not None and not isinstance(w, float)
    if weighted:
        check_weight_shape(w, n)
    lab = None if neg_labels is None else rows_of(host_labels(neg_labels, n, "one per explicit negative (neg_labels)"),
                                                  keep)
    some_rows(na, "neg")
    return Negatives(include_self, na, rows_of(w, keep) if weighted else w, check_finite=False, neg_labels=lab)


def _checked_sample(pf, ys, labels, maps, groups, check_finite: bool):
    """``(rows, rows per shard, their maps or None)`` of ``pos_sample``: checked against the cache, finite
    rows only."""
    ys, keep, n = _cache_rows(pf, ys, "pos_sample", check_finite)
    if labels is not None:
        labels = host_labels(labels, n, "one per row of pos_sample")
    if maps is not None:
        want = (n, len(pf.temperatures), max(s.m for s in pf.shards))
        if getattr(maps, "ndim", 0) != 3 or tuple(maps.shape) != want or maps.dtype.kind != "f":
            raise ValueError(f"pos_sample_maps must be this cache's sample_maps of pos_sample's rows: a float array "
                             f"of shape {want} (rows, temperatures, landmarks of the largest shard), got "
                             f"{getattr(maps, 'dtype', type(maps).__name__)} {tuple(getattr(maps, 'shape', ()))}")
        maps = rows_of(maps.astype(pf.dtype, copy=False), keep)
    some_rows(ys, "pos_sample")
    return ys, pf.sample_groups(rows_of(labels, keep), ys.shape[0], groups), maps


def _measured_scale(rows: RowSource, feature_scale, rng, dtype, budget: int):
    """The cache's feature scale: ``mean distance / sqrt(D)`` over up to 2048 sampled rows for "auto".

    The distances are formed a band of rows at a time within ``budget``; the
    sample itself takes at most half of it, so a budget below ``2 * 2048 * D``
    words measures fewer rows.
    """
    if feature_scale != "auto":
        return feature_scale
    n, row_bytes = rows.n, rows.d * np.dtype(dtype).itemsize
    k = min(n, 2048, max(2, (budget - SLACK) // (2 * row_bytes)))
    sample = rows.take(np.sort(rng.choice(n, size=k, replace=False)), dtype)  # a copy of the rows
    if n < 2:
        return 1.0
    rng.choice(k, size=k, replace=False)  # the order the sample was once drawn in: later draws stay the same
    lo, hi = checks.extent(sample)
    if 0.0 < max(-lo, hi) < checks.smallest_magnitude(dtype):
        raise ValueError(f"pos holds values no larger than {max(-lo, hi):.3g} in magnitude, below the smallest "
                         f"magnitude supported in {np.dtype(dtype).name} ({checks.smallest_magnitude(dtype):.3g}), "
                         "where squared distances underflow: multiply the features by a constant")
    mean = mean_distance(rows.placement.xp, sample, budget=max(1, budget - sample.nbytes))
    return mean / math.sqrt(rows.d)


def selection_pool_rows(n: int, row_bytes: int, m: int, n_shards: int, budget: int, selection_pool: int) -> int:
    """Rows of the pool that landmarks are selected from, for data not in memory: all ``n`` when they fit
    ``budget``, else :data:`POOL_PER_LANDMARK` per landmark to choose, ``selection_pool`` at most.  The
    pool, and so the build's peak memory, is bounded by what is chosen and by the budget, not by the data's
    size (docs/design.md section 2.9)."""
    if n * row_bytes <= budget:
        return int(n)
    return int(min(n, selection_pool, POOL_PER_LANDMARK * m * n_shards))


def _selected_landmarks(rows: RowSource, m: int, n_shards: int, lab, rng, dtype, *, method, seed, kernel, tau,
                        budget, selection_pool):
    """``m`` landmarks per shard chosen by ``method`` (on a uniform pool of rows for data not in memory:
    :func:`selection_pool_rows`)."""
    xp, n = rows.placement.xp, rows.n
    k = selection_pool_rows(n, rows.d * np.dtype(dtype).itemsize, m, n_shards, budget, selection_pool)
    pool = np.arange(n) if rows.in_memory or n <= k else np.sort(rng.choice(n, size=k, replace=False))
    pool_y = rows.take(pool, dtype) if not rows.in_memory else rows.array(dtype)
    pool_lab = None if lab is None else lab[pool]
    idx = to_host(select(pool_y, m, method=method, labels=pool_lab, seed=seed, kernel=kernel, tau=tau,
                         memory_budget=budget))
    points = to_host(pool_y[xp.asarray(idx)]).astype(np.float64)
    # identical points (e.g. blank corners of images) repeat a landmark: keep one of each
    return [distinct_rows(points[i * m:(i + 1) * m]) for i in range(n_shards)]


def _given_landmarks(landmarks, d: int, dtype) -> np.ndarray:
    """The caller's landmark points (float64, host), repeated rows dropped with a warning."""
    u = to_host(place({"landmarks": landmarks}, "numpy")[1]["landmarks"])
    u = checks.float_matrix(u, "landmarks", np.float64, dim=d, dim_of="pos has {dim}")
    top, limit = float(np.abs(u).max()), checks.largest_magnitude(dtype, d)
    if top > limit:
        raise checks.magnitude_error("landmarks", top, limit, f"by a {np.dtype(dtype).name} ProjectedField of D={d}",
                                     dtype)
    distinct = distinct_rows(u)
    if distinct.shape[0] < u.shape[0]:
        warnings.warn(f"landmarks: {u.shape[0] - distinct.shape[0]} duplicate row(s) dropped "
                      f"({distinct.shape[0]} distinct landmarks kept)", stacklevel=3)
    return distinct


def _empty_shards(labels, per_shard, taus, kernel, ridge, eig_clamp, dtype, d: int) -> list:
    """One shard per label on its landmarks, factored (once per distinct landmark set), summaries empty."""
    shards, factored = [], {}
    for label, u in zip(labels, per_shard):
        if id(u) not in factored:
            factored[id(u)] = factor_landmarks(u, taus, kernel, ridge, eig_clamp, dtype)
        factors, spectra = factored[id(u)]
        shards.append(Shard(label, u, factors, [np.zeros(u.shape[0]) for _ in taus],
                            [np.zeros((u.shape[0], d)) for _ in taus], 0, spectra))
    return shards

# Names callers import from here: the summaries' building blocks live in dxfield.summaries.
__all__ = ["ProjectedField", "ClassesCombinedWarning", "REPULSIONS", "DEFAULT_DEN_FLOOR", "RowSource", "Shard", "merge"]
