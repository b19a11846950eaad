// Activation statistics for the training probes (dptrain-core ops::stats), reduced on the device
// so that a probe step downloads a few numbers per tensor instead of the activation. Every
// result is exact and independent of the launch configuration: maxima, integer counts, and the
// histograms of a radix select — the same numbers the host computes.

#define STATS_CHUNK 65536

// Per chunk c (STATS_CHUNK elements): the largest |x| and the lowest index that holds it (NaN
// never wins, as on the host; an all-NaN chunk gives -inf at index n).
extern "C" __global__ void abs_argmax_f32(const float* x, i64 n, i64 nchunks, float* best, i64* at) {
    __shared__ i64 lowest[1024];
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const i64 start = c * STATS_CHUNK, end = start + STATS_CHUNK < n ? start + STATS_CHUNK : n;
        float b = -DPT_INF;
        i64 bi = n;
        for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float a = fabsf(x[i]);
            if (a > b) {
                b = a;
                bi = i;
            }
        }
        const float m = block_max(b);
        lowest[threadIdx.x] = b == m ? bi : n;
        __syncthreads();
        for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s && lowest[threadIdx.x + s] < lowest[threadIdx.x]) lowest[threadIdx.x] = lowest[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            best[c] = m;
            at[c] = lowest[0];
        }
        __syncthreads();
    }
}

// Per chunk c: how many entries are ≤ threshold (compared in double, as the host; exact in f32
// below 2^24).
extern "C" __global__ void count_at_most_f32(const float* x, i64 n, i64 nchunks, double threshold, float* count) {
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const i64 start = c * STATS_CHUNK, end = start + STATS_CHUNK < n ? start + STATS_CHUNK : n;
        float k = 0.0f;
        for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) k += (double)x[i] <= threshold ? 1.0f : 0.0f;
        k = block_sum(k);
        if (threadIdx.x == 0) count[c] = k;
    }
}

// One pass of a radix select over the bit patterns of |x| (ordered as the values are, NaN above
// +inf as in total_cmp): among the entries whose bits match `prefix` under `mask`, the histogram
// of the 8 bits at `shift`, added into hist[256] (zeroed by the caller).
extern "C" __global__ void abs_radix_hist_f32(const float* x, i64 n, unsigned prefix, unsigned mask, int shift, unsigned* hist) {
    __shared__ unsigned local[256];
    for (int t = threadIdx.x; t < 256; t += blockDim.x) local[t] = 0u;
    __syncthreads();
    GRID_STRIDE(i, n) {
        const unsigned bits = __float_as_uint(x[i]) & 0x7fffffffu;
        if ((bits & mask) == prefix) atomicAdd(&local[(bits >> shift) & 255u], 1u);
    }
    __syncthreads();
    for (int t = threadIdx.x; t < 256; t += blockDim.x) {
        if (local[t]) atomicAdd(&hist[t], local[t]);
    }
}

// Rows of row_len values whose first nseg segments of seg_len values are looked at: each
// segment's largest L2 norm over the rows, as the bits of a double (atomicMax on the bits orders non-negative doubles; NaN
// norms are skipped, as the host's f64::max does). The sum of squares runs in order, in double,
// without contraction into FMA: the host's number, bit for bit. out[nseg] is zeroed by the
// caller.
extern "C" __global__ void segment_norm_max_f32(const float* x, i64 rows, int row_len, int seg_len, int nseg, unsigned long long* out) {
    GRID_STRIDE(i, rows * nseg) {
        const i64 r = i / nseg;
        const int s = (int)(i % nseg);
        const float* v = x + r * row_len + (i64)s * seg_len;
        double acc = 0.0;
        for (int j = 0; j < seg_len; ++j) {
            const double a = (double)v[j];
            acc = __dadd_rn(acc, __dmul_rn(a, a));
        }
        const double norm = sqrt(acc);
        if (norm == norm) atomicMax(&out[s], (unsigned long long)__double_as_longlong(norm));
    }
}
