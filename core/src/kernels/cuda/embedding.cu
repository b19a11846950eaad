// Embedding lookup (row gather) and its backward (scatter-add with atomics into a zeroed table).

extern "C" __global__ void embedding_fwd_f32(const float* w, const unsigned int* ids, float* out, i64 n, i64 dim) {
    GRID_STRIDE(i, n * dim) { out[i] = w[(i64)ids[i / dim] * dim + i % dim]; }
}

extern "C" __global__ void embedding_bwd_f32(const float* g, const unsigned int* ids, float* gw, i64 n, i64 dim) {
    GRID_STRIDE(i, n * dim) { atomicAdd(gw + (i64)ids[i / dim] * dim + i % dim, g[i]); }
}
