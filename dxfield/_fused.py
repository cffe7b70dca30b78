"""The fused engine: the exact field's sweeps and the Nystrom kernel block on CUDA kernels.

``engine="composed"`` evaluates the field with array operations (NumPy or CuPy),
one operation per step; it is the reference.  ``engine="fused"`` runs the same
math on the GPU with two cuBLAS products per target tile and RawKernels
(``dxfield/cuda/kernels.cu``) for everything between them:

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
``S`` of a target tile serves both passes, so each target tile costs exactly
two GEMMs of ``2 N bt D`` flops and three light kernels.  Memory: the tiles
``S`` (bq x bt) and ``E`` (T x bq x bt) under the call's memory budget, plus
the O(N D) accumulators; never an N x (P + M) array.

Row state.  RowSums keeps ``(m, s, acc)`` with ``acc_true = exp(m) acc``; the
composed path keeps ``m`` at the running maximum.  Here ``m`` is a reference
that moves only when a tile's maximum exceeds it by more than ``ROW_MARGIN``
(so ``E <= exp(ROW_MARGIN)`` and most rows are never rescaled), and at the end
every row is renormalised to ``s = 1`` (``m <- m + log s``, ``acc <- acc / s``),
an exactly equivalent representation whose entries stay bounded.

The engine is chosen by :func:`resolve`: ``"auto"`` means fused on a GPU for
float32 inputs (composed on the CPU, for float64, or if the kernels cannot be
compiled, with a warning), ``"fused"`` insists and raises where it cannot run.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from . import _checks
from ._cuda import COL_BLOCK, MAX_TEMPERATURES, grid_1d as _grid

ENGINES = ("auto", "composed", "fused")
ENGINE_ENV = "DXFIELD_ENGINE"
EXACT_PRECISIONS = ("float32", "tf32x3", "tf32")
ROW_MARGIN = 20.0  # log-units a row maximum may exceed its reference before the row is rescaled
ROWS_PER_CHUNK = 256  # query rows per block of the column kernel

_OPS_OVERRIDE = None  # tests: an object with the CupyOps interface that runs the kernels elsewhere
_warned: set = set()


def resolve(engine, precision, placement, dtype, n_temps: int, *, precisions=EXACT_PRECISIONS):
    """The ops object that runs the fused engine, or None for the composed path.

    Checks ``engine`` (argument, else ``$DXFIELD_ENGINE``, else ``"auto"``) and
    ``precision``; raises ValueError naming the argument when the combination
    cannot run where the inputs are.
    """
    source = "engine"
    if engine is None:
        engine = os.environ.get(ENGINE_ENV, "auto") or "auto"
        source = ENGINE_ENV
    name = _checks.choice(str(engine).strip().lower(), source, ENGINES)
    precision = _checks.choice(precision, "precision", precisions)
    if name == "composed":
        if precision != "float32":
            raise ValueError(f"precision={precision!r} is implemented by the fused GPU engine; "
                             "use engine='auto' or 'fused' with GPU inputs, or precision='float32'")
        return None
    emulated = _OPS_OVERRIDE is not None and name == "fused"
    if placement.device.kind != "cuda" and not emulated:
        if name == "fused":
            raise ValueError("engine='fused' runs CUDA kernels: pass GPU inputs (CuPy arrays or CUDA "
                             "tensors) or backend='cupy'; on the CPU use engine='composed' or 'auto'")
        if precision != "float32":
            raise ValueError(f"precision={precision!r} uses GPU tensor cores; on the CPU only 'float32' is available")
        return None
    why = None
    if np.dtype(dtype) != np.float32:
        why = f"it computes in float32 and the inputs are {np.dtype(dtype)}"
    elif n_temps > MAX_TEMPERATURES:
        why = f"it takes at most {MAX_TEMPERATURES} temperatures per call, got {n_temps}"
    if why is not None:
        if name == "fused" or precision != "float32":
            raise ValueError(f"engine='fused' cannot run this call: {why}; use engine='composed'")
        return None
    if emulated:
        return _OPS_OVERRIDE
    from ._cuda import CupyOps

    ops = CupyOps(placement.xp)
    try:
        ops.compile()
    except Exception as exc:  # NVRTC missing or failing: the composed path still works
        if name == "fused" or precision != "float32":
            raise RuntimeError(f"engine='fused': the CUDA kernels failed to compile ({exc})") from exc
        key = type(exc).__name__
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"dxfield: the fused CUDA kernels failed to compile ({exc}); using the composed "
                          "CuPy path", RuntimeWarning, stacklevel=3)
        return None
    return ops


def _rtol() -> float:
    from .kernels import refine_tolerance

    return refine_tolerance(np.float32)


class _Tiles:
    """The per-call pieces every tile kernel takes (the DX_TILE_PARAMS of the source)."""

    def __init__(self, es, ops, width: int):
        xp = ops.xp
        self.es, self.ops, self.xp = es, ops, xp
        self.xc = xp.ascontiguousarray(es.xc, dtype=np.float32)
        self.xx = xp.ascontiguousarray(es.xx, dtype=np.float32)
        ql = es.query_labels
        self.qlab = None if ql is None else xp.ascontiguousarray(ql, dtype=np.int64)
        self.laplace = int(es.kernel == "laplace")
        self.rtol = _rtol()
        self.d = es.d
        self.width = width
        self.S = xp.empty(es.plan.bq * width, dtype=np.float32)

    def row_tiles(self):
        n, bq = self.es.n, self.es.plan.bq
        return [slice(i0, min(n, i0 + bq)) for i0 in range(0, n, bq)]

    def target_tiles(self):
        xp = self.xp
        for t, j0, yc, yy, logw, tlab in _narrow(self.es._target_tiles(), self.width):
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
    tiles = _Tiles(es, ops, _tile_width(es, len(es.coefs)))
    total = xp.zeros((), dtype=np.float64)
    count = xp.zeros((), dtype=np.int64)
    size = _grid(es.plan.bq * tiles.width, ops.block)
    bsum = xp.empty(size, dtype=np.float64)
    bcnt = xp.empty(size, dtype=np.int64)
    for t, j0, yc, yy, _, tlab in tiles.target_tiles():
        for rows in tiles.row_tiles():
            s = tiles.product(rows, yc, es.precision)
            g = _grid(s.size, ops.block)
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


def exact_sweep(es):
    """:meth:`ExactSums.sweep` on the fused kernels: ``(sums, row_lse)`` in the same form."""
    from .field import LogSumExp, RowSums

    ops = es.ops
    xp = ops.xp
    n, d = es.n, es.d
    nt = len(es.coefs)
    bidi = es.bidirectional
    width = _tile_width(es, nt)
    tiles = _Tiles(es, ops, width)
    plan = es.plan
    coefs = xp.asarray(np.asarray(es.coefs, dtype=np.float32))
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
            ops.launch("dx_scale_rows", (_grid(nt * bq * d, ops.block),), (ops.block,), [st.acc, scale, nt, n, rows.start, bq, d])
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
            rs = RowSums.__new__(RowSums)
            rs.xp, rs.m, rs.s, rs.acc = xp, st.m[k], st.s[k], st.acc[k]
            pair.append(rs)
        sums.append(pair)
    row_lse = None
    if bidi:
        row_lse = []
        for k in range(nt):
            lse = LogSumExp.__new__(LogSumExp)
            lse.xp, lse.m, lse.s = xp, lse_m[k], lse_s[k]
            row_lse.append(lse)
    return sums, row_lse


def _tile_width(es, nt: int) -> int:
    """Targets per fused tile under the call's memory budget.

    The composed engine's plan sizes its tiles for its own work space; the fused
    sweep holds per tile entry the product ``S`` and one weight tile per
    temperature (plus a three-part split of one weight tile with ``"tf32x3"``),
    and beyond the tiles the row states of both sides and, with ``"tf32x3"``,
    split copies of the queries and of a target tile.  With ``block_size`` given
    the plan's tile shape is kept as it is.
    """
    from ._memory import SLACK

    plan = es.plan
    if es.block_size is not None:
        return plan.bt
    n, d, bq = es.n, es.d, plan.bq
    split = es.precision == "tf32x3"
    per_entry = 4 * (1 + nt + (3 if split else 0))
    per_target = 4 * (d + 2) + (12 * d if split else 0)
    fixed = 4 * (n * d + 2 + len(es.sides) * nt * n * (d + 2) + 4 * nt * n) + (12 * n * d if split else 0)
    width = (es.budget - SLACK - fixed) // (bq * per_entry + per_target)
    if width < 1:
        raise ValueError(f"memory_budget={es.budget} bytes is too small for the fused engine with N={n}, D={d} "
                         f"and {nt} temperature(s) at precision {es.precision!r}; raise memory_budget "
                         "or use engine='composed'")
    return int(min(plan.bt, width))


def _narrow(tiles, width: int):
    """Split the target tiles of the plan into tiles of at most ``width`` targets."""
    for t, j0, yc, yy, logw, tlab in tiles:
        if yc.shape[0] <= width:
            yield t, j0, yc, yy, logw, tlab
            continue
        for c0 in range(0, yc.shape[0], width):
            c = slice(c0, c0 + width)
            yield (t, j0 + c0, yc[c], yy[c], None if logw is None else logw[c],
                   None if tlab is None else tlab[c])


def kernel_products(ops, x, uc, uu, mu, mats, taus, kernel: str, *, budget: int, tile_entries: int,
                    shift_rows: bool, precision: str = "float32"):
    """:func:`dxfield.nystrom.kernel_products` on the fused kernels (float32).

    Per row block: ``S = Xc @ Uc^T`` (cuBLAS), ``dx_kernel_rows`` turns it into the
    row-shifted kernel block of every temperature, and one cuBLAS product per
    temperature multiplies it by ``mats[k]`` (the folded m x (D + 2) summaries).
    """
    from ._memory import SLACK
    from .kernels import logit_coef, sq_norms

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
