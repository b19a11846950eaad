// Reductions over packed [rows, cols] views: row sums (one block per row), column sums (one
// thread per column, rows walked in order — coalesced; the bias-gradient pattern), and the sum
// of squares for the global gradient norm (block partials in double, summed in block order: no
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

// out[0] = the sum of parts[0..n) in index order (one thread: n is at most 1024 block partials).
extern "C" __global__ void sum_parts_f64(const double* parts, double* out, i64 n) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double s = 0.0;
        for (i64 i = 0; i < n; ++i) s += parts[i];
        out[0] = s;
    }
}
