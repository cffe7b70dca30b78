"""Landmark selection: which real samples anchor the Nystrom map.

Every method returns indices of real samples (so landmarks are data points,
as in the DriftXpress paper), distinct, reproducible from ``seed`` and the same
on NumPy and CuPy (random draws are made on the host):

* ``"uniform"`` -- a uniform sample without replacement;
* ``"kmeans"`` -- k-means++ start, Lloyd iterations, each centre snapped to its
  nearest real sample (ties and collisions resolved to the next nearest unused);
* ``"kcenter"`` -- farthest-point traversal (2-approximation of k-center);
* ``"rls"`` -- ridge leverage-score sampling by the recursive scheme of Musco
  & Musco (2017): leverage scores estimated level by level from a Nystrom map
  on the previous level's sample, the last level sampled with probability
  proportional to its scores.  Follows the kernel's spectrum, so on clustered
  data it spends landmarks where the kernel has mass.

With ``labels``, ``m`` landmarks are chosen per class (the paper's 500 per
class), each class independently; indices come back grouped by class.
"""

from __future__ import annotations

import math

import numpy as np

from . import checks
from .backend import device_context, floating_dtype, place, to_host
from .memory import SLACK, parse_budget
from .kernels import check_kernel, kernel_tiles, sq_norms, sqdist_tile

METHODS = ("uniform", "kmeans", "kcenter", "rls")


def select(y, m: int, method: str = "uniform", *, labels=None, seed: int = 0, kernel: str = "laplace",
           tau: float | None = None, ridge: float | None = None, max_iter: int = 25, memory_budget=None,
           backend=None):
    """Indices of ``m`` landmarks among the rows of ``y`` (``m`` per class with ``labels``).

    Parameters
    ----------
    y : array (n, D)
        Real samples (or their features).
    m : int
        Landmarks to choose (per class when ``labels`` is given); at most the
        number of samples (of each class).
    method : {"uniform", "kmeans", "kcenter", "rls"}
    labels : array (n,) of ints, optional
        Class of each sample; landmarks are then chosen within each class.
    seed : int
        Reproducibility: the same seed gives the same indices, on any backend.
    kernel, tau : kernel for ``"rls"``; ``tau`` defaults to 0.2 x the mean
        pairwise distance (estimated on up to 1000 samples), the widest of the
        drifting paper's temperatures in its distance units.
    ridge : float, optional
        Regularisation of the leverage scores (``"rls"``); default: chosen
        per level from the tail of the spectrum, as Musco & Musco do.
    max_iter : int
        Lloyd iterations at most (``"kmeans"``).

    Returns
    -------
    indices : int64 array (m,) or (m * classes,), in ``y``'s namespace.

    Examples
    --------
    >>> import numpy as np, dxfield
    >>> y = np.random.default_rng(0).normal(size=(1000, 3))
    >>> idx = dxfield.landmarks.select(y, 50, method="kcenter")
    >>> idx.shape, len(set(idx.tolist()))
    ((50,), 50)
    """
    method = checks.choice(method, "method", METHODS)
    kernel = check_kernel(kernel)
    if tau is not None:
        tau = checks.positive_float(tau, "tau")
    if ridge is not None:
        ridge = checks.positive_float(ridge, "ridge")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"m must be an int (landmarks to choose), got {m!r}")
    m = int(m)
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    budget = parse_budget(memory_budget)
    placement, a = place({"y": y, "labels": labels}, backend)
    xp = placement.xp
    with device_context(placement):
        ya = checks.float_matrix(a["y"], "y", floating_dtype(xp, a["y"]))
        n = ya.shape[0]
        top, limit = max(abs(v) for v in checks.extent(ya)), checks.largest_magnitude(ya.dtype, ya.shape[1])
        if top > limit:
            raise checks.magnitude_error("y", top, limit, f"by landmarks.select in {ya.dtype}", ya.dtype)
        if labels is None:
            groups = [(None, None)]
        else:
            lab = checks.class_labels(to_host(a["labels"]), n, "labels", "one per row of y")
            groups = [(c, np.flatnonzero(lab == c)) for c in np.unique(lab)]
        seeds = np.random.SeedSequence(int(seed)).spawn(len(groups))
        chosen = []
        for (cls, members), ss in zip(groups, seeds):
            size = n if members is None else members.size
            if m > size:
                where = "" if cls is None else f" of class {cls}"
                raise ValueError(f"m={m} landmarks is more than the {size} samples{where}; "
                                 f"choose m <= {size}")
            sub = ya if members is None else ya[xp.asarray(members)]
            rng = np.random.default_rng(ss)
            local = _SELECTORS[method](xp, sub, m, rng, kernel=kernel, tau=tau, ridge=ridge,
                                       max_iter=max_iter, budget=budget)
            chosen.append(local if members is None else members[local])
        idx = np.concatenate(chosen).astype(np.int64)
        return placement.to_origin(xp.asarray(idx))


# -- methods (each returns host int indices into its y) ----------------------------------

def _uniform(xp, y, m, rng, **_):
    return np.sort(rng.choice(y.shape[0], size=m, replace=False))


def _kcenter(xp, y, m, rng, **_):
    """Farthest-point traversal from a random start."""
    n = y.shape[0]
    mu = y.mean(axis=0)
    yc = y - mu
    yy = sq_norms(yc)
    first = int(rng.integers(n))
    mind = xp.full(n, xp.inf, dtype=y.dtype)
    picked = [first]
    for _ in range(m - 1):
        c = yc[picked[-1]]
        d2 = yy - 2.0 * (yc @ c) + float(yy[picked[-1]])
        xp.minimum(mind, d2, out=mind)
        mind[picked[-1]] = -1.0  # never pick an index twice
        picked.append(int(xp.argmax(mind)))
    return np.asarray(picked)


def _kmeans(xp, y, m, rng, *, max_iter, budget, **_):
    """k-means++ seeding, Lloyd iterations, centres snapped to distinct nearest samples."""
    n, d = y.shape
    mu = y.mean(axis=0)
    yc = y - mu
    yy = sq_norms(yc)
    # k-means++: sample each new centre with probability proportional to d^2 to the chosen ones
    picked = [int(rng.integers(n))]
    mind = xp.full(n, xp.inf, dtype=y.dtype)
    for _ in range(m - 1):
        c = yc[picked[-1]]
        xp.minimum(mind, xp.maximum(yy - 2.0 * (yc @ c) + float(yy[picked[-1]]), 0.0), out=mind)
        p = to_host(mind).astype(np.float64)
        p[picked] = 0.0
        total = p.sum()
        if total <= 0:  # fewer distinct points than m: fall back to unused indices
            p = np.ones(n)
            p[picked] = 0.0
            total = p.sum()
        picked.append(int(rng.choice(n, p=p / total)))
    centres = yc[xp.asarray(picked)].copy()
    assign = None
    for _ in range(max_iter):
        new_assign, _ = nearest(xp, yc, yy, centres, budget=budget)
        if assign is not None and bool((new_assign == assign).all()):
            break
        assign = new_assign
        sums = xp.zeros_like(centres)
        _scatter_add(xp, sums, assign, yc)
        counts = xp.bincount(assign, minlength=m).astype(y.dtype)
        nonempty = counts > 0
        centres = xp.where(nonempty[:, None], sums / xp.maximum(counts, 1)[:, None], centres)
    return _snap(xp, yc, yy, centres, budget)


def _scatter_add(xp, out, idx, values) -> None:
    """``out[idx[i]] += values[i]`` with repeated indices accumulating."""
    if xp is np:
        # sorting the rows by index and summing each run is the same sum as np.add.at's unbuffered one, in a
        # few vectorised passes: 5-6 ms against 13-15 ms for 2400 rows of 512 into 128 sums (NumPy 2.4, 2 cores)
        if idx.shape[0] == 0:
            return
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        out[ordered[starts]] += np.add.reduceat(values[order], starts, axis=0)
    else:  # CuPy: the atomic scatter lives in cupyx
        import cupyx

        cupyx.scatter_add(out, idx, values)


def _snap(xp, yc, yy, centres, budget):
    """Each centre's nearest sample; collisions move to the next nearest unused sample."""
    cc = sq_norms(centres)
    near, _ = nearest(xp, centres, cc, yc, budget=budget)
    near = to_host(near)
    used: set[int] = set()
    out = np.empty_like(near)
    for i, j in enumerate(near):
        j = int(j)
        if j in used:
            d2 = to_host(yy - 2.0 * (yc @ centres[i]) + float(cc[i])).astype(np.float64)
            d2[list(used)] = np.inf
            j = int(np.argmin(d2))
        used.add(j)
        out[i] = j
    return out


def nearest(xp, q, qq, t, *, budget: int, tt=None):
    """For each row of ``q`` the index of (and squared distance to) its nearest row of ``t``.

    Tiled over ``t``: holds ``len(q) x bt`` entries at a time.  Inputs centred alike;
    ``qq``/``tt`` are their squared norms.
    """
    nq = q.shape[0]
    nt = t.shape[0]
    tt = sq_norms(t) if tt is None else tt
    it = q.dtype.itemsize
    per_col = nq * (2 * it + 1) + it * (q.shape[1] + 2)
    bt = max(1, min(nt, (budget - SLACK) // per_col))
    best = xp.full(nq, xp.inf, dtype=q.dtype)
    arg = xp.zeros(nq, dtype=xp.int64)
    size = nq * bt
    buf, scratch, hits = xp.empty(size, q.dtype), xp.empty(size, q.dtype), xp.empty(size, bool)
    for j0 in range(0, nt, bt):
        tj = t[j0:j0 + bt]
        shape = (nq, tj.shape[0])
        tile = buf[: nq * shape[1]].reshape(shape)
        sqdist_tile(q, qq, tj, tt[j0:j0 + bt], tile, scratch[: tile.size].reshape(shape),
                    hits[: tile.size].reshape(shape))
        j = xp.argmin(tile, axis=1)
        v = tile[xp.arange(nq), j]
        better = v < best
        best = xp.where(better, v, best)
        arg = xp.where(better, j + j0, arg)
    return arg, best


def _rls(xp, y, m, rng, *, kernel, tau, ridge, budget, **_):
    """Recursive ridge leverage-score sampling (Musco & Musco 2017), m distinct indices."""
    n = y.shape[0]
    if m == n:
        return np.arange(n)
    if tau is None:
        tau = 0.2 * sample_mean_distance(xp, y, rng, budget=budget)
    mu = y.mean(axis=0)
    yc = (y - mu).astype(xp.float64)
    perm = rng.permutation(n)
    levels = max(0, math.ceil(math.log2(n / m)))
    sizes = [min(n, math.ceil(n / 2 ** (levels - lv))) for lv in range(levels + 1)]
    sample = np.arange(sizes[0])  # positions in perm: uniform start
    weights = np.ones(sample.size)
    for lv in range(1, levels + 1):
        scores = _leverage(xp, yc[xp.asarray(perm[: sizes[lv]])], yc[xp.asarray(perm[sample])], weights,
                           m, kernel, tau, ridge, budget)
        if lv < levels:
            # keep each point with probability ~ its score (about 2m kept), floored so that a
            # level never collapses; weights undo the sampling bias in the next estimate
            p = np.clip(2.0 * m * scores / max(scores.sum(), 1e-300), 0.5 * m / sizes[lv], 1.0)
            keep = np.flatnonzero(rng.random(sizes[lv]) < p)
            if keep.size == 0:
                keep = rng.choice(sizes[lv], size=min(m, sizes[lv]), replace=False)
            sample, weights = keep, 1.0 / np.sqrt(p[keep])
        else:
            p = scores / scores.sum() if scores.sum() > 0 else np.full(sizes[lv], 1.0 / sizes[lv])
            positive = int((p > 0).sum())
            if positive >= m:
                sample = rng.choice(sizes[lv], size=m, replace=False, p=p)
            else:
                first = np.flatnonzero(p > 0)
                rest = rng.choice(np.setdiff1d(np.arange(sizes[lv]), first), m - positive, replace=False)
                sample = np.concatenate([first, rest])
    if levels == 0:
        sample = rng.choice(n, size=m, replace=False)
        return np.sort(sample)
    return np.sort(perm[sample])


def _leverage(xp, x, s, weights, m, kernel, tau, ridge, budget):
    """Ridge leverage scores of the rows of ``x`` estimated from the weighted sample ``s``."""
    w = xp.asarray(weights)
    ss = sq_norms(s)
    kss = kernel_tiles(s, s, [tau], kernel, aa=ss, bb=ss)[0]
    wkw = kss * w[:, None] * w[None, :]
    if ridge is None:
        # Musco & Musco: lambda = (trace - top-k eigenvalue mass) / k of the weighted sample Gram
        k = min(m, s.shape[0])
        eig = to_host(xp.linalg.eigvalsh(wkw))
        lam = max((float(eig.sum()) - float(np.sort(eig)[-k:].sum())) / k, 1e-6)
    else:
        lam = ridge
    r = xp.linalg.inv(kss + xp.diag(lam / (w * w)))
    n = x.shape[0]
    xx = sq_norms(x)
    per_row = s.shape[0] * 8 * 4
    step = max(1, min(n, (budget - SLACK) // per_row))
    out = np.empty(n)
    for i0 in range(0, n, step):
        kxs = kernel_tiles(x[i0:i0 + step], s, [tau], kernel, aa=xx[i0:i0 + step], bb=ss)[0]
        quad = ((kxs @ r) * kxs).sum(axis=1)
        out[i0:i0 + step] = to_host(xp.maximum(1.0 - quad, 0.0)) / lam
    return out


def sample_mean_distance(xp, y, rng, sample: int = 1000, budget: int | None = None) -> float:
    """:func:`mean_distance` of a uniform sample of at most ``sample`` rows of ``y``."""
    n = y.shape[0]
    idx = rng.choice(n, size=min(n, sample), replace=False)
    return mean_distance(xp, y[xp.asarray(idx)], budget)  # advanced indexing copies: centred in place


def mean_distance(xp, s, budget: int | None = None) -> float:
    """Mean distance between the distinct rows of ``s`` (1.0 when it is 0), summed in float64.

    ``s`` is centred in place.  The distance block is formed a band of rows at a
    time, within ``budget`` (default: the default memory budget) beyond ``s``.
    """
    s -= s.mean(axis=0)
    ss = sq_norms(s)
    k = s.shape[0]
    it = s.dtype.itemsize
    band = max(1, min(k, (parse_budget(budget) - SLACK) // max(1, k * (2 * it + 1))))
    tile, scratch, hits = xp.empty(band * k, s.dtype), xp.empty(band * k, s.dtype), xp.empty(band * k, bool)
    total = 0.0
    for i0 in range(0, k, band):
        shape = (min(band, k - i0), k)
        size = shape[0] * k
        d2 = sqdist_tile(s[i0:i0 + band], ss[i0:i0 + band], s, ss, tile[:size].reshape(shape),
                         scratch[:size].reshape(shape), hits[:size].reshape(shape), self_offset=-i0)
        total += float(xp.sqrt(d2, out=d2).sum(dtype=xp.float64))
    mean = total / max(1, k * (k - 1))
    return mean if mean > 0 else 1.0


_SELECTORS = {"uniform": _uniform, "kmeans": _kmeans, "kcenter": _kcenter, "rls": _rls}
