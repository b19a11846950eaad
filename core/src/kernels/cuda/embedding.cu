// Embedding lookup (row gather) and its backward, without floating-point atomics: each row's
// gradient sums its positions' gradients in position order, from 0, as the CPU does — the same
// bits run to run, and the CPU's.

extern "C" __global__ void embedding_fwd_f32(const float* w, const unsigned int* ids, float* out, i64 n, i64 dim) {
    GRID_STRIDE(i, n * dim) { out[i] = w[(i64)ids[i / dim] * dim + i % dim]; }
}

// Backward, first: the positions sorted by (id, position) — a stable LSD radix sort on the ids,
// 8 bits a pass (as many passes as the largest id needs: 2 for GPT-2's vocabulary), over chunks
// of EMB_CHUNK positions, one block each. A pass is three launches:
//   embedding_digit_counts: count[d·nchunks + c] = how many positions of chunk c have digit d;
//   embedding_digit_offsets: count's exclusive prefix sum in that (digit, chunk) order, in place;
//   embedding_digit_scatter: a position goes to offset[d·nchunks + c] plus the number of earlier
//     positions of its chunk with its digit, so equal digits keep their order (stable).
// The first pass reads the positions in order (src null), each later one the order the previous
// pass wrote. O(n·EMB_CHUNK) comparisons in shared memory and O(256·n / EMB_CHUNK) counts, where
// ranking each position against all n took n² (4.3·10⁹ at 64 × 1024 tokens per micro-batch).
// Integer counts are exact, so the order is the same on every run.
#define EMB_CHUNK 1024
#define EMB_RADIX 256

__device__ __forceinline__ unsigned emb_digit(const unsigned* ids, const int* src, i64 i, int shift) {
    return (ids[src ? (i64)src[i] : i] >> shift) & (EMB_RADIX - 1);
}

extern "C" __global__ void embedding_digit_counts(const unsigned int* ids, const int* src, unsigned int* count, i64 n, int shift) {
    __shared__ unsigned hist[EMB_RADIX];
    const i64 nchunks = (n + EMB_CHUNK - 1) / EMB_CHUNK;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        for (int d = threadIdx.x; d < EMB_RADIX; d += blockDim.x) hist[d] = 0u;
        __syncthreads();
        for (int k = threadIdx.x; k < EMB_CHUNK; k += blockDim.x) {
            const i64 i = c * EMB_CHUNK + k;
            if (i < n) atomicAdd(&hist[emb_digit(ids, src, i, shift)], 1u);  // an exact count
        }
        __syncthreads();
        for (int d = threadIdx.x; d < EMB_RADIX; d += blockDim.x) count[(i64)d * nchunks + c] = hist[d];
        __syncthreads();
    }
}

// One block (at most 1024 threads): thread k sums a contiguous stretch of count, thread 0 scans
// the stretches' sums, then each thread writes its stretch's prefix sums.
extern "C" __global__ void embedding_digit_offsets(unsigned int* count, i64 m) {
    __shared__ unsigned part[1024];
    const i64 per = (m + blockDim.x - 1) / blockDim.x, lo = threadIdx.x * per, hi = lo + per < m ? lo + per : m;
    unsigned s = 0u;
    for (i64 k = lo; k < hi; ++k) s += count[k];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned run = 0u;
        for (unsigned k = 0; k < blockDim.x; ++k) {
            const unsigned v = part[k];
            part[k] = run;
            run += v;
        }
    }
    __syncthreads();
    unsigned run = part[threadIdx.x];
    for (i64 k = lo; k < hi; ++k) {
        const unsigned v = count[k];
        count[k] = run;
        run += v;
    }
}

extern "C" __global__ void embedding_digit_scatter(const unsigned int* ids, const int* src, const unsigned int* offset, int* dst, i64 n,
                                                   int shift) {
    __shared__ unsigned char dig[EMB_CHUNK];
    const i64 nchunks = (n + EMB_CHUNK - 1) / EMB_CHUNK;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        __syncthreads();
        for (int k = threadIdx.x; k < EMB_CHUNK; k += blockDim.x) {
            const i64 i = c * EMB_CHUNK + k;
            dig[k] = i < n ? (unsigned char)emb_digit(ids, src, i, shift) : 0;
        }
        __syncthreads();
        for (int k = threadIdx.x; k < EMB_CHUNK; k += blockDim.x) {
            const i64 i = c * EMB_CHUNK + k;
            if (i >= n) break;
            const unsigned char d = dig[k];
            unsigned rank = 0u;
            for (int j = 0; j < k; ++j) rank += dig[j] == d;
            dst[offset[(i64)d * nchunks + c] + rank] = src ? src[i] : (int)i;
        }
    }
}

// Then each run of one id in that order is its row's gradient: the thread of (run start s,
// column c) sums g[·, c] over the run's positions in order and adds the sum to gw's row.
extern "C" __global__ void embedding_bwd_f32(const float* g, const unsigned int* ids, const int* order, float* gw, i64 n, i64 dim) {
    GRID_STRIDE(w, n * dim) {
        const i64 s = w / dim, c = w % dim;
        const unsigned int v = ids[order[s]];
        if (s > 0 && ids[order[s - 1]] == v) continue;
        float acc = 0.0f;
        for (i64 t = s; t < n && ids[order[t]] == v; ++t) acc += g[(i64)order[t] * dim + c];
        gw[(i64)v * dim + c] += acc;
    }
}
