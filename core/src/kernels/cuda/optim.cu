// Fused optimizer updates over the flat parameter / gradient / state buffers, one pass each,
// with exactly the CPU path's arithmetic (see dptrain-optim).

extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, const float* mask, i64 n, float b1, float b2, float eps,
                                     float step, float inv_sqrt_bc2, float decay) {
    GRID_STRIDE(i, n) {
        const float gi = g[i];
        const float mi = b1 * m[i] + (1.0f - b1) * gi;
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float pi = p[i] * (1.0f - decay * mask[i]);
        p[i] = pi - step * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
    }
}

extern "C" __global__ void sgd_f32(float* p, const float* g, float* buf, const float* mask, i64 n, float lr, float wd, float mu, float damp,
                                   int nesterov, int first) {
    GRID_STRIDE(i, n) {
        float d = g[i] + wd * mask[i] * p[i];
        if (mu != 0.0f) {
            const float b = first ? d : mu * buf[i] + (1.0f - damp) * d;
            buf[i] = b;
            d = nesterov ? d + mu * b : b;
        }
        p[i] -= lr * d;
    }
}
