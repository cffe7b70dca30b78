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

import numpy as np

from . import checks
from .attraction import row_attraction
from .backend import device_context, place, to_host
from .cuda_ops import PRECISIONS
from .engine import resolve as resolve_engine
from .diagnostics import fidelity
from .estimators import ESTIMATORS, FieldCall
from .field import DEFAULT_TEMPERATURES, NORMALIZATIONS, resolve_negatives
from .kernels import check_kernel
from .memory import parse_budget
from .landmarks import METHODS, sample_mean_distance, select
from .repulsion import Negatives
from .summaries import (DEFAULT_DEN_FLOOR, RowSource, Shard, Summaries, distinct_rows, factor_landmarks, merge,
                        host_labels)

REPULSIONS = ("exact", "nystrom")


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
        temps = checks.temperatures(temperatures)
        kernel = check_kernel(kernel)
        method = checks.choice(method, "method", METHODS)
        ridge = checks.non_negative(ridge, "ridge")
        eig_clamp = checks.positive_float(eig_clamp, "eig_clamp")
        den_floor = checks.positive_float(den_floor, "den_floor")
        budget = parse_budget(memory_budget)
        rows = RowSource(pos, "pos", backend)
        placement, xp = rows.placement, rows.placement.xp
        wdtype = np.dtype(dtype) if dtype is not None else (np.dtype(np.float64) if rows.dtype == np.float64 else np.dtype(np.float32))
        n, d = rows.n, rows.d
        lab = None if labels is None else host_labels(labels, n, "one per row of pos")
        rng = np.random.default_rng(seed)
        with device_context(placement):
            # feature scale, fixed now
            if isinstance(feature_scale, str):
                if feature_scale != "auto":
                    raise ValueError(f"feature_scale={feature_scale!r} is not valid; use 'auto', a number > 0, or None")
                sample = rows.take(np.sort(rng.choice(n, size=min(n, 2048), replace=False)), wdtype)
                scale = sample_mean_distance(xp, sample, rng, sample=sample.shape[0]) / math.sqrt(d) if n > 1 else 1.0
            elif feature_scale is None:
                scale = None
            else:
                scale = checks.positive_float(feature_scale, "feature_scale")
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
                idx = to_host(select(pool_y, m, method=method, labels=pool_lab, seed=seed, kernel=kernel,
                                   tau=max(taus), memory_budget=budget))
                points = to_host(pool_y[xp.asarray(idx)]).astype(np.float64)
                # identical points (e.g. blank corners of images) repeat a landmark: keep one of each
                per_shard = [distinct_rows(points[i * m:(i + 1) * m]) for i in range(len(groups))]
            else:
                u = to_host(place({"landmarks": landmarks}, "numpy")[1]["landmarks"])
                u = checks.float_matrix(u, "landmarks", np.float64, dim=d)
                distinct = distinct_rows(u)
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
                    shared[key] = factor_landmarks(u, taus, kernel, ridge, eig_clamp, wdtype)
                factors, spectra = shared[key]
                shards.append(Shard(label, u, factors, [np.zeros(u.shape[0]) for _ in temps],
                                    [np.zeros((u.shape[0], d)) for _ in temps], 0, spectra))
            pf = cls(kernel=kernel, temperatures=temps, ridge=ridge, eig_clamp=eig_clamp, feature_scale=scale,
                     dim=d, centre=centre, shards=shards, fingerprint=rows.fingerprint(), dtype=wdtype,
                     den_floor=den_floor, placement=placement, memory_budget=budget)
            if summarize:
                pf.accumulate(rows, lab, chunk_size=chunk_size, progress=progress)
        return pf

    # -- evaluation ------------------------------------------------------------------
    def place_queries(self, x, extra: dict, backend, check_finite: bool):
        """The queries ``x`` (and the ``extra`` arrays) placed for a call: ``(placement, xp, x, arrays)``."""
        placement, a = place({"x": x, **extra}, backend)
        xp = placement.xp
        xa = checks.float_matrix(a["x"], "x", self.dtype, check_finite=check_finite)
        if xa.shape[1] != self.dim:
            raise ValueError(f"x has {xa.shape[1]} features per row but this cache was built for D={self.dim}")
        return placement, xp, xa, a

    def _engine(self, placement, engine, precision):
        """The fused engine's ops for this call, or None (composed); see :func:`dxfield.engine.resolve`."""
        return resolve_engine(engine, precision, placement, self.dtype, len(self.temperatures),
                              precisions=PRECISIONS)

    def attraction(self, x, *, labels=None, backend=None, check_finite: bool = True, engine=None,
                   precision: str = "float32"):
        """The barycentres ``b+(x)`` per temperature: array (T, N, D) in raw feature units.

        With ``labels``, each query uses its own class's summaries; otherwise all
        shards combine block-diagonally.  ``engine`` and ``precision`` as in
        :meth:`field`.
        """
        placement, xp, xa, _ = self.place_queries(x, {}, backend, check_finite)
        ops = self._engine(placement, engine, precision)
        with device_context(placement):
            groups, _ = self.class_groups(labels, xa.shape[0])
            bs, fallback = row_attraction(self, xp, xa, groups, ops, precision)
            self.last_stats = {"attraction_fallback_rows": fallback}
            out = xp.stack(bs) + self.on_device(placement)["centre"]
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
            ``"row"``: ``V = b+ - b-`` (docs/design.md section 2.2), what the summaries give
            directly.  ``"bidirectional"``: Algorithm 2 (docs/design.md section 2.1) with the
            WHOLE summarised data as positives -- the positives' column sums
            over the queries are taken at the landmarks (see
            :func:`dxfield.attraction.bidirectional_attraction`), the negatives' exactly.  Data
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
        normalization = checks.choice(normalization, "normalization", NORMALIZATIONS)
        repulsion = checks.choice(repulsion, "repulsion", REPULSIONS)
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
        placement, xp, xa, a = self.place_queries(x, extra, backend, check_finite)
        ops = self._engine(placement, engine, precision)
        with device_context(placement):
            groups, lab = self.class_groups(labels, xa.shape[0])
            sample = None
            if pos_sample is not None:
                ys = checks.float_matrix(a["pos_sample"], "pos_sample", self.dtype, dim=self.dim,
                                         check_finite=check_finite)
                sample = (ys, self.sample_groups(pos_sample_labels, ys.shape[0], groups))
            negatives = Negatives(include_self, a.get("neg"), a.get("neg_weight", neg_weight), check_finite)
            call = FieldCall(xp=xp, xa=xa, groups=groups, labels=lab, negatives=negatives,
                             centre=self.on_device(placement)["centre"], ops=ops, precision=precision,
                             drift_norm=drift_norm, sample=sample)
            estimate = ESTIMATORS[normalization, "corrected" if sample is not None else repulsion]
            total, fallback, rep_fallback = estimate(self, call)
            if self.feature_scale is not None and not drift_norm:
                total /= self.feature_scale
            self.last_stats = {"attraction_fallback_rows": fallback, "repulsion_fallback_rows": rep_fallback}
            return placement.to_origin(total)

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



# Names callers import from here: the summaries' building blocks live in dxfield.summaries.
__all__ = ["ProjectedField", "REPULSIONS", "DEFAULT_DEN_FLOOR", "RowSource", "Shard", "merge"]
