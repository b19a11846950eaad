// Embedding lookup (row gather) and its backward, without atomics: each row's gradient sums its
// positions' gradients in position order, from 0, as the CPU does — the same bits run to run,
// and the CPU's.

extern "C" __global__ void embedding_fwd_f32(const float* w, const unsigned int* ids, float* out, i64 n, i64 dim) {
    GRID_STRIDE(i, n * dim) { out[i] = w[(i64)ids[i / dim] * dim + i % dim]; }
}

// Backward, first: the positions sorted by (id, position). Position i goes to its rank, the
// number of positions with a smaller id or the same id and an earlier place, counted against
// tiles of the ids in shared memory: n² comparisons, a few microseconds at GPT-2's 8192
// positions per micro-batch. (Blocks of at most 1024 threads.)
extern "C" __global__ void embedding_order(const unsigned int* ids, int* order, i64 n) {
    __shared__ unsigned int tile[1024];
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 base = (i64)blockIdx.x * blockDim.x; base < n; base += stride) {
        const i64 i = base + threadIdx.x;
        const unsigned int v = i < n ? ids[i] : 0u;
        i64 rank = 0;
        for (i64 t0 = 0; t0 < n; t0 += blockDim.x) {
            __syncthreads();
            if (t0 + threadIdx.x < n) tile[threadIdx.x] = ids[t0 + threadIdx.x];
            __syncthreads();
            const i64 m = n - t0 < (i64)blockDim.x ? n - t0 : (i64)blockDim.x;
            for (i64 k = 0; k < m; ++k) {
                const unsigned int u = tile[k];
                rank += (u < v) || (u == v && t0 + k < i);
            }
        }
        if (i < n) order[rank] = (int)i;
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
