"""Kernels and pairwise distances.

Two radial kernels, both with a length scale ``tau``:

* ``"laplace"`` (default, what drifting models use): ``k(x, y) = exp(-||x - y|| / tau)``;
* ``"gaussian"``: ``k(x, y) = exp(-||x - y||^2 / (2 tau^2))``.

Squared distances come from matrix products, ``|x|^2 + |y|^2 - 2 x.y``, on
coordinates centred on the queries' mean (translation does not change a
distance, and centring removes most of the cancellation).  Entries that are
still small compared with the norms they came from (near-duplicate points,
where the product form loses most of its digits) are recomputed directly as
``sum((x - y)^2)``; every negative product-form entry is among them, so the
result is >= 0 without a clamp.

:func:`kernel_matvec` computes ``K(x, y) @ w`` in tiles and never holds the
n x m kernel matrix.
"""

from __future__ import annotations

import math

import numpy as np

from . import checks
from .backend import device_context, floating_dtype, place
from .memory import parse_budget, plan_blocks, tile_cap
from .options import documented

KERNELS = ("laplace", "gaussian")


def check_kernel(kernel: str) -> str:
    return checks.choice(kernel, "kernel", KERNELS)


def logit_coef(kernel: str, tau: float) -> float:
    """``log k = -coef * r`` with ``r = d`` (laplace) or ``r = d^2`` (gaussian)."""
    return 1.0 / tau if kernel == "laplace" else 0.5 / (tau * tau)


def logit_coefs(kernel: str, lengths, dtype, shown: float | None = None) -> list[float]:
    """:func:`logit_coef` of each kernel length (``tau`` in the units distances are computed in),
    refusing lengths so short that the logits overflow ``dtype`` (``shown``: the shortest length in
    the caller's units, for the message)."""
    coefs = [logit_coef(kernel, t) for t in lengths]
    if not max(coefs) < float(np.finfo(dtype).max):
        raise ValueError(f"the kernel length tau * S * sqrt(D) = {shown if shown is not None else min(lengths):.3g} "
                         f"(raw units) is too short for {np.dtype(dtype)}: its logits overflow; use larger "
                         "temperatures or feature_scale")
    return coefs


def log_kernel_from_sqdist(d2, tau: float, kernel: str, out=None):
    """``log k`` from squared distances (elementwise, may work in place via ``out``)."""
    xp = _xp(d2)
    if kernel == "laplace":
        d2 = xp.sqrt(d2, out=out)
        out = d2
    return xp.multiply(d2, -logit_coef(kernel, tau), out=out)


def kernel_tiles(a, b, taus, kernel: str, *, aa=None, bb=None) -> list:
    """Dense ``k(a, b)`` (rows x cols) for each length scale in ``taus``, from one distance tile.

    ``a`` and ``b`` centred alike (``aa``/``bb``: their squared norms, computed if
    not given).  For small blocks (landmark Gram rows, summary chunks).
    """
    xp = _xp(a)
    shape = (a.shape[0], b.shape[0])
    r = xp.empty(shape, dtype=a.dtype)
    sqdist_tile(a, sq_norms(a) if aa is None else aa, b, sq_norms(b) if bb is None else bb, r,
                xp.empty(shape, a.dtype), xp.empty(shape, bool))
    if kernel == "laplace":
        xp.sqrt(r, out=r)
    return [xp.exp(-logit_coef(kernel, tau) * r) for tau in taus]


def _xp(a):
    from .backend import array_namespace

    return array_namespace(a)


def refine_tolerance(dtype) -> float:
    """Relative size below which a product-form squared distance is recomputed directly.

    The product form carries an absolute error of a few ``eps * (|x|^2 + |y|^2)``;
    below ``16 sqrt(eps)`` of that scale the relative error of the distance would
    exceed about ``sqrt(eps)``, so those entries are redone exactly.
    """
    import numpy as np

    return 16.0 * math.sqrt(float(np.finfo(dtype).eps))


def sqdist_tile(xc, xx, yc, yy, out, scratch, hits, *, self_offset=None, self_value=0.0, colmin=None,
                formed=False, refine_entries=None, yc_scale=1.0):
    """Squared distances of a tile of centred queries ``xc`` and targets ``yc``.

    ``xx``/``yy`` are their squared norms; ``out`` (bq x bt) receives the
    result; ``scratch`` (same shape, same dtype) and ``hits`` (bool, same shape)
    are work space.  ``self_offset``: when the targets are queries too, the
    query row index of target 0; self pairs get ``self_value`` (default 0, a
    point's distance to itself; ``inf`` masks them) and are left out of the
    refinement.  ``colmin`` (bt,), optional, receives each column's minimum
    over the other pairs (a by-product of the refinement test).  ``formed``:
    ``out`` already holds the product form ``|x|^2 + |y|^2 - 2 x.y`` (from one
    product of augmented matrices, :func:`augmented_queries` and
    :func:`augmented_targets`); only the refinement is left.
    ``refine_entries``: entries of work space the refinement may use (default
    the tile's size).  ``yc_scale``: ``yc`` is given times this power of two
    (with ``formed``, e.g. the ``-2 yc`` block of the augmented targets).
    """
    xp = _xp(out)
    if not formed:
        xp.matmul(xc, yc.T, out=out)
        out *= -2.0
        out += xx[:, None]
        out += yy[None, :]
    if self_offset is not None:
        set_diagonal(out, self_offset, xp.inf)
    # Entries with d2 < rtol * (|x|^2 + |y|^2) are unreliable, negative ones included (so
    # no clamp is needed once they are redone).  Cheap test first: a column whose minimum
    # clears rtol * (max_i |x_i|^2 + |y_j|^2) has none; only otherwise test entry by entry.
    rtol = refine_tolerance(out.dtype)
    cmin = out.min(axis=0, out=colmin)
    if xx.size and not bool(xp.all(cmin >= rtol * (xx.max() + yy))):
        xp.multiply(xx[:, None], -rtol, out=scratch)
        scratch += out
        scratch -= rtol * yy[None, :]
        xp.less(scratch, 0.0, out=hits)
        if bool(hits.any()):
            _recompute_hits(xp, out, xc, yc, hits, budget_entries=refine_entries or out.size, yc_scale=yc_scale)
            if colmin is not None:
                out.min(axis=0, out=colmin)
    if self_offset is not None and self_value != xp.inf:
        set_diagonal(out, self_offset, self_value)
    return out


def augmented_queries(xc, xx, out=None):
    """``[xc | xx | 1]`` (n x (D + 2)): with :func:`augmented_targets` one product gives
    the product form of the squared distances, ``|x|^2 + |y|^2 - 2 x.y``."""
    xp = _xp(xc)
    n, d = xc.shape
    out = xp.empty((n, d + 2), dtype=xc.dtype) if out is None else out
    out[:, :d] = xc
    out[:, d] = xx
    out[:, d + 1] = 1.0
    return out


def augmented_targets(yc, yy, out=None):
    """``[-2 yc | 1 | yy]`` (m x (D + 2)), the partner of :func:`augmented_queries`."""
    xp = _xp(yc)
    m, d = yc.shape
    out = xp.empty((m, d + 2), dtype=yc.dtype) if out is None else out
    xp.multiply(yc, -2.0, out=out[:, :d])
    out[:, d] = 1.0
    out[:, d + 1] = yy
    return out


def sq_norms(a):
    """Squared row norms ``sum(a * a, axis=1)`` without an n x D temporary."""
    return _xp(a).einsum("ij,ij->i", a, a)


def set_diagonal(a, offset: int, value) -> None:
    """Set ``a[i, j] = value`` where query row ``i`` is target ``j``: ``i == j + offset``."""
    xp = _xp(a)
    bq, bt = a.shape
    lo, hi = max(0, -offset), min(bt, bq - offset)
    if hi > lo:
        j = xp.arange(lo, hi)
        a[j + offset, j] = value


def _recompute_hits(xp, d2, xc, yc, hits, budget_entries: int, yc_scale: float = 1.0) -> None:
    """``d2[i, j] = sum((xc[i] - yc[j] / yc_scale)^2)`` where ``hits``; work bounded by
    ``budget_entries``.  ``yc_scale`` is a power of two, so the division is exact."""
    bt = hits.shape[1]
    d = xc.shape[1]
    rows = xp.nonzero(hits.any(axis=1))[0]
    # index arrays cost two int64 per hit (4 float32-entries); gathered rows 3 x D per hit
    row_step = max(1, budget_entries // (4 * bt))
    hit_step = max(1, budget_entries // (3 * d))
    for r0 in range(0, int(rows.shape[0]), row_step):
        sel = rows[r0:r0 + row_step]
        ii, jj = xp.nonzero(hits[sel])
        ii = sel[ii]
        for h0 in range(0, int(ii.shape[0]), hit_step):
            i, j = ii[h0:h0 + hit_step], jj[h0:h0 + hit_step]
            diff = xc[i]
            yj = yc[j]
            if yc_scale != 1.0:
                yj /= yc_scale
            diff -= yj
            xp.square(diff, out=diff)
            d2[i, j] = diff.sum(axis=1)


def sqdist(x, y):
    """Dense squared distances (n x m) of two small point sets, NumPy or CuPy.

    Holds the whole matrix: for large sets use the blockwise functions.
    """
    xp = _xp(x)
    mu = x.mean(axis=0)
    xc, yc = x - mu, y - mu
    xx, yy = sq_norms(xc), sq_norms(yc)
    out = xp.empty((x.shape[0], y.shape[0]), dtype=x.dtype)
    scratch = xp.empty_like(out)
    hits = xp.empty(out.shape, dtype=bool)
    return sqdist_tile(xc, xx, yc, yy, out, scratch, hits)


def sqdist_stacked(x, y, mask=None):
    """Squared distances of stacked point sets: ``x`` (G x n x D) and ``y`` (G x m x D) give
    (G x n x m), ``x[g]`` against ``y[g]``, with the refinement of :func:`sqdist_tile` (entries lost
    to cancellation are redone exactly).  Many small sets in a few operations instead of a loop.
    ``mask`` (G x n x m, bool): only these entries are refined (the caller discards the others, e.g.
    padding or self pairs, whose distances are near 0 and would all be redone).

    Where more than an eighth of the entries lost their digits, each set pair is moved to its own
    centre (the mean of its rows inside the mask) and the product form is formed again, as the
    sweep's tiles are centred (docs/design.md section 3.1): a cluster far from the origin, such as
    early generated samples against each other, then needs few entries redone one by one."""
    xp = _xp(x)
    out, hits = _product_form(xp, x, y, mask)
    if 8 * int(xp.count_nonzero(hits)) > hits.size:
        centre = _stacked_centre(xp, x, y, mask)
        x, y = x - centre, y - centre
        out, hits = _product_form(xp, x, y, mask)
    if bool(hits.any()):  # every group's hits at once (a loop over the groups costs more at many classes)
        g, i, j = xp.nonzero(hits)
        # gathered rows: 3 x D entries per hit, within the block's own size (at least 2^20 entries)
        step = max(1, max(out.size, x.size + y.size, 1 << 20) // (3 * x.shape[2]))
        for h0 in range(0, int(g.shape[0]), step):
            gs, is_, js = g[h0:h0 + step], i[h0:h0 + step], j[h0:h0 + step]
            diff = x[gs, is_]
            diff -= y[gs, js]
            xp.square(diff, out=diff)
            out[gs, is_, js] = diff.sum(axis=1)
    return out


def _product_form(xp, x, y, mask):
    """``|x|^2 + |y|^2 - 2 x.y`` of stacked sets, and the entries (inside ``mask``) that lost their digits."""
    xx, yy = xp.einsum("gij,gij->gi", x, x), xp.einsum("gij,gij->gi", y, y)
    out = x @ y.transpose(0, 2, 1)
    out *= -2.0
    out += xx[:, :, None]
    out += yy[:, None, :]
    tol = refine_tolerance(out.dtype)
    # a first pass against each set pair's largest |x|^2 + |y|^2 (a bound of every entry's), the exact test
    # only where some entry is under it: sets apart from each other need one comparison per entry
    if not out.size:
        return out, xp.zeros(out.shape, dtype=bool)
    hits = out < (tol * (xx.max(axis=1) + yy.max(axis=1)))[:, None, None]
    if mask is not None:
        hits &= mask
    if bool(hits.any()):
        hits &= out < tol * (xx[:, :, None] + yy[:, None, :])
    return out, hits


def _stacked_centre(xp, x, y, mask=None):
    """Per set pair the mean of the rows of ``x`` and ``y`` (G x 1 x D), counting only rows with an
    entry inside ``mask`` (padding left out); 0 for a pair without any."""
    if mask is None:
        total, count = x.sum(axis=1) + y.sum(axis=1), float(x.shape[1] + y.shape[1])
    else:
        wx, wy = mask.any(axis=2).astype(x.dtype), mask.any(axis=1).astype(x.dtype)
        total = (wx[:, None, :] @ x)[:, 0] + (wy[:, None, :] @ y)[:, 0]
        count = xp.maximum(wx.sum(axis=1) + wy.sum(axis=1), 1)[:, None]
    return (total / count)[:, None, :]


def pairwise_distances(x, y=None, *, backend=None):
    """Euclidean distances ``||x_i - y_j||`` (n x m, dense), accurate for near duplicates.

    Parameters
    ----------
    x : array (n, D); y : array (m, D), default ``x``.

    Returns an array in the namespace and device of the inputs.
    """
    placement, xa, ya = _dense_inputs(x, y, backend)
    with device_context(placement):
        return placement.to_origin(placement.xp.sqrt(sqdist(xa, ya)))


def _dense_inputs(x, y, backend):
    """Placement and checked working-dtype copies of ``x`` and ``y`` (default ``x``)."""
    placement, a = place({"x": x, "y": y if y is not None else x}, backend)
    with device_context(placement):
        dtype = floating_dtype(placement.xp, a["x"], a["y"])
        xa = checks.float_matrix(a["x"], "x", dtype)
        ya = checks.float_matrix(a["y"], "y", dtype, dim=xa.shape[1])
    return placement, xa, ya


def kernel_matrix(x, y=None, *, kernel: str = "laplace", tau: float = 1.0, backend=None):
    """Dense kernel matrix ``K(x, y)`` (n x m). For small sets (landmarks); see :func:`kernel_matvec`.

    Examples
    --------
    >>> import numpy as np, dxfield
    >>> K = dxfield.kernel_matrix(np.zeros((2, 3)), tau=0.5)
    >>> K.shape, float(K[0, 1])
    ((2, 2), 1.0)
    """
    kernel = check_kernel(kernel)
    tau = checks.positive_float(tau, "tau")
    placement, xa, ya = _dense_inputs(x, y, backend)
    with device_context(placement):
        k = log_kernel_from_sqdist(sqdist(xa, ya), tau, kernel)
        return placement.to_origin(placement.xp.exp(k, out=k))


@documented("kernel", "memory_budget", "block_size", "backend", "check_finite")
def kernel_matvec(x, y, w, *, kernel: str = "laplace", tau: float = 1.0, memory_budget=None,
                  block_size=None, backend=None, check_finite: bool = True):
    """Exact kernel sums ``K(x, y) @ w`` computed in tiles, never holding the n x m matrix.

    O(n m (D + k)) flops and O(budget) memory: kernel ridge regression, MMD,
    kernel density or kernel k-means at sizes where ``K`` does not fit.

    Parameters
    ----------
    x : array (n, D)
        Query points.
    y : array (m, D)
        Source points.
    w : array (m,) or (m, k)
        Weights (one or several columns).
    tau : float > 0
        Kernel length scale.
    {options}

    Returns
    -------
    array (n,) or (n, k), in the namespace and device of the inputs.

    Examples
    --------
    >>> import numpy as np, dxfield
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
    >>> s = dxfield.kernel_matvec(x, y, np.ones(7), tau=2.0)
    >>> bool(np.allclose(s, dxfield.kernel_matrix(x, y, tau=2.0).sum(1)))
    True
    """
    kernel = check_kernel(kernel)
    tau = checks.positive_float(tau, "tau")
    block = checks.block_size(block_size)
    budget = parse_budget(memory_budget)
    placement, a = place({"x": x, "y": y, "w": w}, backend)
    xp = placement.xp
    with device_context(placement):
        dtype = floating_dtype(xp, a["x"], a["y"], a["w"])
        xa = checks.float_matrix(a["x"], "x", dtype, check_finite=check_finite)
        ya = checks.float_matrix(a["y"], "y", dtype, dim=xa.shape[1], check_finite=check_finite)
        wa = a["w"]
        if wa.ndim not in (1, 2) or wa.shape[0] != ya.shape[0]:
            raise ValueError(f"w must have shape ({ya.shape[0]},) or ({ya.shape[0]}, k) to match y, got {tuple(wa.shape)}")
        vector = wa.ndim == 1
        wa = checks.float_matrix(wa.reshape(ya.shape[0], -1), "w", dtype, check_finite=check_finite)
        n, d = xa.shape
        m, k = wa.shape
        it = dtype.itemsize
        plan = plan_blocks(
            n, m, budget=budget,
            fixed=it * n * (d + 1 + k),
            per_tile_entry=2 * it + 1,
            per_query_row=it * (d + k) + 16,
            per_target_row=it * (d + 1),
            max_tile_entries=tile_cap(placement.device),
            override=block, what=f"kernel_matvec with n={n}, D={d}",
        )
        mu = xa.mean(axis=0)
        xc = xa - mu
        xx = sq_norms(xc)
        out = xp.zeros((n, k), dtype=dtype)
        buf = xp.empty(plan.bq * plan.bt, dtype=dtype)
        scratch = xp.empty(plan.bq * plan.bt, dtype=dtype)
        hits = xp.empty(plan.bq * plan.bt, dtype=bool)
        for j0 in range(0, m, plan.bt):
            yc = ya[j0:j0 + plan.bt] - mu
            yy = sq_norms(yc)
            for i0 in range(0, n, plan.bq):
                rows = slice(i0, i0 + plan.bq)
                shape = (min(plan.bq, n - i0), yc.shape[0])
                tile = buf[: shape[0] * shape[1]].reshape(shape)
                sqdist_tile(xc[rows], xx[rows], yc, yy, tile,
                            scratch[: tile.size].reshape(shape), hits[: tile.size].reshape(shape))
                log_kernel_from_sqdist(tile, tau, kernel, out=tile)
                xp.exp(tile, out=tile)
                out[rows] += tile @ wa[j0:j0 + plan.bt]
        result = out[:, 0] if vector else out
        return placement.to_origin(result)
