// Fused optimizer updates over the flat parameter / gradient / state buffers, one pass each,
// with exactly the CPU path's arithmetic (see dptrain-optim).

// A step's scalars (the Rust side: dptrain_core::ops::flat::{AdamWStep, SgdStep}).
struct AdamWStep { float beta1, beta2, eps, step_size, inv_sqrt_bc2, decay; };
struct SgdStep { float lr, weight_decay, momentum, dampening; bool nesterov, first; };

// decay_scale: per-element decay multiplier; lr_scale: per-element learning-rate multiplier, or
// null when every one is 1 (the common case reads nothing).
extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, const float* decay_scale, const float* lr_scale, i64 n,
                                     AdamWStep s) {
    GRID_STRIDE(i, n) {
        const float gi = g[i];
        const float mi = s.beta1 * m[i] + (1.0f - s.beta1) * gi;
        const float vi = s.beta2 * v[i] + (1.0f - s.beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float pi = p[i] * (1.0f - s.decay * decay_scale[i]);
        const float step = lr_scale ? s.step_size * lr_scale[i] : s.step_size;
        p[i] = pi - step * mi / (sqrtf(vi) * s.inv_sqrt_bc2 + s.eps);
    }
}

extern "C" __global__ void sgd_f32(float* p, const float* g, float* buf, const float* decay_scale, const float* lr_scale, i64 n, SgdStep s) {
    GRID_STRIDE(i, n) {
        float d = g[i] + s.weight_decay * decay_scale[i] * p[i];
        if (s.momentum != 0.0f) {
            const float b = s.first ? d : s.momentum * buf[i] + (1.0f - s.dampening) * d;
            buf[i] = b;
            d = s.nesterov ? d + s.momentum * b : b;
        }
        const float lr = lr_scale ? s.lr * lr_scale[i] : s.lr;
        p[i] -= lr * d;
    }
}

// SOAP on one parameter's device buffers (n elements): the moments — m in the original space,
// v in the eigenbasis (gp is the projected gradient) — as dptrain-optim's host loop does them,
extern "C" __global__ void soap_moments_f32(const float* g, const float* gp, float* m, float* v, i64 n, float w1, float w2) {
    GRID_STRIDE(i, n) {
        m[i] += w1 * (g[i] - m[i]);
        v[i] += w2 * (gp[i] * gp[i] - v[i]);
    }
}

// the Adam ratio in the eigenbasis,
extern "C" __global__ void soap_ratio_f32(const float* mp, const float* v, float* out, i64 n, float eps) {
    GRID_STRIDE(i, n) {
        out[i] = mp[i] / (sqrtf(v[i]) + eps);
    }
}

// and the update, then the decay (keep = 1 − lr·wd, after the update as the reference).
extern "C" __global__ void soap_apply_f32(float* p, const float* u, i64 n, float step, float keep) {
    GRID_STRIDE(i, n) {
        p[i] = (p[i] - step * u[i]) * keep;
    }
}
