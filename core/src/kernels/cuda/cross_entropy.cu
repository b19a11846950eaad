// Softmax cross-entropy with z-loss, one block per row. Forward writes per-row loss
// (lse − x_t + z·lse²), lse, the row sum of logits (for the logit-mean probe) and whether the
// target is the row's first largest logit (top-1 accuracy, argmax's tie rule); backward
// recomputes softmax from the logits and lse:
// d/dx = softmax · (1 + 2z·lse) − onehot, times the upstream scale g/N.

extern "C" __global__ void xent_fwd_f32(const float* x, const unsigned int* targets, float* loss, float* lse_out, float* row_sum,
                                        float* correct, i64 rows, i64 v, float z) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * v;
        float m = -DPT_INF;
        for (i64 j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, xr[j]);
        m = block_max(m);
        float s = 0.0f;
        for (i64 j = threadIdx.x; j < v; j += blockDim.x) s += expf(xr[j] - m);
        s = block_sum(s);
        float t = 0.0f;
        for (i64 j = threadIdx.x; j < v; j += blockDim.x) t += xr[j];
        t = block_sum(t);
        // Logits that beat the target: larger, or equal at a smaller index.
        const i64 tg = (i64)targets[r];
        const float xt = xr[tg];
        float beat = 0.0f;
        for (i64 j = threadIdx.x; j < v; j += blockDim.x) beat += (xr[j] > xt || (xr[j] == xt && j < tg)) ? 1.0f : 0.0f;
        beat = block_sum(beat);
        if (threadIdx.x == 0) {
            correct[r] = beat == 0.0f ? 1.0f : 0.0f;
            row_sum[r] = t;
            const float lse = m + logf(s);
            lse_out[r] = lse;
            loss[r] = lse - xr[targets[r]] + z * lse * lse;
        }
    }
}

extern "C" __global__ void xent_bwd_f32(const float* x, const unsigned int* targets, const float* lse, float* gx, i64 rows, i64 v, float z,
                                        float scale) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float l = lse[r];
        const float f = scale * (1.0f + 2.0f * z * l);
        for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
            float d = expf(x[r * v + j] - l) * f;
            if (j == (i64)targets[r]) d -= scale;
            gx[r * v + j] = d;
        }
    }
}
