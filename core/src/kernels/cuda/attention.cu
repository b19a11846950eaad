// Pieces of the fused causal attention core around cuBLAS's batched GEMMs:
// head split/merge between the packed qkv [B, T, 3C] / output [B, T, C] layouts and per-head
// [B·H, T, D] blocks, and the causal softmax on the score matrices [B·H, T, T] (one block per
// row; masked positions written as 0; the row max of unmasked logits reported for the
// max-attention-logit probe) with its backward dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale.

extern "C" __global__ void split_heads_f32(const float* qkv, float* q, float* k, float* v, i64 b, i64 t, i64 h, i64 d) {
    const i64 c = h * d, n = b * t * c;
    GRID_STRIDE(i, n) {
        const i64 j = i % d, hh = (i / d) % h, tt = (i / c) % t, bb = i / (t * c);
        const i64 src = (bb * t + tt) * 3 * c + hh * d + j;
        const i64 dst = ((bb * h + hh) * t + tt) * d + j;
        q[dst] = qkv[src];
        k[dst] = qkv[src + c];
        v[dst] = qkv[src + 2 * c];
    }
}

extern "C" __global__ void merge_heads_f32(const float* o, float* y, i64 b, i64 t, i64 h, i64 d) {
    const i64 c = h * d, n = b * t * c;
    GRID_STRIDE(i, n) {
        const i64 j = i % d, hh = (i / d) % h, tt = (i / c) % t, bb = i / (t * c);
        y[i] = o[((bb * h + hh) * t + tt) * d + j];
    }
}

// Inverse of split_heads for gradients: dq, dk, dv [B·H, T, D] -> dqkv [B, T, 3C].
extern "C" __global__ void join_heads_f32(const float* dq, const float* dk, const float* dv, float* dqkv, i64 b, i64 t, i64 h, i64 d) {
    const i64 c = h * d, n = b * t * c;
    GRID_STRIDE(i, n) {
        const i64 j = i % d, hh = (i / d) % h, tt = (i / c) % t, bb = i / (t * c);
        const i64 src = ((bb * h + hh) * t + tt) * d + j;
        const i64 dst = (bb * t + tt) * 3 * c + hh * d + j;
        dqkv[dst] = dq[src];
        dqkv[dst + c] = dk[src];
        dqkv[dst + 2 * c] = dv[src];
    }
}

// Same as merge_heads but from [B, T, C] gradients into [B·H, T, D] blocks.
extern "C" __global__ void unmerge_heads_f32(const float* y, float* o, i64 b, i64 t, i64 h, i64 d) {
    const i64 c = h * d, n = b * t * c;
    GRID_STRIDE(i, n) {
        const i64 j = i % d, hh = (i / d) % h, tt = (i / c) % t, bb = i / (t * c);
        o[((bb * h + hh) * t + tt) * d + j] = y[i];
    }
}

// s: scores already scaled by 1/sqrt(d), rows of length t; in place -> probabilities.
extern "C" __global__ void causal_softmax_fwd_f32(float* s, float* row_max, i64 rows, i64 t) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const i64 i = r % t;  // query position: keys 0..=i are visible
        float* sr = s + r * t;
        float m = -DPT_INF;
        for (i64 j = threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, sr[j]);
        m = block_max(m);
        float sum = 0.0f;
        for (i64 j = threadIdx.x; j <= i; j += blockDim.x) sum += expf(sr[j] - m);
        sum = block_sum(sum);
        const float inv = 1.0f / sum;
        for (i64 j = threadIdx.x; j < t; j += blockDim.x) sr[j] = j <= i ? expf(sr[j] - m) * inv : 0.0f;
        if (threadIdx.x == 0) row_max[r] = m;
    }
}

// dp: dP on entry, dS (already multiplied by the score scale) on exit.
extern "C" __global__ void causal_softmax_bwd_f32(const float* p, float* dp, i64 rows, i64 t, float scale) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const i64 i = r % t;
        const float* pr = p + r * t;
        float* dr = dp + r * t;
        float dot = 0.0f;
        for (i64 j = threadIdx.x; j <= i; j += blockDim.x) dot += pr[j] * dr[j];
        dot = block_sum(dot);
        for (i64 j = threadIdx.x; j < t; j += blockDim.x) dr[j] = j <= i ? pr[j] * (dr[j] - dot) * scale : 0.0f;
    }
}
