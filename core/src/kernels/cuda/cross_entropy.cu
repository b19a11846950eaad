// Softmax cross-entropy with z-loss, one block per row, one read of the logits (16 bytes a
// load where the rows allow, see xent_ld16): each thread keeps an online (max, Σexp) pair —
// rescaled when its max grows — with the row sum of logits (for the logit-mean probe) and the
// count of logits that beat the target (larger, or equal at a smaller index: top-1 accuracy
// with argmax's tie rule); the pairs combine over the block.
// Forward writes per row the loss lse − x_t + z·lse², lse, the row sum and whether the target
// won; `xent_stats_f32` folds those into the batch's means on the device (no host transfer).
// Backward recomputes softmax from the logits and lse:
// d/dx = softmax · (1 + 2z·lse) − onehot, times the upstream gradient (read on the device) / N.
// The logits are f32, or bf16 (the fused classifier's, `linear_cross_entropy` under bf16: its
// backward writes the bf16 gradient over the logits it no longer needs, in f32 arithmetic).

__device__ __forceinline__ float xent_ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float xent_ld(const bf16_t* p, i64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void xent_st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void xent_st(bf16_t* p, i64 i, float v) { p[i] = f32_to_bf16(v); }
// 16 bytes of logits (or of their gradient) at element j, 16-byte aligned: eight bf16 or four
// f32, widened. Rows whose start is aligned and whose length is a multiple of that (GPT-2's
// vocabulary, 50,304 = 8 · 6,288; a byte vocabulary's 256) are read and written this way.
__device__ __forceinline__ void xent_ld16(const bf16_t* p, i64 j, float* f) { dpt_unpack8(dpt_ld16(p + j), f); }
__device__ __forceinline__ void xent_ld16(const float* p, i64 j, float* f) { dpt_ld4(p + j, f); }
__device__ __forceinline__ void xent_st16(bf16_t* p, i64 j, const float* f) { dpt_st16(p + j, dpt_pack8(f)); }
__device__ __forceinline__ void xent_st16(float* p, i64 j, const float* f) { dpt_st4(p + j, f); }

// wide = 0: one element per access everywhere (DPTRAIN_WIDE_LOADS=0, for measuring).
template <typename T>
__device__ void xent_fwd_rows(const T* x, const unsigned int* targets, float* loss, float* lse_out, float* row_sum, float* correct,
                              i64 rows, i64 v, float z, int wide) {
    const int N = 16 / (int)sizeof(T);
    const bool vec = wide && dpt_aligned16(x) && v % N == 0;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * v;
        const i64 tg = (i64)targets[r];
        const float xt = xent_ld(xr, tg);
        float m = -DPT_INF, s = 0.0f, t = 0.0f, beat = 0.0f;
        if (vec) {
            // N logits a load: the pair rescaled once for their maximum, then each added.
            for (i64 j0 = (i64)threadIdx.x * N; j0 < v; j0 += (i64)blockDim.x * N) {
                float a[N];
                xent_ld16(xr, j0, a);
                float mx = a[0];
#pragma unroll
                for (int k = 1; k < N; ++k) mx = fmaxf(mx, a[k]);
                if (mx > m) {
                    s *= expf(m - mx);
                    m = mx;
                }
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    s += expf(a[k] - m);
                    t += a[k];
                    beat += (a[k] > xt || (a[k] == xt && j0 + k < tg)) ? 1.0f : 0.0f;
                }
            }
        } else {
            for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
                const float a = xent_ld(xr, j);
                if (a > m) {
                    s = s * expf(m - a) + 1.0f;
                    m = a;
                } else {
                    s += expf(a - m);
                }
                t += a;
                beat += (a > xt || (a == xt && j < tg)) ? 1.0f : 0.0f;
            }
        }
        const float bm = block_max(m);
        s = block_sum(m == -DPT_INF ? 0.0f : s * expf(m - bm));
        t = block_sum(t);
        beat = block_sum(beat);
        if (threadIdx.x == 0) {
            correct[r] = beat == 0.0f ? 1.0f : 0.0f;
            row_sum[r] = t;
            const float lse = bm + logf(s);
            lse_out[r] = lse;
            loss[r] = lse - xt + z * lse * lse;
        }
    }
}

extern "C" __global__ void xent_fwd_f32(const float* x, const unsigned int* targets, float* loss, float* lse_out, float* row_sum,
                                        float* correct, i64 rows, i64 v, float z, int wide) {
    xent_fwd_rows(x, targets, loss, lse_out, row_sum, correct, rows, v, z, wide);
}
extern "C" __global__ void xent_fwd_bf16(const bf16_t* x, const unsigned int* targets, float* loss, float* lse_out, float* row_sum,
                                         float* correct, i64 rows, i64 v, float z, int wide) {
    xent_fwd_rows(x, targets, loss, lse_out, row_sum, correct, rows, v, z, wide);
}

// The batch's statistics from the per-row results, in double, by one block (a power-of-two
// size up to 256): out = [mean loss, mean lse, max lse, mean logit, z·mean lse², accuracy].
extern "C" __global__ void xent_stats_f32(const float* loss, const float* lse, const float* row_sum, const float* correct, float* out,
                                          i64 rows, i64 v, float z) {
    __shared__ double acc[5][256];
    __shared__ float mx[256];
    double a[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    float m = -DPT_INF;
    for (i64 r = threadIdx.x; r < rows; r += blockDim.x) {
        const double l = lse[r];
        a[0] += loss[r];
        a[1] += l;
        a[2] += row_sum[r];
        a[3] += l * l;
        a[4] += correct[r];
        m = fmaxf(m, lse[r]);
    }
    for (int k = 0; k < 5; ++k) acc[k][threadIdx.x] = a[k];
    mx[threadIdx.x] = m;
    __syncthreads();
    for (unsigned w = blockDim.x / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) {
            for (int k = 0; k < 5; ++k) acc[k][threadIdx.x] += acc[k][threadIdx.x + w];
            mx[threadIdx.x] = fmaxf(mx[threadIdx.x], mx[threadIdx.x + w]);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        const double n = (double)rows;
        out[0] = (float)(acc[0][0] / n);
        out[1] = (float)(acc[1][0] / n);
        out[2] = mx[0];
        out[3] = (float)(acc[2][0] / n / (double)v);
        out[4] = (float)((double)z * acc[3][0] / n);
        out[5] = (float)(acc[4][0] / n);
    }
}

// go: the upstream gradient of the mean loss (one element, on the device); scale = 1/N. `gx` may
// be `x` itself: each element is read, then written, by the same thread.
template <typename T, typename G>
__device__ void xent_bwd_rows(const T* x, const unsigned int* targets, const float* lse, G* gx, i64 rows, i64 v, float z,
                              const float* go, float scale, int wide) {
    static_assert(sizeof(T) == sizeof(G), "logits and gradient of one type");
    const int N = 16 / (int)sizeof(T);
    const bool vec = wide && dpt_aligned16(x) && dpt_aligned16(gx) && v % N == 0;
    const float sc = scale * go[0];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float l = lse[r];
        const float f = sc * (1.0f + 2.0f * z * l);
        const i64 tg = (i64)targets[r];
        if (vec) {
            // The same arithmetic per element, N a load and a store.
            for (i64 j0 = (i64)threadIdx.x * N; j0 < v; j0 += (i64)blockDim.x * N) {
                float d[N];
                xent_ld16(x + r * v, j0, d);
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    d[k] = expf(d[k] - l) * f;
                    if (j0 + k == tg) d[k] -= sc;
                }
                xent_st16(gx + r * v, j0, d);
            }
            continue;
        }
        for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
            float d = expf(xent_ld(x, r * v + j) - l) * f;
            if (j == tg) d -= sc;
            xent_st(gx, r * v + j, d);
        }
    }
}

extern "C" __global__ void xent_bwd_f32(const float* x, const unsigned int* targets, const float* lse, float* gx, i64 rows, i64 v, float z,
                                        const float* go, float scale, int wide) {
    xent_bwd_rows(x, targets, lse, gx, rows, v, z, go, scale, wide);
}
// The bf16 logits' gradient, written over them.
extern "C" __global__ void xent_bwd_bf16_inplace(bf16_t* x, const unsigned int* targets, const float* lse, i64 rows, i64 v, float z,
                                                 const float* go, float scale, int wide) {
    xent_bwd_rows((const bf16_t*)x, targets, lse, x, rows, v, z, go, scale, wide);
}
