// Batch norm over [N, C, S] (S = H·W or 1): per-channel statistics (one block per channel),
// normalisation, and the training / eval backward (gw, gb per channel, then dx).

extern "C" __global__ void bn_stats_f32(const float* x, float* mean, float* var, i64 n, i64 c, i64 s) {
    for (i64 ch = blockIdx.x; ch < c; ch += gridDim.x) {
        const i64 cnt = n * s;
        float acc = 0.0f;
        for (i64 k = threadIdx.x; k < cnt; k += blockDim.x) acc += x[((k / s) * c + ch) * s + k % s];
        const float m = block_sum(acc) / (float)cnt;
        float v = 0.0f;
        for (i64 k = threadIdx.x; k < cnt; k += blockDim.x) { const float d = x[((k / s) * c + ch) * s + k % s] - m; v += d * d; }
        v = block_sum(v) / (float)cnt;
        if (threadIdx.x == 0) { mean[ch] = m; var[ch] = v; }
    }
}

extern "C" __global__ void bn_apply_f32(const float* x, const float* mean, const float* rstd, const float* w, const float* b, float* y, i64 n,
                                        i64 c, i64 s) {
    GRID_STRIDE(i, n * c * s) {
        const i64 ch = (i / s) % c;
        y[i] = (x[i] - mean[ch]) * rstd[ch] * w[ch] + b[ch];
    }
}

// gw[ch] = Σ g·x̂, gb[ch] = Σ g (one block per channel).
extern "C" __global__ void bn_grad_params_f32(const float* x, const float* g, const float* mean, const float* rstd, float* gw, float* gb, i64 n,
                                              i64 c, i64 s) {
    for (i64 ch = blockIdx.x; ch < c; ch += gridDim.x) {
        float aw = 0.0f, ab = 0.0f;
        for (i64 k = threadIdx.x; k < n * s; k += blockDim.x) {
            const i64 idx = ((k / s) * c + ch) * s + k % s;
            aw += g[idx] * (x[idx] - mean[ch]) * rstd[ch];
            ab += g[idx];
        }
        aw = block_sum(aw);
        ab = block_sum(ab);
        if (threadIdx.x == 0) { gw[ch] = aw; gb[ch] = ab; }
    }
}

extern "C" __global__ void bn_bwd_input_f32(const float* x, const float* g, const float* mean, const float* rstd, const float* w, const float* gw,
                                            const float* gb, float* gx, i64 n, i64 c, i64 s, int train) {
    const float cnt = (float)(n * s);
    GRID_STRIDE(i, n * c * s) {
        const i64 ch = (i / s) % c;
        const float r = rstd[ch];
        if (train) {
            const float xh = (x[i] - mean[ch]) * r;
            gx[i] = w[ch] * r * (g[i] - gb[ch] / cnt - xh * gw[ch] / cnt);
        } else {
            gx[i] = g[i] * w[ch] * r;
        }
    }
}

// Running-statistics update and 1/sqrt(var + eps), per channel (c is small: one thread each).
extern "C" __global__ void bn_running_f32(float* rm, float* rv, const float* mean, const float* var, i64 c, float mo, float unbias) {
    GRID_STRIDE(i, c) {
        rm[i] = (1.0f - mo) * rm[i] + mo * mean[i];
        rv[i] = (1.0f - mo) * rv[i] + mo * var[i] * unbias;
    }
}
extern "C" __global__ void rsqrt_eps_f32(const float* var, float* rstd, i64 c, float eps) {
    GRID_STRIDE(i, c) { rstd[i] = 1.0f / sqrtf(var[i] + eps); }
}
