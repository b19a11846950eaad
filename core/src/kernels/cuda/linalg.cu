// Around cuSOLVER, for the engine's dense linear algebra (ops/linalg.rs: SOAP's eigenbases). The
// engine's matrices are f32 and row-major, cuSOLVER's here f64 and column-major, so the way in
// widens and transposes (taking the columns in a given order, for a QR of re-sorted columns) and
// the way out rounds and transposes back (reversing the columns, for eigenvectors that cuSOLVER
// orders by ascending eigenvalue and SOAP by descending). Both run once per factor and basis
// refresh, O(n²) against the solver's O(n³), so they index plainly: the writes coalesce, the
// reads stride.

// out (f64, column-major n × n) = a[:, cols] + shift·I, with a f32 row-major [n, n] and cols
// null for the columns in order.
extern "C" __global__ void linalg_f64_cols(double* out, const float* a, const unsigned* cols, i64 n, double shift) {
    GRID_STRIDE(k, n * n) {
        const i64 j = k / n, i = k % n;
        const i64 src = cols ? (i64)cols[j] : j;
        const double x = (double)a[i * n + src];
        out[k] = i == j ? x + shift : x;
    }
}

// out (f32, row-major [n, n]) = q (f64, column-major n × n) rounded to nearest, its columns in
// reverse order when `reverse`.
extern "C" __global__ void linalg_f32_rows(float* out, const double* q, i64 n, int reverse) {
    GRID_STRIDE(k, n * n) {
        const i64 i = k / n, j = k % n;
        const i64 src = reverse ? n - 1 - j : j;
        out[k] = (float)q[src * n + i];
    }
}

// out[j] = Σ_i a[i, j]·b[i, j] over two f32 row-major [n, n] (diag(aᵀ·b)), each product rounded
// and summed over i in order from -0.0 (the host's sum, bit for bit: no fused multiply-add).
extern "C" __global__ void linalg_column_dots(const float* a, const float* b, float* out, i64 n) {
    GRID_STRIDE(j, n) {
        float acc = -0.0f;
        for (i64 i = 0; i < n; ++i) acc = __fadd_rn(acc, __fmul_rn(a[i * n + j], b[i * n + j]));
        out[j] = acc;
    }
}
