// Batch norm over k ghost batches of [n, C, S] each (S = H·W or 1; k = 1 is plain batch norm):
// per-(ghost batch, channel) statistics (one block per pair), normalisation, and the training /
// eval backward (gw, gb per pair, then dx). Ghost batch g is the contiguous slice starting at
// g·n·C·S; statistics are laid out [k, C].

extern "C" __global__ void bn_stats_f32(const float* x, float* mean, float* var, i64 k, i64 n, i64 c, i64 s) {
    for (i64 gc = blockIdx.x; gc < k * c; gc += gridDim.x) {
        const i64 g = gc / c, ch = gc % c;
        const float* xg = x + g * n * c * s;
        const i64 cnt = n * s;
        float acc = 0.0f;
        for (i64 q = threadIdx.x; q < cnt; q += blockDim.x) acc += xg[((q / s) * c + ch) * s + q % s];
        const float m = block_sum(acc) / (float)cnt;
        float v = 0.0f;
        for (i64 q = threadIdx.x; q < cnt; q += blockDim.x) { const float d = xg[((q / s) * c + ch) * s + q % s] - m; v += d * d; }
        v = block_sum(v) / (float)cnt;
        if (threadIdx.x == 0) { mean[gc] = m; var[gc] = v; }
    }
}

// Statistics index of element i: (ghost batch, channel).
__device__ __forceinline__ i64 bn_stat_index(i64 i, i64 n, i64 c, i64 s) {
    return (i / (n * c * s)) * c + (i / s) % c;
}

extern "C" __global__ void bn_apply_f32(const float* x, const float* mean, const float* rstd, const float* w, const float* b, float* y, i64 k,
                                        i64 n, i64 c, i64 s) {
    GRID_STRIDE(i, k * n * c * s) {
        const i64 ch = (i / s) % c, j = bn_stat_index(i, n, c, s);
        y[i] = (x[i] - mean[j]) * rstd[j] * w[ch] + b[ch];
    }
}

// gw[g, ch] = Σ g·x̂, gb[g, ch] = Σ g over ghost batch g (one block per pair).
extern "C" __global__ void bn_grad_params_f32(const float* x, const float* g, const float* mean, const float* rstd, float* gw, float* gb, i64 k,
                                              i64 n, i64 c, i64 s) {
    for (i64 gc = blockIdx.x; gc < k * c; gc += gridDim.x) {
        const i64 q = gc / c, ch = gc % c;
        const i64 off = q * n * c * s;
        float aw = 0.0f, ab = 0.0f;
        for (i64 t = threadIdx.x; t < n * s; t += blockDim.x) {
            const i64 idx = off + ((t / s) * c + ch) * s + t % s;
            aw += g[idx] * (x[idx] - mean[gc]) * rstd[gc];
            ab += g[idx];
        }
        aw = block_sum(aw);
        ab = block_sum(ab);
        if (threadIdx.x == 0) { gw[gc] = aw; gb[gc] = ab; }
    }
}

extern "C" __global__ void bn_bwd_input_f32(const float* x, const float* g, const float* mean, const float* rstd, const float* w, const float* gw,
                                            const float* gb, float* gx, i64 k, i64 n, i64 c, i64 s, int train) {
    const float cnt = (float)(n * s);
    GRID_STRIDE(i, k * n * c * s) {
        const i64 ch = (i / s) % c, j = bn_stat_index(i, n, c, s);
        const float r = rstd[j];
        if (train) {
            const float xh = (x[i] - mean[j]) * r;
            gx[i] = w[ch] * r * (g[i] - gb[j] / cnt - xh * gw[j] / cnt);
        } else {
            gx[i] = g[i] * w[ch] * r;
        }
    }
}

// Running-statistics update, once per ghost batch in order (a sequential EMA, as k calls of
// torch's batch_norm would do), and 1/sqrt(var + eps); per channel (c is small: one thread each).
extern "C" __global__ void bn_running_f32(float* rm, float* rv, const float* mean, const float* var, i64 k, i64 c, float mo, float unbias) {
    GRID_STRIDE(i, c) {
        float m = rm[i], v = rv[i];
        for (i64 g = 0; g < k; ++g) {
            m = (1.0f - mo) * m + mo * mean[g * c + i];
            v = (1.0f - mo) * v + mo * var[g * c + i] * unbias;
        }
        rm[i] = m;
        rv[i] = v;
    }
}
extern "C" __global__ void rsqrt_eps_f32(const float* var, float* rstd, i64 c, float eps) {
    GRID_STRIDE(i, c) { rstd[i] = 1.0f / sqrtf(var[i] + eps); }
}
