"""The corrected attraction: Algorithm 2's positives' side against the whole summarised data, its Nystrom
sums corrected by the residual of a uniform sample of the data (docs/design.md sections 2.7, 8.36).
"""

from __future__ import annotations

from .backend import placement_of, to_host
from .kernels import logit_coef
from .blocksums import log_sums, settled, weighted
from .stacking import Batches, Block, blocked, half_column_sums, landmark_terms, repulsion_fits
from .sums import quiet


def corrected_attraction(pf, xp, xa, groups, ys, sample_rows, maps=None, repel: bool = False):
    """The positives' side like :func:`dxfield.attraction.bidirectional_attraction`, with the Nystrom sums
    corrected by the residual of a uniform sample ``ys`` of the data (``pos_sample`` of the field).

    The residual's sums regroup into cheap pieces: the sample's own Nystrom
    summaries, ``(n / B) W^{-1} k(U, Y_s) [Y_s, 1]`` (m x (D+1), float64), are
    subtracted from the cached ones, and its exact terms
    ``(n / B) k(x, y) c_y^{-1/2} [y, 1]`` (an N x B block, exact column sums
    over the queries) are added: per call O(N (m + B) D + m B D + m^2 D).
    Rows whose corrected sums are not positive keep the Nystrom values
    (counted as fallback rows).  ``sample_rows``: the rows of ``ys`` per shard
    index (``None`` for an unconditional cache).  ``maps``: the rows'
    :func:`dxfield.attraction.sample_maps`, when the caller keeps them (no
    landmark-sample block then).

    The class groups are batched (:class:`dxfield.stacking.Batches`), and each temperature takes one
    exponential per entry of the (groups x queries x (landmarks + sample rows)) block, the negatives'
    block likewise (:class:`_Block`; docs/design.md section 8.36); a temperature whose column factors
    spread beyond range forms its terms one by one (:func:`_corrected_sums`).  Returns like
    :func:`dxfield.attraction.bidirectional_attraction` (``repel``: the negatives' side too, when its
    block fits).
    """
    centre = pf.on_device(placement_of(xp, xa))["centre"]
    bt = Batches(pf, xp, xa, groups, ys - centre, sample_rows, maps)
    neg = repel and repulsion_fits(pf, xa, bt, one_group=bt.has_sample)
    return blocked(pf, xp, xa, bt, _Block(pf, xp, bt, neg) if bt.has_sample else None, _corrected_sums, neg)


class _Block(Block):
    """:func:`corrected_attraction`'s sums, and the queries' own repulsion, from one exponential per entry and
    temperature, the temperatures stacked (:class:`dxfield.blocksums.Side`; docs/design.md section 8.36)."""

    def __init__(self, pf, xp, bt: Batches, neg: bool):
        super().__init__(pf, xp, bt, bt.dpos, neg)  # the landmarks, then the sample rows

    def positives(self, ks, coefs, P, F, top):
        """Per temperature of ``ks`` the positives' ``(b, log_w, log_r, fallback rows)``."""
        pf, xp, bt = self.pf, self.xp, self.bt
        d, nm, dt = bt.y1.shape[2] - 1, bt.nm, pf.dtype
        pairs_order = bt.nq < d + 1  # docs/design.md section 8.16
        rows_u, t_col, pairs = _nystrom_parts(pf, xp, bt, ks, pairs_order)
        if pairs_order:  # the summaries as cached (float32, kept), the pairs' Nystrom terms subtracted
            Pu = P[..., :nm] * F[:, :, None, :nm]
            folded32 = bt.kept(("folded32_stack", tuple(ks)), lambda: rows_u.astype(dt))
            acc = Pu @ folded32 + weighted(xp, P[..., nm:], F[..., nm:], bt.y_rows[None])
            acc -= pairs(Pu) @ bt.y1[None]
            r = (P[..., :nm] @ t_col.astype(dt)[..., None] + P[..., nm:] @ bt.scale[None, :, :, None])[..., 0]
        else:
            cols = xp.empty(F.shape + (d + 2,), dtype=dt)  # T x groups x (nm + ns) x [weighted: acc, s_w | r]
            cols[:, :, :nm, :d + 1] = rows_u  # the corrected summaries
            cols[:, :, :nm, d + 1] = t_col  # W^{-1} t: the plain row sums k_iu W^{-1} t
            cols[:, :, nm:, :d + 1] = bt.y_rows[None]  # the sample's exact terms
            cols[:, :, nm:, d + 1] = bt.scale[None]
            acc = weighted(xp, P, F, cols[..., :d + 1])  # rows in units exp(-c f_i + top)
            r = (P @ cols[..., d + 1:])[..., 0]  # rows in units exp(-c f_i)
        bad = (~(acc[..., d] > 0) | ~(r > 0)) & bt.valid[None]
        nbad = [int(v) for v in to_host(xp.count_nonzero(bad.reshape(len(ks), -1), axis=1))]
        for i, k in enumerate(ks):
            if nbad[i]:  # the sample's estimate went negative there: Nystrom alone
                Pu, folded = P[i, :, :, :nm], bt.folded(xp, k, d)
                nys = (Pu * F[i, :, None, :nm]) @ bt.kept(("folded32", k), lambda: folded.astype(dt))
                acc[i] = xp.where(bad[i][:, :, None], nys, acc[i])
                r[i] = xp.where(bad[i], (Pu @ folded[:, :, d].astype(dt)[:, :, None])[:, :, 0], r[i])
        units = self.pos.units(coefs)
        b, log_w, log_r = settled(xp, acc[..., :d], acc[..., d], r, units + top[..., None], units)
        return [(b[i], log_w[i], log_r[i], nbad[i]) for i in range(len(ks))]


def _nystrom_parts(pf, xp, bt: Batches, ks, pairs: bool):
    """The landmarks' side of the corrected sums at the temperatures ``ks`` (consecutive), stacked on a first
    axis: ``(rows, t, pairs)``.

    ``rows`` (T x groups x nm x (D+1), float64) are the summaries the query-landmark kernel multiplies and
    ``t`` their ``W^{-1} t`` for the plain row sums, both with the sample's Nystrom part ``W^{-1} K_s [Y_s,
    1]`` subtracted; ``pairs`` None.  Or, with ``pairs`` (docs/design.md section 8.16: fewer queries per
    group than feature columns), ``rows`` the cached summaries and ``pairs`` a callable that forms the Nystrom
    terms ``a = E W^{-1} K_s`` of every (query, sample row) pair from the stacked query-landmark terms ``E``,
    to subtract before the product with ``[Y_s, 1]``.  With the rows' maps (``W^{-1} K_s = Z^T diag(n /
    B)``, section 8.18), a few stacked products; else one temperature at a time (:func:`_nystrom_part`)."""
    d, f64 = bt.y1.shape[2] - 1, xp.float64
    folded = bt.kept(("folded_stack", tuple(ks)), lambda: xp.stack([bt.folded(xp, k, d) for k in ks]))
    if bt.zy is None:
        parts = [_nystrom_part(pf, xp, bt, k, folded[i], pairs) for i, k in enumerate(ks)]
        each = None if not pairs else (lambda e: xp.stack([p[2](e[i]) for i, p in enumerate(parts)]))
        return xp.stack([p[0] for p in parts]), xp.stack([p[1] for p in parts]), each
    z = xp.moveaxis(bt.zy[:, :, ks[0]:ks[-1] + 1, :], 2, 0)  # T x groups x ns x nm
    if pairs:
        t_col = folded[..., d] - (bt.scale[None, :, None, :] @ z)[:, :, 0, :].astype(f64)
        return folded, t_col, lambda e: (e @ z.transpose(0, 1, 3, 2)) * bt.scale[None, :, None, :]
    corrected = folded - (z.transpose(0, 1, 3, 2) @ bt.y_rows[None]).astype(f64)
    return corrected, corrected[..., d], None


def _nystrom_part(pf, xp, bt: Batches, k: int, folded, pairs: bool):
    """The landmarks' side of the corrected sums at temperature ``k``, without the rows' maps: ``(rows, t,
    pairs)`` as :func:`_nystrom_parts` gives them for one temperature, ``W^{-1} K_s`` formed from the
    landmark-sample kernel ``K_s = k(U, Y_s) n / B`` and the kept ``W^{-1}``."""
    d = bt.y1.shape[2] - 1
    dt, f64 = pf.dtype, xp.float64
    kuy = xp.exp(bt.duy * -logit_coef(pf.kernel, pf.taus[k])) * bt.scale[:, None, :]  # K_s, working dtype
    winv = bt.inverse_grams(pf, xp, k)
    if pairs:  # (W^{-1} K_s 1)^T = (K_s 1)^T W^{-1} (W symmetric)
        t_col = folded[:, :, d] - (kuy.sum(axis=2, dtype=f64)[:, None, :] @ winv)[:, 0, :]
        return folded, t_col, lambda e: ((e.astype(f64) @ winv) @ kuy.astype(f64)).astype(dt)
    corrected = folded - winv @ (kuy @ bt.y1).astype(f64)
    return corrected, corrected[:, :, d], None


def _corrected_sums(pf, xp, bt: Batches, k: int):
    """One temperature of :func:`corrected_attraction`, all groups at once: ``(b, log_w, log_r,
    fallback rows)`` as (groups x rows) arrays (padded rows hold garbage; ``bt.valid`` marks the rest).

    The sample's Nystrom part ``E W^{-1} K_s [Y_s, 1]`` (``K_s = k(U, Y_s) n / B``) is multiplied in
    the cheaper order (docs/design.md section 8.16): ``E (W^{-1} (K_s [Y_s, 1]))`` (m^2 (D+1)
    float64 products per group) or, with fewer queries per group than feature columns,
    ``((E W^{-1}) K_s) [Y_s, 1]`` (nq m^2): the residual terms ``e - a`` of each query and sample row
    are then formed before the last product."""
    d = bt.y1.shape[2] - 1
    dt = pf.dtype
    coef = logit_coef(pf.kernel, pf.taus[k])
    folded = bt.folded(xp, k, d)  # A [G | t], float64
    with quiet(xp):
        # k_iu c_u^{-1/2} = exp(e_iu) and k_iu = exp(e_iu) c_u^{1/2}: column sums over each group's queries
        Lu, half, e_u = landmark_terms(pf, xp, bt, k)
        Ly = bt.dy * -coef
        half_y = half_column_sums(xp, Ly)  # the sample points' exact column sums
        e_y = Ly - half_y[:, None, :]
        shift = xp.maximum(xp.maximum(e_u.max(axis=2), Lu.max(axis=2)),
                           xp.maximum(e_y.max(axis=2), Ly.max(axis=2)))  # every term below is <= 1 in its units
        shift = xp.where(xp.isfinite(shift), shift, 0).astype(dt)
        E = xp.exp(e_u - shift[:, :, None])  # units exp(shift_i)
        root_c = xp.exp(half)  # c_u^{1/2}

        def nystrom():  # [acc | s_w] of the Nystrom sums alone (with a sample: for its product order, or fallback)
            return E @ bt.kept(("folded32", k), lambda: folded.astype(dt))

        t_col = folded[:, :, d]  # W^{-1} t, corrected below for the plain row sums
        nys = pr = None if bt.has_sample else nystrom()
        if bt.has_sample:
            ay = xp.exp(e_y - shift[:, :, None]) * bt.scale[:, None, :]  # exact terms, units exp(shift_i)
            pr, t_col, nys = _sample_sums(pf, xp, bt, k, E, ay, nystrom)
        r = (E @ (t_col.astype(dt) * root_c)[:, :, None])[:, :, 0]  # plain row sums k_i. W^{-1} t
        if bt.has_sample:
            r += (ay @ xp.exp(half_y)[:, :, None])[:, :, 0]
    bad = (~(pr[:, :, d] > 0) | ~(r > 0)) & bt.valid
    nbad = int(bad.sum()) if bt.has_sample else 0
    if nbad:  # the sample's estimate went negative there: Nystrom alone
        pr = xp.where(bad[:, :, None], nystrom() if nys is None else nys, pr)
        r = xp.where(bad, (E @ (folded[:, :, d].astype(dt) * root_c)[:, :, None])[:, :, 0], r)
    s_w = pr[:, :, d]
    has = (s_w > 0) & (r > 0)  # False only without any data (and on padding)
    safe_s = xp.where(has, s_w, 1.0)
    b = pr[:, :, :d] / safe_s[:, :, None]
    return b, log_sums(xp, shift, safe_s, has), log_sums(xp, shift, r, has), nbad


def _sample_sums(pf, xp, bt: Batches, k: int, E, ay, nystrom):
    """The corrected sums ``[acc | s_w]`` of one temperature, ``W^{-1} t`` corrected for the plain row sums,
    and the Nystrom sums alone where they were formed (else None), for :func:`_corrected_sums`: the sample's
    Nystrom part subtracted (:func:`_nystrom_parts`), its exact terms ``ay`` added."""
    rows_u, t_col, pairs = _nystrom_parts(pf, xp, bt, [k], bt.nq < bt.y1.shape[2])
    if pairs is None:
        return E @ rows_u[0].astype(pf.dtype) + ay @ bt.y1, t_col[0], None
    nys = nystrom()
    return nys + (ay - pairs(E[None])[0]) @ bt.y1, t_col[0], nys
