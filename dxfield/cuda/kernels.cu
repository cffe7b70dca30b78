// dxfield's CUDA hotspots, compiled at run time by NVRTC (cupy.RawModule) and
// cached by CuPy.  Distances come from a matrix product S = Xc @ Yc^T done by
// cuBLAS; these kernels turn S into kernel values, reductions and weights in
// one or two passes over each tile, never writing an N x M array.
//
// Conventions (all kernels):
//   * float32 data, float32 accumulation (double only for the mean distance);
//   * a tile is bq query rows x bt target columns, row-major with leading
//     dimension ldS; query row i of the tile is global query i0 + i;
//   * r is the distance d (laplace) or d^2 (gaussian); logits are -c_k * r for
//     temperature k (c_k > 0), so a row or column maximum of the logits is
//     -c_k times the minimum of r, shared by every temperature;
//   * masked pairs (a query with itself, or different class labels) get
//     r = +inf and so contribute exactly zero;
//   * pointers that may be absent are passed as 0 (NULL).
//
// The same source compiles as C++ against tests/cuda_emu/emulate.h, which runs
// each block's threads as std::threads with a barrier for __syncthreads(), so
// the kernels are tested on machines without a GPU.

#ifndef DX_BLOCK
#define DX_BLOCK 256  // threads per block of the row kernels; a power of two
#endif
#define DX_MAX_TEMPS 8  // temperatures per call (the Python side checks)
#define DX_COL_X 32    // columns per block of the column kernel
#define DX_COL_Y 8     // row lanes per block of the column kernel
#ifndef INFINITY        // NVRTC compiles without the C headers that define it
#define INFINITY __int_as_float(0x7f800000)
#endif

// Squared distance of query row xrow and target row yrow from their product
// s = <xc, yc> and squared norms; recomputed directly where the product form
// is unreliable (d^2 < rtol * (|x|^2 + |y|^2): near-duplicate points).
__device__ __forceinline__ float dx_sqdist(float s, float xx, float yy, const float* xrow,
                                           const float* yrow, int D, float rtol) {
    float d2 = fmaxf(xx + yy - 2.0f * s, 0.0f);
    if (d2 < rtol * (xx + yy)) {
        float acc = 0.0f;
        for (int t = 0; t < D; ++t) {
            float diff = xrow[t] - yrow[t];
            acc += diff * diff;
        }
        d2 = acc;
    }
    return d2;
}

// The inputs every distance-reading kernel takes, bundled.
struct DxTile {
    const float* S;   // bq x bt products, leading dimension ldS
    int bq, bt, ldS;
    const float* xx;  // (bq,) squared norms of the centred queries of the tile
    const float* yy;  // (bt,)
    const float* xc;  // (bq, D) centred queries of the tile
    const float* yc;  // (bt, D) centred targets of the tile
    int D;
    float rtol;
    long long self_offset;  // targets are queries: pair (i, j) is masked when i == j + self_offset
    int has_self;
    const long long* qlab;  // (bq,) query labels or NULL
    const long long* tlab;  // (bt,) target labels or NULL (NULL: the targets interact with every query)
    int laplace;            // r = d (1) or d^2 (0)
};

__device__ __forceinline__ bool dx_masked(const DxTile& t, int i, int j) {
    if (t.has_self && (long long)i == (long long)j + t.self_offset) return true;
    if (t.qlab != 0 && t.tlab != 0 && t.qlab[i] != t.tlab[j]) return true;  // unlabelled targets meet all
    return false;
}

// r for pair (i, j), +inf when masked; d2 receives the squared distance.
__device__ __forceinline__ float dx_r(const DxTile& t, int i, int j, float* d2_out) {
    if (dx_masked(t, i, j)) {
        *d2_out = INFINITY;
        return INFINITY;
    }
    float d2 = dx_sqdist(t.S[(long long)i * t.ldS + j], t.xx[i], t.yy[j], t.xc + (long long)i * t.D,
                         t.yc + (long long)j * t.D, t.D, t.rtol);
    *d2_out = d2;
    return t.laplace ? sqrtf(d2) : d2;
}

#define DX_TILE_PARAMS                                                                         \
    const float *S, int bq, int bt, int ldS, const float *xx, const float *yy, const float *xc, \
        const float *yc, int D, float rtol, long long self_offset, int has_self,               \
        const long long *qlab, const long long *tlab, int laplace
#define DX_TILE_MAKE                                                                          \
    DxTile t;                                                                                 \
    t.S = S; t.bq = bq; t.bt = bt; t.ldS = ldS; t.xx = xx; t.yy = yy; t.xc = xc; t.yc = yc;   \
    t.D = D; t.rtol = rtol; t.self_offset = self_offset; t.has_self = has_self; t.qlab = qlab; \
    t.tlab = tlab; t.laplace = laplace;

// Tree reductions over one block of DX_BLOCK threads (blockDim.x == DX_BLOCK).
__device__ __forceinline__ float dx_block_max(float v, float* sh) {
    int tid = threadIdx.x;
    sh[tid] = v;
    __syncthreads();
    for (int s = DX_BLOCK / 2; s > 0; s >>= 1) {
        if (tid < s) sh[tid] = fmaxf(sh[tid], sh[tid + s]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float dx_block_min(float v, float* sh) {
    return -dx_block_max(-v, sh);
}

__device__ __forceinline__ float dx_block_sum(float v, float* sh) {
    int tid = threadIdx.x;
    sh[tid] = v;
    __syncthreads();
    for (int s = DX_BLOCK / 2; s > 0; s >>= 1) {
        if (tid < s) sh[tid] += sh[tid + s];
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

// ---------------------------------------------------------------------------------
// Mean distance: per block, the sum (double) and count of d over unmasked pairs.
// 1-D grid of DX_BLOCK threads, grid-stride over the tile.
extern "C" __global__ void dx_dist_sum(DX_TILE_PARAMS, double* block_sum, long long* block_count) {
    DX_TILE_MAKE
    __shared__ double sh_sum[DX_BLOCK];
    __shared__ long long sh_cnt[DX_BLOCK];
    double sum = 0.0;
    long long cnt = 0;
    long long total = (long long)bq * bt;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx / bt), j = (int)(idx % bt);
        float d2;
        dx_r(t, i, j, &d2);
        if (d2 != INFINITY) {
            sum += (double)sqrtf(d2);
            cnt += 1;
        }
    }
    int tid = threadIdx.x;
    sh_sum[tid] = sum;
    sh_cnt[tid] = cnt;
    __syncthreads();
    for (int s = DX_BLOCK / 2; s > 0; s >>= 1) {
        if (tid < s) {
            sh_sum[tid] += sh_sum[tid + s];
            sh_cnt[tid] += sh_cnt[tid + s];
        }
        __syncthreads();
    }
    if (tid == 0) {
        block_sum[blockIdx.x] = sh_sum[0];
        block_count[blockIdx.x] = sh_cnt[0];
    }
}

// ---------------------------------------------------------------------------------
// Column log-sum-exp, stage 1.  State of a column: rmin (the smallest r seen) and,
// per temperature, s_k = sum_i exp(-c_k (r_i - rmin)); its log-sum-exp is
// -c_k rmin + log s_k.  Grid (ceil(bt / DX_COL_X), chunks), block (DX_COL_X, DX_COL_Y);
// block (x, y) reduces rows [y * rows_per_chunk, ...) of columns x * DX_COL_X ...
// into part_rmin[y * bt + j] and part_s[(y * nt + k) * bt + j].
__device__ __forceinline__ void dx_lse_merge(float* rmin, float* s, float r2, const float* s2,
                                             const float* coefs, int nt, int s2_stride) {
    if (r2 == INFINITY) return;
    if (r2 < *rmin) {
        for (int k = 0; k < nt; ++k) s[k] *= expf(-coefs[k] * (*rmin - r2));  // 0 when rmin = inf
        *rmin = r2;
    }
    for (int k = 0; k < nt; ++k) s[k] += s2[k * s2_stride] * expf(-coefs[k] * (r2 - *rmin));
}

extern "C" __global__ void dx_col_partial(DX_TILE_PARAMS, const float* coefs, int nt, int rows_per_chunk,
                                          float* part_rmin, float* part_s) {
    DX_TILE_MAKE
    __shared__ float sh_rmin[DX_COL_Y][DX_COL_X];
    __shared__ float sh_s[DX_COL_Y][DX_MAX_TEMPS][DX_COL_X];
    int tx = threadIdx.x, ty = threadIdx.y;
    int j = blockIdx.x * DX_COL_X + tx;
    int r0 = blockIdx.y * rows_per_chunk;
    int r1 = min(bq, r0 + rows_per_chunk);
    float rmin = INFINITY;
    float s[DX_MAX_TEMPS];
    for (int k = 0; k < DX_MAX_TEMPS; ++k) s[k] = 0.0f;
    if (j < bt) {
        for (int i = r0 + ty; i < r1; i += DX_COL_Y) {
            float d2;
            float r = dx_r(t, i, j, &d2);
            if (r == INFINITY) continue;
            if (r < rmin) {
                for (int k = 0; k < nt; ++k) s[k] *= expf(-coefs[k] * (rmin - r));
                rmin = r;
            }
            for (int k = 0; k < nt; ++k) s[k] += expf(-coefs[k] * (r - rmin));
        }
    }
    sh_rmin[ty][tx] = rmin;
    for (int k = 0; k < nt; ++k) sh_s[ty][k][tx] = s[k];
    __syncthreads();
    if (ty == 0 && j < bt) {
        for (int y = 1; y < DX_COL_Y; ++y) dx_lse_merge(&rmin, s, sh_rmin[y][tx], &sh_s[y][0][tx], coefs, nt, DX_COL_X);
        part_rmin[(long long)blockIdx.y * bt + j] = rmin;
        for (int k = 0; k < nt; ++k) part_s[((long long)blockIdx.y * nt + k) * bt + j] = s[k];
    }
}

// Column log-sum-exp, stage 2: fold the chunks into the running state of each column
// (col_rmin (bt,), col_s (nt, bt)), which persists across query tiles.  1-D grid.
extern "C" __global__ void dx_col_merge(const float* part_rmin, const float* part_s, int chunks, int bt,
                                        const float* coefs, int nt, float* col_rmin, float* col_s) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= bt) return;
    float rmin = col_rmin[j];
    float s[DX_MAX_TEMPS];
    for (int k = 0; k < nt; ++k) s[k] = col_s[(long long)k * bt + j];
    for (int c = 0; c < chunks; ++c)
        dx_lse_merge(&rmin, s, part_rmin[(long long)c * bt + j], part_s + ((long long)c * nt) * bt + j, coefs, nt, bt);
    col_rmin[j] = rmin;
    for (int k = 0; k < nt; ++k) col_s[(long long)k * bt + j] = s[k];
}

// ---------------------------------------------------------------------------------
// Row pass for temperature k = blockIdx.y and tile row i = blockIdx.x (global i0 + i).
// With e_ij = -c_k r_ij + logw_j - LC_kj / 2 (the last term only for the bidirectional
// field, from the completed column state), it writes the weights
//     E[k, i, j] = exp(e_ij - m_i)
// and updates the row state (m, s) of RowSums: s_i <- s_i * scale_i + sum_j E_ij, with
// row_scale[k, i0 + i] = scale_i = exp(m_old - m_new) for rescaling the row's running
// weighted sum before the product E @ Yc is added to it.  The reference m moves only
// when a tile's maximum exceeds it by more than `margin` (or it was -inf), so the
// running sums stay <= exp(margin) per term and most rows never need rescaling.
// With lse_m != NULL it also updates the streaming row log-sum-exp of -c_k r + logw.
// State arrays are (nt, n_state), indexed [k * n_state + i0 + i].
extern "C" __global__ void dx_row_pass(DX_TILE_PARAMS, const float* coefs, int nt, const float* logw,
                                       const float* col_rmin, const float* col_s, float* E, long long ldE,
                                       int i0, int n_state, float* row_m, float* row_s, float* row_scale,
                                       float* lse_m, float* lse_s, float margin) {
    DX_TILE_MAKE
    __shared__ float sh[DX_BLOCK];
    int i = blockIdx.x, k = blockIdx.y, tid = threadIdx.x;
    float c = coefs[k];
    long long st = (long long)k * n_state + i0 + i;
    float e_max = -INFINITY, lw_max = -INFINITY;
    for (int j = tid; j < bt; j += DX_BLOCK) {
        float d2;
        float r = dx_r(t, i, j, &d2);
        if (r == INFINITY) continue;
        float lw = -c * r;
        if (logw != 0) lw += logw[j];
        float e = lw;
        if (col_rmin != 0 && col_rmin[j] != INFINITY) e -= 0.5f * (-c * col_rmin[j] + logf(col_s[(long long)k * bt + j]));
        e_max = fmaxf(e_max, e);
        lw_max = fmaxf(lw_max, lw);
    }
    e_max = dx_block_max(e_max, sh);
    lw_max = dx_block_max(lw_max, sh);
    float m_old = row_m[st];
    float m_new = m_old, scale = 1.0f;
    if (e_max != -INFINITY && (m_old == -INFINITY || e_max > m_old + margin)) {
        m_new = e_max;
        scale = expf(m_old - m_new);  // 0 when m_old = -inf (nothing accumulated yet)
    }
    float sum_e = 0.0f, sum_l = 0.0f;
    float* erow = E + (long long)k * ldE + (long long)i * bt;
    for (int j = tid; j < bt; j += DX_BLOCK) {
        float d2;
        float r = dx_r(t, i, j, &d2);
        float w = 0.0f;
        if (r != INFINITY) {
            float lw = -c * r;
            if (logw != 0) lw += logw[j];
            float e = lw;
            if (col_rmin != 0 && col_rmin[j] != INFINITY) e -= 0.5f * (-c * col_rmin[j] + logf(col_s[(long long)k * bt + j]));
            if (e != -INFINITY) w = expf(e - m_new);
            if (lw != -INFINITY) sum_l += expf(lw - lw_max);
        }
        erow[j] = w;
        sum_e += w;
    }
    sum_e = dx_block_sum(sum_e, sh);
    sum_l = dx_block_sum(sum_l, sh);
    if (tid == 0) {
        row_s[st] = row_s[st] * scale + sum_e;
        row_m[st] = m_new;
        row_scale[st] = scale;
        if (lse_m != 0 && lw_max != -INFINITY) {
            float lm = lse_m[st];
            float top = fmaxf(lm, lw_max);
            lse_s[st] = lse_s[st] * expf(lm - top) + sum_l * expf(lw_max - top);
            lse_m[st] = top;
        }
    }
}

// acc[k, i0 + i, :] *= scale[k, i0 + i] for rows whose scale is not 1; grid-stride over
// rows x D for every temperature (acc is (nt, n_state, D), scale (nt, n_state)).
extern "C" __global__ void dx_scale_rows(float* acc, const float* scale, int nt, int n_state, int i0, int rows,
                                         int D) {
    long long total = (long long)nt * rows * D;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        long long row = idx / D;
        int k = (int)(row / rows), i = (int)(row % rows);
        float f = scale[(long long)k * n_state + i0 + i];
        if (f != 1.0f) acc[((long long)k * n_state + i0 + i) * D + idx % D] *= f;
    }
}

// ---------------------------------------------------------------------------------
// Query-landmark kernel block for the projected field, fused with the distances:
// row i (one block): r_ij from the products S (bq x m, overwritten with r), then for
// each temperature k, K[k, i, j] = exp(-c_k (r_ij - rmin_i)) when shift_rows (so each
// row's largest entry is 1 and nothing underflows; shifts[k, i0 + i] = -c_k rmin_i)
// or exp(-c_k r_ij) otherwise.  K is (nt, bq, m) with stride ldK between temperatures.
extern "C" __global__ void dx_kernel_rows(float* S, int bq, int m, int ldS, const float* xx, const float* yy,
                                          const float* xc, const float* yc, int D, float rtol, int laplace,
                                          const float* coefs, int nt, float* K, long long ldK, int shift_rows,
                                          int i0, int n_state, float* shifts) {
    __shared__ float sh[DX_BLOCK];
    int i = blockIdx.x, tid = threadIdx.x;
    float* srow = S + (long long)i * ldS;
    float rmin = INFINITY;
    for (int j = tid; j < m; j += DX_BLOCK) {
        float d2 = dx_sqdist(srow[j], xx[i], yy[j], xc + (long long)i * D, yc + (long long)j * D, D, rtol);
        float r = laplace ? sqrtf(d2) : d2;
        srow[j] = r;
        rmin = fminf(rmin, r);
    }
    rmin = dx_block_min(rmin, sh);  // also orders the writes above before the reads below
    float ref = shift_rows ? rmin : 0.0f;
    for (int k = 0; k < nt; ++k) {
        float c = coefs[k];
        float* krow = K + (long long)k * ldK + (long long)i * m;
        for (int j = tid; j < m; j += DX_BLOCK) krow[j] = expf(-c * (srow[j] - ref));
        if (tid == 0 && shifts != 0) shifts[(long long)k * n_state + i0 + i] = -c * ref;
    }
}

// ---------------------------------------------------------------------------------
// 3xTF32 split (precision "tf32x3"): x = hi + lo with hi = tf32(x) and lo = tf32(x - hi),
// both exactly representable in TF32, so a product of two splits taken as three TF32
// tensor-core products, a_hi b_hi + a_hi b_lo + a_lo b_hi, keeps about 21 of float32's
// 24 bits (the a_lo b_lo term is below float32 rounding).  The parts are written
// side by side: axis 1 -> out[i, q * cols + j], axis 0 -> out[q * rows + i, j], part q
// being hi when which_q == 0 and lo when which_q == 1.  Grid-stride, 1-D.
__device__ __forceinline__ float dx_round_tf32(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;  // inf, nan
    u += 0x00000fffu + ((u >> 13) & 1u);              // round to nearest even on 10 mantissa bits
    return __uint_as_float(u & 0xffffe000u);
}

extern "C" __global__ void dx_split_tf32(const float* in, int rows, int cols, int ld_in, float* out, int ld_out,
                                         int axis, int which0, int which1, int which2) {
    long long total = (long long)rows * cols;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx / cols), j = (int)(idx % cols);
        float x = in[(long long)i * ld_in + j];
        float hi = dx_round_tf32(x);
        float lo = dx_round_tf32(x - hi);
        int which[3] = {which0, which1, which2};
        for (int q = 0; q < 3; ++q) {
            float v = which[q] ? lo : hi;
            if (axis == 1) out[(long long)i * ld_out + (long long)q * cols + j] = v;
            else out[((long long)q * rows + i) * ld_out + j] = v;
        }
    }
}
