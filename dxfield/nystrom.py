"""Nystrom feature maps: ``k(x, y) ~ phi(x) . phi(y)`` from m landmarks.

Math (docs/design.md section 2.4).  With landmarks ``U`` (m x D)::

    W = K_UU + ridge * I        (factored in float64 by eigh)
    A = W^{-1/2}                (eigenvalues clamped at eig_clamp * max)
    phi(x) = k(x, U) @ A        (n x m)

so that ``phi(x) . phi(y) = k(x, U) W^{-1} k(U, y)``, the Nystrom approximation
of ``k(x, y)``; with every point a landmark and ``ridge -> 0`` it is exact.
Both kernels have ``k(x, x) = 1``, so ``ridge`` is relative to the kernel's
scale.  The fit records the spectrum, condition number and effective rank
(``sum_i lambda_i / (lambda_i + ridge)``) and warns when the condition number
is large enough to cost digits in the working precision.

Like scikit-learn's ``Nystroem`` but on NumPy or CuPy, with results in the
input's namespace and device, and ``transform`` computed in row blocks.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from . import checks
from .backend import device_context, floating_dtype, place, to_host
from .memory import SLACK, parse_budget, tile_cap
from .sums import LogSumExp
from .kernels import check_kernel, log_kernel_from_sqdist, logit_coef, sq_norms, sqdist, sqdist_tile


class NystromConditioningWarning(UserWarning):
    """The landmark Gram matrix is ill-conditioned for the working precision."""


class Nystrom:
    """Nystrom approximation of a Laplace or Gaussian kernel.

    Parameters
    ----------
    kernel : {"laplace", "gaussian"}
    tau : float > 0
        Kernel length scale (``exp(-d / tau)`` or ``exp(-d^2 / (2 tau^2))``).
    ridge : float >= 0, default 1e-4
        Added to the diagonal of ``K_UU`` (relative: the kernel's diagonal is 1).
    eig_clamp : float > 0, default 1e-8
        Eigenvalues of ``K_UU + ridge I`` below ``eig_clamp * max`` are raised to it.
    memory_budget : int or str, optional
        Extra bytes ``transform`` may use beyond its output (default 64 MiB).
    backend : {"auto", "numpy", "cupy"}, optional

    Attributes (after ``fit``)
    --------------------------
    landmarks_ : array (m, D)
    factor_ : array (m, m)
        ``A = (K_UU + ridge I)^{-1/2}`` in the working dtype.
    eigenvalues_ : numpy array (m,)
        Spectrum of ``K_UU + ridge I`` (float64, ascending, before clamping).
    condition_number_ : float
        ``max / min`` eigenvalue after clamping.
    effective_rank_ : float
        ``sum lambda_i / (lambda_i + ridge)`` over the spectrum of ``K_UU``.
    n_clamped_ : int
        Eigenvalues raised by the clamp.

    Examples
    --------
    >>> import numpy as np, dxfield
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(500, 4))
    >>> ny = dxfield.Nystrom(kernel="gaussian", tau=3.0).fit(x[:100])
    >>> phi = ny.transform(x)                      # (500, 100)
    >>> K = dxfield.kernel_matrix(x, kernel="gaussian", tau=3.0)
    >>> bool(np.abs(phi @ phi.T - K).max() < 0.05)
    True
    """

    def __init__(self, kernel: str = "laplace", tau: float = 1.0, ridge: float = 1e-4,
                 eig_clamp: float = 1e-8, memory_budget=None, backend=None):
        self.kernel = check_kernel(kernel)
        self.tau = checks.positive_float(tau, "tau")
        self.ridge = checks.non_negative(ridge, "ridge")
        self.eig_clamp = checks.positive_float(eig_clamp, "eig_clamp")
        self.memory_budget = parse_budget(memory_budget)
        self.backend = backend

    # -- fit -----------------------------------------------------------------------
    def fit(self, landmarks) -> "Nystrom":
        """Factor the landmark Gram matrix. ``landmarks``: (m, D), distinct points."""
        placement, a = place({"landmarks": landmarks}, self.backend)
        xp = placement.xp
        with device_context(placement):
            dtype = floating_dtype(xp, a["landmarks"])
            u = checks.float_matrix(a["landmarks"], "landmarks", dtype)
            gram = log_kernel_from_sqdist(sqdist(u.astype(xp.float64), u.astype(xp.float64)), self.tau, self.kernel)
            gram = xp.exp(gram, out=gram)
            factor, spectrum = inverse_sqrt(xp, gram, self.ridge, self.eig_clamp)
            self._placement = placement
            self.landmarks_ = u
            self.factor_ = factor.astype(dtype)
            self.eigenvalues_ = spectrum.eigenvalues
            self.condition_number_ = spectrum.condition_number
            self.effective_rank_ = spectrum.effective_rank
            self.n_clamped_ = spectrum.n_clamped
            self._mu = u.mean(axis=0)
            self._uc = u - self._mu
            self._uu = sq_norms(self._uc)
        warn_if_ill_conditioned(self.condition_number_, dtype, self.ridge, "Nystrom", stacklevel=3)
        return self

    @property
    def n_components(self) -> int:
        self._check_fitted()
        return int(self.landmarks_.shape[0])

    def _check_fitted(self) -> None:
        if not hasattr(self, "factor_"):
            raise RuntimeError("this Nystrom map is not fitted yet; call fit(landmarks) first")

    # -- transform -----------------------------------------------------------------
    def transform(self, x, *, check_finite: bool = True):
        """``phi(x) = k(x, U) @ A``, (n, m), in ``x``'s namespace and device."""
        self._check_fitted()
        placement, a = place({"x": x}, self.backend)
        if placement.device != self._placement.device:
            raise ValueError(f"x is on {placement.device} but the map was fitted on {self._placement.device}; "
                             "move x (or refit) so both are on one device")
        xp = placement.xp
        with device_context(placement):
            xa = checks.float_matrix(a["x"], "x", self.factor_.dtype, dim=self.landmarks_.shape[1],
                                      dim_of="this map was fitted on landmarks with {dim}",
                                      check_finite=check_finite)
            out = kernel_features(xp, xa, self._uc, self._uu, self._mu, self.factor_, self.tau, self.kernel,
                                  budget=self.memory_budget, tile_entries=tile_cap(placement.device))
            return placement.to_origin(out)

    def approximate_kernel(self, x, y=None):
        """``phi(x) @ phi(y).T``: the Nystrom approximation of ``K(x, y)`` (dense; small sets)."""
        px = self.transform(x)
        py = px if y is None else self.transform(y)
        return px @ py.T


def kernel_features(xp, x, uc, uu, mu, factor, tau: float, kernel: str, *, budget: int, tile_entries: int):
    """``k(x, U) @ factor`` in row blocks; ``uc``/``uu``: landmarks centred on ``mu`` and their norms."""
    return kernel_products(xp, x, uc, uu, mu, [factor], [tau], kernel, budget=budget,
                           tile_entries=tile_entries)[0][0]


def _rows_step(n: int, m: int, d: int, itemsize: int, budget: int, tile_entries: int) -> int:
    """Rows per kernel block: the distance row, a kernel row, a scratch row and a hit mask per
    landmark, plus the centred query row, within ``budget``."""
    per_row = m * (3 * itemsize + 1) + itemsize * (d + 4)
    rows_step = min(n, (budget - SLACK) // per_row, max(1, tile_entries // max(m, 1)))
    if rows_step < 1:
        raise ValueError(f"memory_budget={budget} bytes is too small for a kernel block with m={m}, D={d}: "
                         f"one row needs {per_row} bytes beyond {SLACK}; raise memory_budget")
    return int(rows_step)


class _DistanceRows:
    """Blocks of query-landmark distances (``||x - u||``, or squared for the Gaussian kernel).

    ``blocks()`` yields ``(i0, dist, kbuf)`` per block of ``rows_step`` rows; ``dist``
    and the scratch ``kbuf`` are reused between blocks.  With a single block the
    distances are computed once and served again on every later call.
    """

    def __init__(self, xp, x, uc, uu, mu, kernel: str, rows_step: int):
        self.xp, self.x, self.uc, self.uu, self.mu, self.kernel = xp, x, uc, uu, mu, kernel
        self.rows_step = rows_step
        m = uc.shape[0]
        size = rows_step * m
        self.buf, self.kbuf = xp.empty(size, dtype=x.dtype), xp.empty(size, dtype=x.dtype)
        self.scratch, self.hits = xp.empty(size, dtype=x.dtype), xp.empty(size, dtype=bool)
        self._done = False

    def blocks(self):
        xp, n, m = self.xp, self.x.shape[0], self.uc.shape[0]
        single = self.rows_step >= n
        for i0 in range(0, n, self.rows_step):
            rows = min(self.rows_step, n - i0)
            shape = (rows, m)
            dist = self.buf[: rows * m].reshape(shape)
            if not (single and self._done):
                xc = self.x[i0:i0 + rows] - self.mu
                sqdist_tile(xc, sq_norms(xc), self.uc, self.uu, dist, self.scratch[: dist.size].reshape(shape),
                            self.hits[: dist.size].reshape(shape))
                if self.kernel == "laplace":
                    xp.sqrt(dist, out=dist)
                self._done = single
            yield i0, dist, self.kbuf[: dist.size].reshape(shape)


def kernel_products(xp, x, uc, uu, mu, mats, taus, kernel: str, *, budget: int, tile_entries: int,
                    shift_rows: bool = False, ops=None, precision: str = "float32", col_log_weights=None,
                    distances: _DistanceRows | None = None):
    """``exp(l_k(x, U) + c_k - s_k(x)) @ mats[k]`` for each temperature ``k``, in row blocks.

    ``l_k`` are the log-kernel values at length scale ``taus[k]``; ``c_k`` is 0,
    or ``col_log_weights[k]`` (m,), a log-weight per landmark; ``s_k`` is 0,
    or with ``shift_rows`` each row's maximum (so no row underflows; ratios of
    two products are unchanged).  One distance tile serves every temperature.
    Returns ``(outputs, shifts)``: lists over temperatures of (n x cols) arrays
    and of (n,) row shifts (None without ``shift_rows``).  ``ops``: the fused
    engine's kernels (float32 inputs, no column weights), with ``precision`` for
    its products.  ``distances``: the blocks to use (see :func:`column_log_sums`).
    """
    if ops is not None and x.dtype == np.float32 and col_log_weights is None:  # the fused GPU engine
        from .fused import kernel_products as fused_products
        return fused_products(ops, x, uc, uu, mu, mats, taus, kernel, budget=budget, tile_entries=tile_entries,
                              shift_rows=shift_rows, precision=precision)
    n, d = x.shape
    if distances is None:
        distances = _DistanceRows(xp, x, uc, uu, mu, kernel,
                                  _rows_step(n, uc.shape[0], d, x.dtype.itemsize, budget, tile_entries))
    outs = [xp.empty((n, mat.shape[1]), dtype=x.dtype) for mat in mats]
    shifts = [xp.empty(n, dtype=x.dtype) for _ in mats] if shift_rows else None
    colw = None if col_log_weights is None else [xp.asarray(c).astype(x.dtype) for c in col_log_weights]
    for i0, dist, tile in distances.blocks():
        rows = dist.shape[0]
        for k, (mat, tau) in enumerate(zip(mats, taus)):
            xp.multiply(dist, -logit_coef(kernel, tau), out=tile)
            if colw is not None:
                tile += colw[k][None, :]
            if shift_rows:
                top = tile.max(axis=1)
                tile -= top[:, None]
                shifts[k][i0:i0 + rows] = top
            xp.exp(tile, out=tile)
            xp.matmul(tile, mat, out=outs[k][i0:i0 + rows])
    return outs, shifts


def column_log_sums(xp, x, uc, uu, mu, taus, kernel: str, *, budget: int, tile_entries: int):
    """``log sum_i k_k(x_i, u)`` per landmark ``u`` and temperature ``k`` (float64, (m,) each), in
    row blocks; and the distance blocks, to hand to :func:`kernel_products` (a single block is
    then not computed again)."""
    n, d = x.shape
    m = uc.shape[0]
    distances = _DistanceRows(xp, x, uc, uu, mu, kernel,
                              _rows_step(n, m, d, x.dtype.itemsize, budget, tile_entries))
    sums = [LogSumExp(xp, m, x.dtype) for _ in taus]
    for _, dist, tile in distances.blocks():
        for k, tau in enumerate(taus):
            xp.multiply(dist, -logit_coef(kernel, tau), out=tile)
            sums[k].add(slice(None), tile, 0)
    return [s.value() for s in sums], distances


def warn_if_ill_conditioned(condition_number: float, dtype, ridge: float, where: str, stacklevel: int = 2) -> None:
    """Warn when ``K_UU + ridge I`` is too ill-conditioned for ``dtype`` (phi would lose > ~4 digits)."""
    limit = (1e-4 / float(np.finfo(dtype).eps)) ** 2
    if condition_number > limit:
        warnings.warn(
            f"{where}: K_UU + ridge*I has condition number {condition_number:.3g} "
            f"(> {limit:.3g}), so phi(x) loses about {0.5 * math.log10(condition_number):.1f} "
            f"digits in {np.dtype(dtype)}; raise ridge (now {ridge:g}), use fewer or better spread "
            "landmarks, or work in float64",
            NystromConditioningWarning, stacklevel=stacklevel,
        )


class Spectrum:
    """What the factorisation of ``K_UU + ridge I`` found."""

    def __init__(self, eigenvalues, clamped, ridge: float):
        self.eigenvalues = eigenvalues
        self.n_clamped = int((clamped > eigenvalues).sum())
        self.condition_number = float(clamped.max() / clamped.min())
        kernel_eigs = np.maximum(eigenvalues - ridge, 0.0)
        self.effective_rank = float((kernel_eigs / (kernel_eigs + ridge)).sum()) if ridge > 0 else float(
            (kernel_eigs > clamped.max() * 1e-12).sum())


def inverse_sqrt(xp, gram, ridge: float, eig_clamp: float):
    """``(gram + ridge I)^{-1/2}`` in float64 by eigh, eigenvalues clamped; and its :class:`Spectrum`."""
    gram = gram.astype(xp.float64, copy=True)
    m = gram.shape[0]
    idx = xp.arange(m)
    gram[idx, idx] += ridge
    gram = 0.5 * (gram + gram.T)  # exact symmetry for eigh
    lam, q = xp.linalg.eigh(gram)
    lam_host = to_host(lam)
    top = float(lam_host.max()) if m else 1.0
    floor = eig_clamp * max(top, np.finfo(np.float64).tiny)
    clamped = np.maximum(lam_host, floor)
    inv_sqrt = xp.asarray(1.0 / np.sqrt(clamped))
    factor = (q * inv_sqrt[None, :]) @ q.T
    return factor, Spectrum(lam_host, clamped, ridge)


__all__ = ["Nystrom", "NystromConditioningWarning", "kernel_features", "inverse_sqrt"]
