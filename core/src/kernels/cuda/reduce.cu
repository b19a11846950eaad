// Reductions over packed [rows, cols] views: row sums (one block per row), column sums (one
// thread per column, rows walked in order — coalesced; the bias-gradient pattern), and the sum
// of squares for the global gradient norm (block partials accumulated in double).

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

extern "C" __global__ void sum_squares_f32(const float* x, double* out, i64 n) {
    float acc = 0.0f;
    GRID_STRIDE(i, n) { acc += x[i] * x[i]; }
    acc = block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(out, (double)acc);
}
