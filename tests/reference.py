"""Dense float64 reference of docs/design.md section 2.1-2.3, written straight from the formulas.

Deliberately naive: builds the full N x (P + M) matrices with NumPy in float64,
with none of dxfield's tiling, centring or streaming tricks, so that the tests
compare two independent implementations.
"""

import numpy as np


def distances(x, y):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))


def log_kernel(d, tau, kernel="laplace"):
    return -d / tau if kernel == "laplace" else -(d ** 2) / (2 * tau ** 2)


def field(x, pos, neg=None, *, temperatures=(0.02, 0.05, 0.2), normalization="bidirectional",
          kernel="laplace", feature_scale="auto", drift_norm=True, neg_weight=None, include_self=None, pos_weight=1.0):
    """Return (V, S) following docs/design.md; neg=None means the queries, self pairs masked.  ``pos_weight``:
    every positive's multiplicity (in the row sums, not in its own column sum), as ``neg_weight``'s."""
    x = np.asarray(x, np.float64)
    pos = np.asarray(pos, np.float64)
    if include_self is None:
        include_self = neg is None
    negs, weights, masks = [], [], []
    n, d = x.shape
    if include_self:
        negs.append(x)
        weights.append(np.ones(n))
        masks.append(np.eye(n, dtype=bool))
    if neg is not None:
        neg = np.asarray(neg, np.float64)
        w = np.ones(len(neg)) if neg_weight is None else np.broadcast_to(np.asarray(neg_weight, np.float64), (len(neg),))
        negs.append(neg)
        weights.append(w)
        masks.append(np.zeros((n, len(neg)), dtype=bool))
    yneg = np.concatenate(negs)
    wneg = np.concatenate(weights)
    mask = np.concatenate(masks, axis=1)
    dpos = distances(x, pos)
    dneg = distances(x, yneg)
    scale = None
    if feature_scale == "auto":
        all_d = np.concatenate([dpos.ravel(), dneg[~mask]])
        scale = all_d.mean() / np.sqrt(d)
    elif feature_scale is not None:
        scale = float(feature_scale)
    if scale is not None:
        x, pos, yneg = x / scale, pos / scale, yneg / scale
        dpos, dneg = dpos / scale, dneg / scale
    total = np.zeros_like(x)
    P = len(pos)
    logw = np.log(np.concatenate([np.full(P, float(pos_weight)), wneg]))
    for tau in np.atleast_1d(temperatures):
        t = tau * np.sqrt(d) if scale is not None else tau
        L = log_kernel(np.concatenate([dpos, dneg], axis=1), t, kernel)
        L[:, P:][mask] = -np.inf
        if normalization == "row":
            # b+ and b- as softmax-weighted means (log domain, so tiny tau cannot underflow)
            Lw = L + logw[None, :]
            bp = _softmax(Lw[:, :P]) @ pos
            has_neg = np.isfinite(Lw[:, P:]).any(1, keepdims=True)
            bn = np.where(has_neg, _softmax(Lw[:, P:]) @ yneg, x)  # no negatives: b- := x_i
            v = bp - bn
        else:
            # A = sqrt(softmax_row * softmax_col) = exp(L - LR/2 - LC/2), weights as multiplicities
            LR = _logsumexp(L + logw[None, :], axis=1)
            LC = _logsumexp(L, axis=0)
            LC = np.where(np.isfinite(LC), LC, 0.0)
            A = np.exp(L + logw[None, :] - LR[:, None] / 2 - LC[None, :] / 2)
            Ap, An = A[:, :P], A[:, P:]
            Wp = Ap * An.sum(1, keepdims=True)
            Wn = An * Ap.sum(1, keepdims=True)
            v = Wp @ pos - Wn @ yneg
        if drift_norm:
            # divide by max |v| first so that squaring a tiny (but nonzero) field cannot underflow
            peak = np.abs(v).max()
            if peak > 0:
                v = v / peak
                v = v / np.sqrt((v ** 2).sum(1).mean() / d)
        total += v
    return total, scale


def field_paper_form(x, pos, tau):
    """Algorithm 2 exactly as printed (K / sqrt(rowsum colsum)), self-masked, raw features.

    Only valid where nothing underflows (moderate tau); a second, literal check.
    """
    x = np.asarray(x, np.float64)
    pos = np.asarray(pos, np.float64)
    dist = distances(x, np.concatenate([pos, x]))
    dist[:, len(pos):] += np.eye(len(x)) * 1e6
    A = np.sqrt(_softmax(-dist / tau, axis=1) * _softmax(-dist / tau, axis=0))
    Ap, An = A[:, :len(pos)], A[:, len(pos):]
    return (Ap * An.sum(1, keepdims=True)) @ pos - (An * Ap.sum(1, keepdims=True)) @ x


def _logsumexp(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(np.log(np.exp(a - m).sum(axis=axis, keepdims=True)) + m, axis=axis)


def _softmax(a, axis=1):
    return np.exp(a - np.expand_dims(_logsumexp(a, axis), axis))
