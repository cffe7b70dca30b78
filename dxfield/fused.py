"""The fused engine: the exact field's sweeps and the Nystrom kernel block on CUDA kernels.

The same math as the composed path, on the GPU: cuBLAS products per target
tile and RawKernels (``dxfield/cuda/kernels.cu``) for everything between them:

* the distance tile ``S = Xc @ Yc^T`` (cuBLAS; TF32 or bf16 only when asked);
* the bidirectional column sums (``dx_col_partial`` + ``dx_col_merge``): per
  target column and temperature, a streaming log-sum-exp over the queries,
  computed from ``S`` on the fly (distances, masks, near-duplicate refinement);
* the row pass (``dx_row_pass``): per query row and temperature, the weights
  ``E = exp(l + log w - LC/2 - m)`` written once, the row sums and the row
  log-sum-exp updated in place;
* ``acc += E @ Yc`` (cuBLAS, accumulating with beta = 1 after the rare rows
  whose reference maximum moved are rescaled by ``dx_scale_rows``).

When one query tile spans all queries (the usual case on a GPU) the product
``S`` of a target tile serves both passes, so each target tile costs one
distance GEMM and one weighted GEMM per temperature (``2 N bt D`` flops each)
and a few light kernels.  Memory: the tiles
``S`` (bq x bt) and ``E`` (T x bq x bt) under the call's memory budget, plus
the O(N D) accumulators; never an N x (P + M) array.

Row state.  RowSums keeps ``(m, s, acc)`` with ``acc_true = exp(m) acc``; the
composed path keeps ``m`` at the running maximum.  Here ``m`` is a reference
that moves only when a tile's maximum exceeds it by more than ``ROW_MARGIN``
(so ``E <= exp(ROW_MARGIN)`` and most rows are never rescaled), and at the end
every row is renormalised to ``s = 1`` (``m <- m + log s``, ``acc <- acc / s``),
an exactly equivalent representation whose entries stay bounded.

The engine is chosen by :func:`dxfield.engine.resolve`: ``"auto"`` means fused
on a GPU for float32 inputs (composed on the CPU, for float64, or if the kernels
cannot be compiled, with a warning), ``"fused"`` insists and raises where it
cannot run.  Its tiles come from the same memory plan as the composed sweep's
(:func:`dxfield.memory.exact_plan`).
"""

from __future__ import annotations

import numpy as np

from .cuda_ops import COL_BLOCK, grid_1d
from .kernels import logit_coef, refine_tolerance, sq_norms
from .memory import SLACK
from .sums import LogSumExp, RowSums

ROW_MARGIN = 20.0  # log-units a row maximum may exceed its reference before the row is rescaled
ROWS_PER_CHUNK = 256  # query rows per block of the column kernel


def _rtol() -> float:
    return refine_tolerance(np.float32)


class _Tiles:
    """The per-call pieces every tile kernel takes (the DX_TILE_PARAMS of the source)."""

    def __init__(self, es, ops):
        xp = ops.xp
        self.es, self.ops, self.xp = es, ops, xp
        self.xc = xp.ascontiguousarray(es.xc, dtype=np.float32)
        self.xx = xp.ascontiguousarray(es.xx, dtype=np.float32)
        ql = es.query_labels
        self.qlab = None if ql is None else xp.ascontiguousarray(ql, dtype=np.int64)
        self.laplace = int(es.kernel == "laplace")
        self.rtol = _rtol()
        self.d = es.d
        self.width = es.plan.bt  # the plan narrows the tiles to the fused work space
        self.S = xp.empty(es.plan.bq * self.width, dtype=np.float32)

    def row_tiles(self):
        n, bq = self.es.n, self.es.plan.bq
        return [slice(i0, min(n, i0 + bq)) for i0 in range(0, n, bq)]

    def target_tiles(self):
        xp = self.xp
        for t, j0, yc, yy, logw, tlab in self.es.target_tiles():
            yield (t, j0, xp.ascontiguousarray(yc, dtype=np.float32), xp.ascontiguousarray(yy, dtype=np.float32),
                   None if logw is None else xp.ascontiguousarray(logw, dtype=np.float32),
                   None if tlab is None else xp.ascontiguousarray(tlab, dtype=np.int64))

    def product(self, rows, yc, precision):
        bq, bt = rows.stop - rows.start, yc.shape[0]
        s = self.S[: bq * bt].reshape(bq, bt)
        self.ops.gemm(self.xc[rows], yc, s, trans_b=True, precision=precision)
        return s

    def args(self, s, rows, t, j0, yc, yy, tlab):
        bq, bt = s.shape
        i0 = rows.start
        return [s, bq, bt, bt, self.xx[rows], yy, self.xc[rows], yc, self.d, self.rtol, j0 - i0,
                int(t.is_queries), None if self.qlab is None or tlab is None else self.qlab[rows], tlab,
                self.laplace]


def mean_distance(es) -> float:
    """:meth:`ExactSums.mean_distance` on the fused kernels (sums in float64)."""
    ops = es.ops
    xp = ops.xp
    tiles = _Tiles(es, ops)
    total = xp.zeros((), dtype=np.float64)
    count = xp.zeros((), dtype=np.int64)
    size = grid_1d(es.plan.bq * tiles.width, ops.block)
    bsum = xp.empty(size, dtype=np.float64)
    bcnt = xp.empty(size, dtype=np.int64)
    for t, j0, yc, yy, _, tlab in tiles.target_tiles():
        for rows in tiles.row_tiles():
            s = tiles.product(rows, yc, es.precision)
            g = grid_1d(s.size, ops.block)
            ops.launch("dx_dist_sum", (g,), (ops.block,), tiles.args(s, rows, t, j0, yc, yy, tlab) + [bsum, bcnt])
            total += bsum[:g].sum()
            count += bcnt[:g].sum()
    total, count = float(total), int(count)
    return total / count if count > 0 else 0.0


class _State:
    """Row state of one side for every temperature: (nt, n) maxima and sums, (nt, n, D) sums of y."""

    def __init__(self, xp, nt, n, d):
        self.m = xp.full((nt, n), -np.inf, dtype=np.float32)
        self.s = xp.zeros((nt, n), dtype=np.float32)
        self.acc = xp.zeros((nt, n, d), dtype=np.float32)

    def normalise(self, xp) -> None:
        """``s <- 1, m <- m + log s, acc <- acc / s`` on rows with mass (equivalent, bounded)."""
        has = self.s > 0
        safe = xp.where(has, self.s, 1.0).astype(np.float32)
        self.m[...] = xp.where(has, self.m + xp.log(safe), self.m)
        self.acc /= safe[..., None]
        self.s[...] = xp.where(has, 1.0, 0.0)


def exact_sweep(es, coefs):
    """:meth:`ExactSums.sweep` on the fused kernels: ``(sums, row_lse)`` in the same form."""
    ops = es.ops
    xp = ops.xp
    n, d = es.n, es.d
    nt = len(coefs)
    bidi = es.bidirectional
    tiles = _Tiles(es, ops)
    width = tiles.width
    plan = es.plan
    coefs = xp.asarray(np.asarray(coefs, dtype=np.float32))
    states = {side: _State(xp, nt, n, d) for side in es.sides}
    scale = xp.empty((nt, n), dtype=np.float32)
    lse_m = xp.full((nt, n), -np.inf, dtype=np.float32) if bidi else None
    lse_s = xp.zeros((nt, n), dtype=np.float32) if bidi else None
    weights = xp.empty(nt * plan.bq * width, dtype=np.float32)
    chunks_max = -(-plan.bq // ROWS_PER_CHUNK)
    if bidi:
        part_rmin = xp.empty(chunks_max * width, dtype=np.float32)
        part_s = xp.empty(chunks_max * nt * width, dtype=np.float32)
        col_rmin = xp.empty(width, dtype=np.float32)
        col_s = xp.empty(nt * width, dtype=np.float32)
    row_tiles = tiles.row_tiles()
    one_row_tile = len(row_tiles) == 1
    for t, j0, yc, yy, logw, tlab in tiles.target_tiles():
        side = 1 if t.negative else 0
        if side not in states:
            raise ValueError("ExactSums: targets on a side that was not requested")
        st = states[side]
        bt = yc.shape[0]
        s = None
        if bidi:
            # Column sums over every query first (one pass over the query tiles).
            col_rmin[:bt].fill(np.inf)
            col_s[: nt * bt].fill(0.0)
            for rows in row_tiles:
                s = tiles.product(rows, yc, es.precision)
                chunks = -(-s.shape[0] // ROWS_PER_CHUNK)
                ops.launch("dx_col_partial", (-(-bt // COL_BLOCK[0]), chunks), COL_BLOCK,
                           tiles.args(s, rows, t, j0, yc, yy, tlab) + [coefs, nt, ROWS_PER_CHUNK, part_rmin, part_s])
                ops.launch("dx_col_merge", (-(-bt // ops.block),), (ops.block,),
                           [part_rmin, part_s, chunks, bt, coefs, nt, col_rmin, col_s])
        for rows in row_tiles:
            if s is None or not one_row_tile:
                s = tiles.product(rows, yc, es.precision)
            bq = s.shape[0]
            ops.launch("dx_row_pass", (bq, nt), (ops.block,),
                       tiles.args(s, rows, t, j0, yc, yy, tlab)
                       + [coefs, nt, logw, col_rmin if bidi else None, col_s if bidi else None, weights, bq * bt,
                          rows.start, n, st.m, st.s, scale, lse_m, lse_s, ROW_MARGIN])
            ops.launch("dx_scale_rows", (grid_1d(nt * bq * d, ops.block),), (ops.block,), [st.acc, scale, nt, n, rows.start, bq, d])
            for k in range(nt):
                e = weights[k * bq * bt:(k + 1) * bq * bt].reshape(bq, bt)
                ops.gemm(e, yc, st.acc[k, rows], beta=1.0, precision=es.precision)
    sums = []
    for st in states.values():
        st.normalise(xp)
    for k in range(nt):
        pair = []
        for side in (0, 1):
            st = states.get(side)
            if st is None:
                pair.append(None)
                continue
            pair.append(RowSums.of(xp, st.m[k], st.s[k], st.acc[k]))
        sums.append(pair)
    row_lse = None
    if bidi:
        row_lse = [LogSumExp.of(xp, lse_m[k], lse_s[k]) for k in range(nt)]
    return sums, row_lse


def kernel_products(ops, x, uc, uu, mu, mats, taus, kernel: str, *, budget: int, tile_entries: int,
                    shift_rows: bool, precision: str = "float32"):
    """:func:`dxfield.nystrom.kernel_products` on the fused kernels (float32).

    Per row block: ``S = Xc @ Uc^T`` (cuBLAS), ``dx_kernel_rows`` turns it into the
    row-shifted kernel block of every temperature, and one cuBLAS product per
    temperature multiplies it by ``mats[k]`` (the folded m x (D + 2) summaries).
    """
    xp = ops.xp
    n, d = x.shape
    m = uc.shape[0]
    nt = len(mats)
    per_row = 4 * (m * (1 + nt) + 2 * d + 12)  # product row, kernel rows, centred query
    rows_step = min(n, (budget - SLACK) // per_row, max(1, tile_entries // m))
    if rows_step < 1:
        raise ValueError(f"memory_budget={budget} bytes is too small for a kernel block with m={m}, D={d}: "
                         f"one row needs {per_row} bytes beyond {SLACK}; raise memory_budget")
    coefs = xp.asarray(np.asarray([logit_coef(kernel, tau) for tau in taus], dtype=np.float32))
    uc = xp.ascontiguousarray(uc, dtype=np.float32)
    uu = xp.ascontiguousarray(uu, dtype=np.float32)
    # Output rows padded to a multiple of 8 floats (32 bytes): cuBLAS's fast kernels, the
    # tensor-core ones above all, want aligned leading dimensions (D + 2 columns is not).
    cols = [a.shape[1] for a in mats]
    padded = [-(-c // 8) * 8 for c in cols]
    mats = [_padded(xp, a, p) for a, p in zip(mats, padded)]
    outs = [xp.empty((n, p), dtype=np.float32) for p in padded]
    shifts = xp.zeros((nt, n), dtype=np.float32) if shift_rows else None
    sbuf = xp.empty(rows_step * m, dtype=np.float32)
    kbuf = xp.empty(nt * rows_step * m, dtype=np.float32)
    rtol = _rtol()
    for i0 in range(0, n, rows_step):
        xc = xp.ascontiguousarray(x[i0:i0 + rows_step] - mu, dtype=np.float32)
        bq = xc.shape[0]
        s = sbuf[: bq * m].reshape(bq, m)
        ops.gemm(xc, uc, s, trans_b=True, precision=precision)
        ops.launch("dx_kernel_rows", (bq,), (ops.block,),
                   [s, bq, m, m, sq_norms(xc), uu, xc, uc, d, rtol, int(kernel == "laplace"), coefs, nt, kbuf,
                    bq * m, int(shift_rows), i0, n, shifts])
        for k in range(nt):
            ops.gemm(kbuf[k * bq * m:(k + 1) * bq * m].reshape(bq, m), mats[k], outs[k][i0:i0 + bq],
                     precision=precision)
    return [o[:, :c] for o, c in zip(outs, cols)], (None if shifts is None else [shifts[k] for k in range(nt)])


def _padded(xp, a, width: int):
    """``a`` as a contiguous float32 matrix with zero columns appended up to ``width``."""
    if a.shape[1] == width:
        return xp.ascontiguousarray(a, dtype=np.float32)
    out = xp.zeros((a.shape[0], width), dtype=np.float32)
    out[:, : a.shape[1]] = a
    return out
