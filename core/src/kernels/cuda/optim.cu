// Fused optimizer updates over the flat parameter / gradient / state buffers, one pass each,
// with exactly the CPU path's arithmetic (see dptrain-optim).

// A step's scalars (the Rust side: dptrain_core::ops::flat::{AdamWStep, SgdStep}). p16, in
// every update below: the parameters' bf16 copy written in the same pass (the operand bf16
// GEMMs read), or null.
struct AdamWStep { float beta1, beta2, eps, step_size, inv_sqrt_bc2, decay; };
struct SgdStep { float lr, weight_decay, momentum, dampening; bool nesterov, first; };
// A chunk of a segment table (dptrain_core::ops::flat::DeviceSegments): elements [start, end)
// of segment (parameter) seg, at most 8192, a block's work at a time; matrix: the parameter has
// more than one dimension. seg_scale, in the updates below: each segment's decay
// (seg_scale[2 * seg]) and learning-rate (seg_scale[2 * seg + 1]) multipliers, read once per
// chunk rather than per element.
struct Chunk { i64 start, end, seg, matrix; };

// Adam's moment updates of element i (AdamW and LAMB): m, v updated in place and returned.
__device__ __forceinline__ void adam_moments(float* m, float* v, float gi, float beta1, float beta2, i64 i, float* mi, float* vi) {
    *mi = beta1 * m[i] + (1.0f - beta1) * gi;
    *vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = *mi;
    v[i] = *vi;
}

// A training step decided on the device (no host wait; the trainer reads the record on its next
// logging step). `rec` is the step's record: rec[0..2] the gradient's Σg² as a double (written
// by sum_squares_f32), then the gate this kernel writes: applied (1 or 0), the clipping
// factor, lr / (1 − β1ᵗ) and 1 / √(1 − β2ᵗ) — each computed in double exactly as the host's
// path does (the bias corrections' powers by repeated squaring, as Rust's powi), then
// rounded to f32 once. A non-finite gradient norm leaves t and everything else untouched.
// One thread.
__device__ double adamw_powi(double a, i64 b) {
    double r = 1.0;
    for (;;) {
        if (b & 1) r *= a;
        b /= 2;
        if (b == 0) break;
        a *= a;
    }
    return r;
}
// The part every optimizer's gate shares: a non-finite gradient norm closes the gate (gate[0] =
// 0, t untouched) and returns 0; else gate[0] = 1, gate[1] = the clipping factor, t counts the
// step (null: an optimizer that keeps no count), and the step's number is returned.
__device__ i64 step_gate(float* rec, double max_norm, i64* t) {
    const double norm = sqrt(*(const double*)rec);
    float* gate = rec + 2;
    if (!(norm - norm == 0.0)) {  // NaN or ±inf
        gate[0] = 0.0f;
        return 0;
    }
    double coef = 1.0;
    if (max_norm > 0.0 && max_norm / (norm + 1e-6) < 1.0) coef = max_norm / (norm + 1e-6);
    const i64 step = (t ? *t : 0) + 1;
    if (t) *t = step;
    gate[0] = 1.0f;
    gate[1] = (float)coef;
    return step;
}

// lrs: the step's learning rate and decay, written by the host before the step (device memory,
// so a CUDA graph of the step reads each step's).
extern "C" __global__ void adamw_gate(float* rec, double max_norm, const double* lrs, double beta1, double beta2, i64* t) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const i64 step = step_gate(rec, max_norm, t);
    if (step == 0) return;
    float* gate = rec + 2;
    const double bc1 = 1.0 - adamw_powi(beta1, step), bc2 = 1.0 - adamw_powi(beta2, step);
    gate[2] = (float)(lrs[0] / bc1);
    gate[3] = (float)(1.0 / sqrt(bc2));
}

// rec: the step's record after adamw_gate — nothing when its gate is closed, the gradient times
// the clipping factor (as the host path's in-place scaling, an f32 product; skipped below 1 as
// there), step size and bias correction from the gate — or null for a step the host decided
// (its scalars in s). lrs: with rec, the gate's (the decay is its second value, the f32 the host
// would pass in s).
extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, const float* seg_scale, const i64* table, i64 nchunks,
                                     AdamWStep s, const float* rec, bf16_t* p16, const double* lrs) {
    float coef = 1.0f, step_size = s.step_size, inv_sqrt_bc2 = s.inv_sqrt_bc2, decay = s.decay;
    if (rec) {
        decay = (float)lrs[1];
        const float* gate = rec + 2;
        if (gate[0] == 0.0f) return;
        coef = gate[1];
        step_size = gate[2];
        inv_sqrt_bc2 = gate[3];
    }
    const Chunk* chunks = (const Chunk*)table;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const Chunk ch = chunks[c];
        // The host's per-element products: p·(1 − decay·ds), step·ls (ls = 1: step exactly).
        const float keep = 1.0f - decay * seg_scale[2 * ch.seg];
        const float step = step_size * seg_scale[2 * ch.seg + 1];
        for (i64 i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
            float mi, vi;
            const float gi = coef < 1.0f ? g[i] * coef : g[i];
            adam_moments(m, v, gi, s.beta1, s.beta2, i, &mi, &vi);
            const float np = p[i] * keep - step * mi / (sqrtf(vi) * inv_sqrt_bc2 + s.eps);
            p[i] = np;
            if (p16) p16[i] = f32_to_bf16(np);
        }
    }
}

// SGD's gate, for a step decided on the device: adamw_gate's non-finite check and clipping
// factor (gate[0], gate[1]); gate[2] is 1 on the first applied step (the momentum buffer then
// starts as the gradient, as torch's), else 0. t counts the applied steps. One thread.
extern "C" __global__ void sgd_gate(float* rec, double max_norm, i64* t) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const i64 step = step_gate(rec, max_norm, t);
    if (step == 0) return;
    float* gate = rec + 2;
    gate[2] = step == 1 ? 1.0f : 0.0f;
}

// rec: the step's record after sgd_gate — nothing when its gate is closed, the gradient times
// the clipping factor (the host path's in-place f32 product, skipped below 1 as there), `first`
// from the gate, the learning rate from lrs[0] (rounded to f32 as the host rounds it) — or null
// for a step the host decided (its scalars in s).
extern "C" __global__ void sgd_f32(float* p, const float* g, float* buf, const float* seg_scale, const i64* table, i64 nchunks, SgdStep s,
                                   const float* rec, const double* lrs, bf16_t* p16) {
    float coef = 1.0f, base_lr = s.lr;
    bool first = s.first;
    if (rec) {
        const float* gate = rec + 2;
        if (gate[0] == 0.0f) return;
        coef = gate[1];
        first = gate[2] != 0.0f;
        base_lr = (float)lrs[0];
    }
    const Chunk* chunks = (const Chunk*)table;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const Chunk ch = chunks[c];
        // The host's per-element products: (wd·ds)·p, lr·ls.
        const float wd = s.weight_decay * seg_scale[2 * ch.seg];
        const float lr = base_lr * seg_scale[2 * ch.seg + 1];
        for (i64 i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
            const float gi = coef < 1.0f ? g[i] * coef : g[i];
            float d = gi + wd * p[i];
            if (s.momentum != 0.0f) {
                const float b = first ? d : s.momentum * buf[i] + (1.0f - s.dampening) * d;
                buf[i] = b;
                d = s.nesterov ? d + s.momentum * b : b;
            }
            const float np = p[i] - lr * d;
            p[i] = np;
            if (p16) p16[i] = f32_to_bf16(np);
        }
    }
}

// A step of SOAP, LAMB or LARS decided on the device reads its gate from the step's record `rec`
// (null: a step the host decided, its scalars in s): nothing happens when the gate is closed,
// and the gradient is taken times the clipping factor (the host path's in-place f32 product,
// skipped below 1 as there) wherever it is read, its norm included.
__device__ __forceinline__ float clipped(const float* g, i64 i, float coef) {
    return coef < 1.0f ? g[i] * coef : g[i];
}
__device__ __forceinline__ bool gate_closed(const float* rec) {
    return rec && rec[2] == 0.0f;
}
__device__ __forceinline__ float gate_coef(const float* rec) {
    return rec && rec[2] != 0.0f ? rec[3] : 1.0f;
}

// SOAP's gate, for a step decided on the device: step_gate's check, clipping factor and count,
// then the step size lr·√(1 − β2ᵗ)/(1 − β1ᵗ) (lr without bias correction) computed in double as
// the host computes it, kept as a double in gate[2..4] (rec + 4: 8-byte aligned). lr is lrs[0],
// the optimizer's staged cell (a CUDA graph uploads it before each replay). Never a basis
// refresh step: the host takes those. One thread.
extern "C" __global__ void soap_gate(float* rec, double max_norm, const double* lrs, double beta1, double beta2, int correct_bias, i64* t) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const i64 step = step_gate(rec, max_norm, t);
    if (step == 0) return;
    const double lr = lrs[0];
    *(double*)(rec + 4) = correct_bias ? lr * (sqrt(1.0 - adamw_powi(beta2, step)) / (1.0 - adamw_powi(beta1, step))) : lr;
}

// The gradient clipped in place as the host path clips it (the f32 product, skipped below 1)
// by the factor of rec's gate; nothing when the gate is closed (the step does nothing).
extern "C" __global__ void gate_clip_f32(float* g, i64 n, const float* rec) {
    if (gate_closed(rec)) return;
    const float coef = gate_coef(rec);
    if (coef >= 1.0f) return;
    GRID_STRIDE(i, n) { g[i] *= coef; }
}

// SOAP on one parameter's device buffers (n elements), as dptrain-optim's host loop does it. rec:
// a step decided on the device (soap_gate's record: nothing happens when its gate is closed) or
// null for a step the host decided. The moments, both in the eigenbasis (gp is the projected
// gradient),
extern "C" __global__ void soap_moments_f32(const float* gp, float* m, float* v, i64 n, float w1, float w2, const float* rec) {
    if (gate_closed(rec)) return;
    GRID_STRIDE(i, n) {
        m[i] += w1 * (gp[i] - m[i]);
        v[i] += w2 * (gp[i] * gp[i] - v[i]);
    }
}

// the Adam ratio in the eigenbasis,
extern "C" __global__ void soap_ratio_f32(const float* mp, const float* v, float* out, i64 n, float eps) {
    GRID_STRIDE(i, n) {
        out[i] = mp[i] / (sqrtf(v[i]) + eps);
    }
}

// the update, then the decay (keep = 1 − lr·wd, after the update as the reference); with rec
// the step size is the gate's times this parameter's learning-rate multiplier `scale`, rounded
// to f32 as the host rounds it (else `step`), and keep is *keep_at (the f32 the host computed,
// staged with the learning rate) when given; with sumsq (normalize_grads: Σu², a double on the
// device) u is divided by its RMS first, 1/(1e-30 + √(Σu²/n)) computed in double and rounded
// to f32 as the host path does,
extern "C" __global__ void soap_apply_f32(float* p, const float* u, i64 n, float step, float keep, bf16_t* p16, const float* rec,
                                          double scale, const double* sumsq, const double* keep_at) {
    if (gate_closed(rec)) return;
    if (rec) step = (float)(*(const double*)(rec + 4) * scale);
    if (keep_at) keep = (float)*keep_at;
    const float inv = sumsq ? (float)(1.0 / (1e-30 + sqrt(*sumsq / (double)(n > 1 ? n : 1)))) : 1.0f;
    GRID_STRIDE(i, n) {
        const float ui = sumsq ? u[i] * inv : u[i];
        const float np = (p[i] - step * ui) * keep;
        p[i] = np;
        if (p16) p16[i] = f32_to_bf16(np);
    }
}

// and a factor's statistics: gg ← gg + w·(gram − gg) in place (gram: the gradient's Gram matrix
// along that factor's mode).
extern "C" __global__ void soap_statistics_f32(float* gg, const float* gram, i64 n, float w, const float* rec) {
    if (gate_closed(rec)) return;
    GRID_STRIDE(i, n) { gg[i] += w * (gram[i] - gg[i]); }
}

// Per-tensor norms and the trust-ratio optimizers (LAMB, LARS). The flat buffer is cut into
// chunks that never cross a parameter's boundary (`table`: nchunks Chunk records, then
// nseg + 1 offsets of each parameter's first chunk); one block reduces a chunk at a time, the
// chunk partials are summed per parameter in order, in double — one launch each, and bitwise
// the same result on every run and every rank.
struct LambStep { float beta1, beta2, eps, c1, inv_sqrt_bc2, weight_decay, lr, clamp, indep_decay; };
struct LarsStep { float lr, weight_decay, momentum, dampening, trust_coefficient; bool nesterov; };

// LAMB's gate: step_gate's check, clipping factor and count, then the bias corrections as the
// host computes them in double (gate[2] = 1/(1 − β1ᵗ), gate[3] = √(1/(1 − β2ᵗ)); both 1
// without correction), rounded to f32 once. One thread.
extern "C" __global__ void lamb_gate(float* rec, double max_norm, double beta1, double beta2, int correct_bias, i64* t) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const i64 step = step_gate(rec, max_norm, t);
    if (step == 0) return;
    float* gate = rec + 2;
    gate[2] = correct_bias ? (float)(1.0 / (1.0 - adamw_powi(beta1, step))) : 1.0f;
    gate[3] = correct_bias ? (float)sqrt(1.0 / (1.0 - adamw_powi(beta2, step))) : 1.0f;
}

// LARS's gate: step_gate's check and clipping factor (LARS keeps no step count). One thread.
extern "C" __global__ void lars_gate(float* rec, double max_norm) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    step_gate(rec, max_norm, 0);
}

// partial[2c], partial[2c + 1] = Σx², Σy² over chunk c; y is a gradient clipped by the gate of
// `rec` when rec is not null.
extern "C" __global__ void seg_sumsq_f32(const float* x, const float* y, const i64* table, i64 nchunks, float* partial, const float* rec) {
    const Chunk* chunks = (const Chunk*)table;
    const float coef = gate_coef(rec);
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const Chunk ch = chunks[c];
        float a = 0.0f, b = 0.0f;
        for (i64 i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
            a += x[i] * x[i];
            const float yi = clipped(y, i, coef);
            b += yi * yi;
        }
        a = block_sum(a);
        b = block_sum(b);
        if (threadIdx.x == 0) {
            partial[2 * c] = a;
            partial[2 * c + 1] = b;
        }
    }
}

// norms[2s], norms[2s + 1] = ‖x‖, ‖y‖ over parameter s.
extern "C" __global__ void seg_norms_f32(const float* partial, const i64* table, i64 nchunks, i64 nseg, float* norms) {
    const i64* first = table + 4 * nchunks;
    GRID_STRIDE(s, nseg) {
        double a = 0.0, b = 0.0;
        for (i64 c = first[s]; c < first[s + 1]; ++c) {
            a += (double)partial[2 * c];
            b += (double)partial[2 * c + 1];
        }
        norms[2 * s] = (float)sqrt(a);
        norms[2 * s + 1] = (float)sqrt(b);
    }
}

// The training probes' per-tensor sums over chunk c (then finished by seg_norms_f32, which
// takes the square roots): mode 0 (Σa², Σb²); mode 1 (Σ(a − b)², Σb²) — a change and what it is
// measured against; mode 2, Adam moments a = m, b = v with bias corrections c1, c2:
// (#{√(v·c2) < ε}, Σ(m·c1 / (√(v·c2) + ε))²).
extern "C" __global__ void seg_probe_f32(const float* a, const float* b, const i64* table, i64 nchunks, int mode, float c1, float c2, float eps,
                                         float* partial) {
    const Chunk* chunks = (const Chunk*)table;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const Chunk ch = chunks[c];
        float x = 0.0f, y = 0.0f;
        for (i64 i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
            if (mode == 0) {
                x += a[i] * a[i];
                y += b[i] * b[i];
            } else if (mode == 1) {
                const float d = a[i] - b[i];
                x += d * d;
                y += b[i] * b[i];
            } else {
                const float r = sqrtf(b[i] * c2);
                x += r < eps ? 1.0f : 0.0f;
                const float u = a[i] * c1 / (r + eps);
                y += u * u;
            }
        }
        x = block_sum(x);
        y = block_sum(y);
        if (threadIdx.x == 0) {
            partial[2 * c] = x;
            partial[2 * c + 1] = y;
        }
    }
}

// LAMB, first pass: the moments and the Adam direction with coupled decay,
// r = m·c1 / (√v·inv_sqrt_bc2 + ε) + λ·decay_scale·p (c1 = inv_sqrt_bc2 = 1 without bias
// correction; from lamb_gate's record on a step decided on the device).
extern "C" __global__ void lamb_moments_f32(const float* p, const float* g, float* m, float* v, float* r, const float* seg_scale,
                                            const i64* table, i64 nchunks, LambStep s, const float* rec) {
    if (gate_closed(rec)) return;
    const float coef = gate_coef(rec);
    const float c1 = rec ? rec[4] : s.c1, inv_sqrt_bc2 = rec ? rec[5] : s.inv_sqrt_bc2;
    const Chunk* chunks = (const Chunk*)table;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const Chunk ch = chunks[c];
        const float wd = s.weight_decay * seg_scale[2 * ch.seg];  // the host's (wd·ds)·p
        for (i64 i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
            float mi, vi;
            adam_moments(m, v, clipped(g, i, coef), s.beta1, s.beta2, i, &mi, &vi);
            r[i] = mi * c1 / (sqrtf(vi) * inv_sqrt_bc2 + s.eps) + wd * p[i];
        }
    }
}

// LAMB, second pass: p ← p·(1 − indep_decay·decay_scale) − lr·trust·r with
// trust = min(‖p‖, clamp) / (‖r‖ + ε), 1 when a norm is 0 (indep_decay is 0 unless the decay is
// independent). With rec, lr and indep_decay come from lrs (the f32 values the host would pass).
extern "C" __global__ void lamb_apply_f32(float* p, const float* r, const float* seg_scale, const i64* table, i64 nchunks,
                                          const float* norms, LambStep s, const float* rec, const double* lrs, bf16_t* p16) {
    if (gate_closed(rec)) return;
    if (rec) {
        s.lr = (float)lrs[0];
        s.indep_decay = (float)lrs[1];
    }
    const Chunk* chunks = (const Chunk*)table;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const Chunk ch = chunks[c];
        const float wn = fminf(norms[2 * ch.seg], s.clamp), rn = norms[2 * ch.seg + 1];
        const float trust = (wn == 0.0f || rn == 0.0f) ? 1.0f : wn / (rn + s.eps);
        const float keep = 1.0f - s.indep_decay * seg_scale[2 * ch.seg], lr = s.lr * seg_scale[2 * ch.seg + 1];
        for (i64 i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
            const float np = p[i] * keep - lr * trust * r[i];
            p[i] = np;
            if (p16) p16[i] = f32_to_bf16(np);
        }
    }
}

// LARS on norms[2s] = ‖p‖, norms[2s + 1] = ‖g‖: matrices take d = trust·(g + λp) with
// trust = tc·‖p‖ / (‖g‖ + λ‖p‖) (1 when ‖p‖ or the denominator is 0); vectors plain d = g.
// Then momentum (buffer starts at zero) and p ← p − lr·d. With rec (lars_gate's), the gradient
// is clipped and the learning rate comes from lrs[0].
extern "C" __global__ void lars_apply_f32(float* p, const float* g, float* buf, const float* seg_scale, const i64* table, i64 nchunks,
                                          const float* norms, LarsStep s, const float* rec, const double* lrs, bf16_t* p16) {
    if (gate_closed(rec)) return;
    const float coef = gate_coef(rec);
    if (rec) s.lr = (float)lrs[0];
    const Chunk* chunks = (const Chunk*)table;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const Chunk ch = chunks[c];
        const float pn = norms[2 * ch.seg], gn = norms[2 * ch.seg + 1];
        const float wd = s.weight_decay * seg_scale[2 * ch.seg], lr = s.lr * seg_scale[2 * ch.seg + 1];
        for (i64 i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
            float d = clipped(g, i, coef);
            if (ch.matrix) {
                const float den = gn + wd * pn;
                const float trust = (pn > 0.0f && den > 0.0f) ? s.trust_coefficient * pn / den : 1.0f;
                d = (d + wd * p[i]) * trust;
            }
            if (s.momentum != 0.0f) {
                const float b = s.momentum * buf[i] + (1.0f - s.dampening) * d;
                buf[i] = b;
                d = s.nesterov ? d + s.momentum * b : b;
            }
            const float np = p[i] - lr * d;
            p[i] = np;
            if (p16) p16[i] = f32_to_bf16(np);
        }
    }
}
