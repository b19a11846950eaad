// Reductions over packed [rows, cols] views: row sums (one block per row), column sums (one
// thread per column, rows walked in order — coalesced; the bias-gradient pattern), and the sum
// of squares for the global gradient norm (block partials in double, summed in a fixed order: no
// atomics, so the norm — and the clipping it decides — is the same run to run).

extern "C" __global__ void sum_rows_f32(const float* x, float* out, i64 rows, i64 cols) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        float acc = 0.0f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) acc += x[r * cols + c];
        acc = block_sum(acc);
        if (threadIdx.x == 0) out[r] = acc;
    }
}

extern "C" __global__ void sum_cols_f32(const float* x, float* out, i64 rows, i64 cols) {
    GRID_STRIDE(c, cols) {
        float acc = 0.0f;
        for (i64 r = 0; r < rows; ++r) acc += x[r * cols + c];
        out[c] = acc;
    }
}

extern "C" __global__ void sum_squares_f32(const float* x, double* parts, i64 n) {
    float acc = 0.0f;
    GRID_STRIDE(i, n) { acc += x[i] * x[i]; }
    acc = block_sum(acc);
    if (threadIdx.x == 0) parts[blockIdx.x] = (double)acc;
}

// out[0] = the sum of parts[0..n): each thread sums a fixed stride of them, then a fixed tree
// over the block (blockDim a power of two, at most 1024) — the same order every run.
extern "C" __global__ void sum_parts_f64(const double* parts, double* out, i64 n) {
    __shared__ double part[1024];
    if (blockIdx.x != 0) return;
    double acc = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) acc += parts[i];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = part[0];
}
