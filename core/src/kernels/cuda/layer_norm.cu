// Layer norm over the last dim (forward: a warp per row with 16-byte accesses where the row's
// width and addresses allow, else a block per row); forward saves mean and 1/std.
// Backward computes dx per row — written, or added to a gradient already there (the residual
// stream's other use: no separate accumulation pass) — and the parameter gradients dW = Σ_rows
// g·x̂, dB = Σ_rows g as per-block partial sums (`layer_norm_bwd_f32`: each thread keeps its
// columns' sums over the block's rows in registers, then writes one row of partials; the host
// sums the blocks' rows as one GEMM). No atomics: the sums are reproducible run to run.
// w may be null (no affine).

__device__ __forceinline__ void ln_store(float* p, i64 j, float v) { p[j] = v; }
__device__ __forceinline__ void ln_store(bf16_t* p, i64 j, float v) { p[j] = f32_to_bf16(v); }

// One row (every thread of the block): y = (x − m)·rs (·w, +b when given); returns m and rs.
// y is f32, or bf16 when the layer norm writes the next GEMM's operand (`layer_norm_linear`).
template <typename Y>
__device__ __forceinline__ void ln_row_fwd(const float* xr, const float* w, const float* b, Y* yr, i64 c, float eps, float* m_out, float* rs_out) {
    float s = 0.0f;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
    const float m = block_sum(s) / (float)c;
    float v = 0.0f;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) { const float d = xr[j] - m; v += d * d; }
    const float rs = rsqrtf(block_sum(v) / (float)c + eps);
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        float o = (xr[j] - m) * rs;
        if (w) o *= w[j];
        if (b) o += b[j];
        ln_store(yr, j, o);
    }
    *m_out = m;
    *rs_out = rs;
}

// One row's backward (qk-layernorm's): gx, and g·x̂ into gxhat when it is not null.
__device__ __forceinline__ void ln_row_bwd(const float* xr, const float* gr, const float* w, float m, float rs, float* gxr, float* gxhatr, i64 c) {
    float a = 0.0f, bsum = 0.0f;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        const float xh = (xr[j] - m) * rs;
        const float gxh = w ? gr[j] * w[j] : gr[j];
        a += gxh;
        bsum += gxh * xh;
        if (gxhatr) gxhatr[j] = gr[j] * xh;
    }
    a = block_sum(a) / (float)c;
    bsum = block_sum(bsum) / (float)c;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        const float xh = (xr[j] - m) * rs;
        const float gxh = w ? gr[j] * w[j] : gr[j];
        gxr[j] = rs * (gxh - a - xh * bsum);
    }
}

template <typename Y>
__device__ void ln_fwd_rows(const float* x, const float* w, const float* b, Y* y, float* mean, float* rstd, i64 rows, i64 c, float eps) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        float m, rs;
        ln_row_fwd(x + r * c, w, b, y + r * c, c, eps, &m, &rs);
        if (threadIdx.x == 0) { mean[r] = m; rstd[r] = rs; }
    }
}

extern "C" __global__ void layer_norm_fwd_f32(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                                              i64 rows, i64 c, float eps) {
    ln_fwd_rows(x, w, b, y, mean, rstd, rows, c, eps);
}
extern "C" __global__ void layer_norm_fwd_bf16(const float* x, const float* w, const float* b, bf16_t* y, float* mean, float* rstd,
                                               i64 rows, i64 c, float eps) {
    ln_fwd_rows(x, w, b, y, mean, rstd, rows, c, eps);
}

// The forward with a warp per row (as many rows per block as it has warps — the host launches
// eight; warp shuffles only: no block barrier between a row's passes), each lane taking
// N = 16 / sizeof(Y) columns at a time: x, w and b read 16 bytes a load, y written 16 bytes a
// store (four f32 or eight bf16). The host runs it for rows of c a multiple of N with x, w, b
// and y 16-byte aligned (GPT's widths); otherwise, and for gpu-check's before-line
// (DPTRAIN_WIDE_LOADS=0), the block-per-row kernels above. Three passes over the row (sum,
// squared deviations, output), the second and third from L1 as the block-per-row kernel's are.

// y's 16 bytes: four f32, or eight rounded to bf16.
__device__ __forceinline__ void ln_st16(float* p, const float* f) { dpt_st4(p, f); }
__device__ __forceinline__ void ln_st16(bf16_t* p, const float* f) { dpt_st16(p, dpt_pack8(f)); }

template <typename Y>
__device__ void ln_fwd_warp_rows(const float* x, const float* w, const float* b, Y* y, float* mean, float* rstd, i64 rows, i64 c, float eps) {
    const int N = 16 / (int)sizeof(Y), lane = threadIdx.x & 31;
    const i64 wpb = blockDim.x >> 5;
    for (i64 r = (i64)blockIdx.x * wpb + (threadIdx.x >> 5); r < rows; r += (i64)gridDim.x * wpb) {
        const float* xr = x + r * c;
        float f[N];
        float s = 0.0f;
        for (i64 j = (i64)lane * N; j < c; j += 32 * N) {
#pragma unroll
            for (int q = 0; q < N; q += 4) dpt_ld4(xr + j + q, f + q);
#pragma unroll
            for (int k = 0; k < N; ++k) s += f[k];
        }
        const float m = warp_sum(s) / (float)c;
        float v = 0.0f;
        for (i64 j = (i64)lane * N; j < c; j += 32 * N) {
#pragma unroll
            for (int q = 0; q < N; q += 4) dpt_ld4(xr + j + q, f + q);
#pragma unroll
            for (int k = 0; k < N; ++k) v += (f[k] - m) * (f[k] - m);
        }
        const float rs = rsqrtf(warp_sum(v) / (float)c + eps);
        for (i64 j = (i64)lane * N; j < c; j += 32 * N) {
            float wf[N], bf[N];
#pragma unroll
            for (int q = 0; q < N; q += 4) {
                dpt_ld4(xr + j + q, f + q);
                if (w) dpt_ld4(w + j + q, wf + q);
                if (b) dpt_ld4(b + j + q, bf + q);
            }
#pragma unroll
            for (int k = 0; k < N; ++k) {
                float o = (f[k] - m) * rs;
                if (w) o *= wf[k];
                if (b) o += bf[k];
                f[k] = o;
            }
            ln_st16(y + r * c + j, f);
        }
        if (lane == 0) {
            mean[r] = m;
            rstd[r] = rs;
        }
    }
}

extern "C" __global__ void layer_norm_fwd_warp_f32(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                                                   i64 rows, i64 c, float eps) {
    ln_fwd_warp_rows(x, w, b, y, mean, rstd, rows, c, eps);
}
extern "C" __global__ void layer_norm_fwd_warp_bf16(const float* x, const float* w, const float* b, bf16_t* y, float* mean, float* rstd,
                                                    i64 rows, i64 c, float eps) {
    ln_fwd_warp_rows(x, w, b, y, mean, rstd, rows, c, eps);
}

// Zeroes what of `part` [2, parts, c] the block's sums do not overwrite: the columns of its own
// rows from `from` on (which it adds to in place) and the rows of blocks past the grid (when
// parts > gridDim.x, as on the emulator: they must read as zero). So the caller need not clear
// `part`. Every thread of the block calls it; the barrier orders the zeros before the adds.
__device__ void ln_part_init(float* part, i64 parts, i64 c, i64 from) {
    for (i64 j = from + threadIdx.x; j < c; j += blockDim.x) {
        part[(i64)blockIdx.x * c + j] = 0.0f;
        part[(parts + blockIdx.x) * c + j] = 0.0f;
    }
    for (i64 r = (i64)blockIdx.x + gridDim.x; r < parts; r += gridDim.x)
        for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
            part[r * c + j] = 0.0f;
            part[(parts + r) * c + j] = 0.0f;
        }
    __syncthreads();
}

// Columns a thread keeps its partial parameter-gradient sums for in registers (unrolled, so
// they stay registers): c ≤ LN_COLS · blockDim.x (1024 at 256 threads: GPT-2 small and medium);
// columns past that accumulate in the block's row of `part` itself (L2-resident). ptxas for
// sm_90: 48 registers at 4 (five 256-thread blocks per SM), 72 at 8, 128 at 16 — and int
// column indices (c < 2³¹), as 64-bit ones cost more.
#define LN_COLS 4

// Backward over rows r = blockIdx.x, + gridDim.x, …: gx (added to gx when acc ≠ 0) and, when
// part is not null, the block's partial sums over its rows: Σ g·x̂ into row blockIdx.x of
// part [parts, c], Σ g into row blockIdx.x of the [parts, c] block after it (parts ≥ gridDim.x;
// a block that runs no row writes zeros, and ln_part_init zeroes the rest).
extern "C" __global__ void layer_norm_bwd_f32(const float* x, const float* g, const float* w, const float* mean, const float* rstd,
                                              float* gx, int acc, float* part, i64 parts, i64 rows, i64 c) {
    float pw[LN_COLS], pb[LN_COLS];
#pragma unroll
    for (int t = 0; t < LN_COLS; ++t) { pw[t] = 0.0f; pb[t] = 0.0f; }
    float* pwr = part ? part + (i64)blockIdx.x * c : 0;
    float* pbr = part ? part + (parts + (i64)blockIdx.x) * c : 0;
    const int in_regs = LN_COLS * blockDim.x, cc = (int)c;
    if (part) ln_part_init(part, parts, c, in_regs);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *xr = x + r * c, *gr = g + r * c;
        const float m = mean[r], rs = rstd[r];
        float a = 0.0f, bsum = 0.0f;
#pragma unroll
        for (int t = 0; t < LN_COLS; ++t) {
            const int j = threadIdx.x + t * blockDim.x;
            if (j < cc) {
                const float xh = (xr[j] - m) * rs, gj = gr[j];
                const float gxh = w ? gj * w[j] : gj;
                a += gxh;
                bsum += gxh * xh;
                pw[t] += gj * xh;
                pb[t] += gj;
            }
        }
        for (int j = in_regs + threadIdx.x; j < cc; j += blockDim.x) {
            const float xh = (xr[j] - m) * rs, gj = gr[j];
            const float gxh = w ? gj * w[j] : gj;
            a += gxh;
            bsum += gxh * xh;
            if (pwr) {
                pwr[j] += gj * xh;
                pbr[j] += gj;
            }
        }
        a = block_sum(a) / (float)c;
        bsum = block_sum(bsum) / (float)c;
        float* gxr = gx + r * c;
        for (int j = threadIdx.x; j < cc; j += blockDim.x) {
            const float xh = (xr[j] - m) * rs;
            const float gxh = w ? gr[j] * w[j] : gr[j];
            const float v = rs * (gxh - a - xh * bsum);
            gxr[j] = acc ? gxr[j] + v : v;
        }
    }
    if (!pwr) return;
#pragma unroll
    for (int t = 0; t < LN_COLS; ++t) {
        const int j = threadIdx.x + t * blockDim.x;
        if (j < cc) {
            pwr[j] = pw[t];
            pbr[j] = pb[t];
        }
    }
}

// The same backward 16 bytes a load (rows of c a multiple of 4; x, g, w and gx 16-byte aligned:
// GPT's widths). Thread i owns the four-column chunks i + t · blockDim.x: for t < LN_VCOLS it
// keeps their w, the current row's x and g (read once per row, not again for dx) and their
// partial sums in registers (c ≤ 1024 at 256 threads: GPT-2 small and medium); further chunks go as in
// the kernel above, their sums added in the block's row of `part`. The sums run in another order
// than the one-element kernel's; the results are the same up to rounding.
#define LN_VCOLS 1
extern "C" __global__ void layer_norm_bwd_x4_f32(const float* x, const float* g, const float* w, const float* mean, const float* rstd,
                                                 float* gx, int acc, float* part, i64 parts, i64 rows, i64 c) {
    const int nch = (int)(c / 4), in_regs = LN_VCOLS * (int)blockDim.x;
    float* pwr = part ? part + (i64)blockIdx.x * c : 0;
    float* pbr = part ? part + (parts + (i64)blockIdx.x) * c : 0;
    if (part) ln_part_init(part, parts, c, 4 * (i64)in_regs);
    float pw[LN_VCOLS][4], pb[LN_VCOLS][4], wv[LN_VCOLS][4];
#pragma unroll
    for (int t = 0; t < LN_VCOLS; ++t) {
        const int q = (int)threadIdx.x + t * (int)blockDim.x;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            pw[t][k] = 0.0f;
            pb[t][k] = 0.0f;
            wv[t][k] = 1.0f;
        }
        if (w && q < nch) dpt_ld4(w + 4 * q, wv[t]);
    }
    float w4[4] = {1.0f, 1.0f, 1.0f, 1.0f}, x4[4], g4[4];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *xr = x + r * c, *gr = g + r * c;
        const float m = mean[r], rs = rstd[r];
        float xv[LN_VCOLS][4], gv[LN_VCOLS][4];
        float a = 0.0f, bsum = 0.0f;
#pragma unroll
        for (int t = 0; t < LN_VCOLS; ++t) {
            const int q = (int)threadIdx.x + t * (int)blockDim.x;
            if (q < nch) {
                dpt_ld4(xr + 4 * q, xv[t]);
                dpt_ld4(gr + 4 * q, gv[t]);
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const float xh = (xv[t][k] - m) * rs, gxh = gv[t][k] * wv[t][k];
                    a += gxh;
                    bsum += gxh * xh;
                    pw[t][k] += gv[t][k] * xh;
                    pb[t][k] += gv[t][k];
                }
            }
        }
        for (int q = in_regs + (int)threadIdx.x; q < nch; q += (int)blockDim.x) {
            dpt_ld4(xr + 4 * q, x4);
            dpt_ld4(gr + 4 * q, g4);
            if (w) dpt_ld4(w + 4 * q, w4);
            for (int k = 0; k < 4; ++k) {
                const float xh = (x4[k] - m) * rs, gxh = g4[k] * w4[k];
                a += gxh;
                bsum += gxh * xh;
                if (pwr) {
                    pwr[4 * q + k] += g4[k] * xh;
                    pbr[4 * q + k] += g4[k];
                }
            }
        }
        a = block_sum(a) / (float)c;
        bsum = block_sum(bsum) / (float)c;
        float* gxr = gx + r * c;
        float o[4];
#pragma unroll
        for (int t = 0; t < LN_VCOLS; ++t) {
            const int q = (int)threadIdx.x + t * (int)blockDim.x;
            if (q < nch) {
                if (acc) dpt_ld4(gxr + 4 * q, o);
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const float v = rs * (gv[t][k] * wv[t][k] - a - (xv[t][k] - m) * rs * bsum);
                    o[k] = acc ? o[k] + v : v;
                }
                ln_st16(gxr + 4 * q, o);
            }
        }
        for (int q = in_regs + (int)threadIdx.x; q < nch; q += (int)blockDim.x) {
            dpt_ld4(xr + 4 * q, x4);
            dpt_ld4(gr + 4 * q, g4);
            if (w) dpt_ld4(w + 4 * q, w4);
            if (acc) dpt_ld4(gxr + 4 * q, o);
            for (int k = 0; k < 4; ++k) {
                const float v = rs * (g4[k] * w4[k] - a - (x4[k] - m) * rs * bsum);
                o[k] = acc ? o[k] + v : v;
            }
            ln_st16(gxr + 4 * q, o);
        }
    }
    if (!pwr) return;
#pragma unroll
    for (int t = 0; t < LN_VCOLS; ++t) {
        const int q = (int)threadIdx.x + t * (int)blockDim.x;
        if (q < nch) {
            ln_st16(pwr + 4 * q, pw[t]);
            ln_st16(pbr + 4 * q, pb[t]);
        }
    }
}

// qk-layernorm over the packed attention projection x = qkv [N, 3, H, c] seen as rows of one
// head's c = d_head values: row r is slot (r / h) % 3 — 0 query, 1 key (normalised with gain
// w[slot·c ..] and bias b[slot·c ..], shared by the heads), 2 value (copied). Backward writes
// gx and, for the parameter gradients, per row g·x̂ and g (zero on value rows).
extern "C" __global__ void qk_norm_fwd_f32(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd, i64 rows, i64 h,
                                           i64 c, float eps) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * c;
        const i64 slot = (r / h) % 3;
        if (slot == 2) {
            for (i64 j = threadIdx.x; j < c; j += blockDim.x) y[r * c + j] = xr[j];
            continue;
        }
        float m, rs;
        ln_row_fwd(xr, w ? w + slot * c : 0, b ? b + slot * c : 0, y + r * c, c, eps, &m, &rs);
        if (threadIdx.x == 0) { mean[r] = m; rstd[r] = rs; }
    }
}

extern "C" __global__ void qk_norm_bwd_f32(const float* x, const float* g, const float* w, const float* mean, const float* rstd, float* gx,
                                           float* gxhat, float* gmask, i64 rows, i64 h, i64 c) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* gr = g + r * c;
        const i64 slot = (r / h) % 3;
        const bool value = slot == 2;
        for (i64 j = threadIdx.x; j < c; j += blockDim.x) gmask[r * c + j] = value ? 0.0f : gr[j];
        if (value) {
            for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
                gx[r * c + j] = gr[j];
                gxhat[r * c + j] = 0.0f;
            }
            continue;
        }
        ln_row_bwd(x + r * c, gr, w ? w + slot * c : 0, mean[r], rstd[r], gx + r * c, gxhat + r * c, c);
    }
}
