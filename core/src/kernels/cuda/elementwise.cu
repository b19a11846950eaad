// Elementwise kernels: broadcasting binary ops in the engine's two fast patterns (same shape,
// or an operand repeating every `na`/`nb` elements — the bias-add pattern; the CPU path's general
// broadcast goes through a strided copy first), pointwise maps and their backward passes, fills,
// accumulation, strided copies for non-contiguous views, and bf16 casts.

#define BINARY(name, expr)                                                                        \
extern "C" __global__ void name(const float* a, const float* b, float* out, i64 n, i64 na, i64 nb) { \
    GRID_STRIDE(i, n) { const float x = a[i % na]; const float y = b[i % nb]; out[i] = (expr); }   \
}
BINARY(add_f32, x + y)
BINARY(sub_f32, x - y)
BINARY(mul_f32, x * y)
BINARY(div_f32, x / y)

#define UNARY(name, expr) \
extern "C" __global__ void name(const float* in, float* out, i64 n) { GRID_STRIDE(i, n) { const float x = in[i]; out[i] = (expr); } }
UNARY(exp_f32, expf(x))
UNARY(log_f32, logf(x))
UNARY(tanh_f32, tanhf(x))
UNARY(relu_f32, fmaxf(x, 0.0f))
UNARY(square_f32, x * x)

extern "C" __global__ void affine_f32(const float* in, float* out, i64 n, float mul, float add) {
    GRID_STRIDE(i, n) { out[i] = in[i] * mul + add; }
}

// Inverted dropout with a mask regenerated from (key, index); also its own backward. The key:
// `key`, or from the step's key in device memory (see dpt_mask_key).
extern "C" __global__ void dropout_f32(const float* in, float* out, i64 n, const u64_t* step_key, i64 key, i64 threshold, float scale) {
    key = dpt_mask_key(step_key, key);
    GRID_STRIDE(i, n) { out[i] = dpt_keep(key, i, threshold) ? in[i] * scale : 0.0f; }
}

// A residual plus the inverted dropout of x, in one pass (GPT's residual adds under dropout):
// the mask is dropout_f32's, so out = res + dropout_f32(x) exactly.
extern "C" __global__ void dropout_add_f32(const float* x, const float* res, float* out, i64 n, const u64_t* step_key, i64 key, i64 threshold,
                                           float scale) {
    key = dpt_mask_key(step_key, key);
    GRID_STRIDE(i, n) { out[i] = res[i] + (dpt_keep(key, i, threshold) ? x[i] * scale : 0.0f); }
}

// Backward passes of the pointwise maps: g is the output gradient.
extern "C" __global__ void tanh_bwd_f32(const float* g, const float* y, float* out, i64 n) {
    GRID_STRIDE(i, n) { out[i] = g[i] * (1.0f - y[i] * y[i]); }
}
extern "C" __global__ void relu_bwd_f32(const float* g, const float* y, float* out, i64 n) {
    GRID_STRIDE(i, n) { out[i] = y[i] > 0.0f ? g[i] : 0.0f; }
}
extern "C" __global__ void square_bwd_f32(const float* g, const float* x, float* out, i64 n) {
    GRID_STRIDE(i, n) { out[i] = 2.0f * g[i] * x[i]; }
}

// GELU, exact (erf) and tanh forms, as torch.nn.functional.gelu.
#define SQRT_2_OVER_PI 0.7978845608028654f
#define INV_SQRT_2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f
__device__ __forceinline__ float gelu_of(float x, int use_tanh) {
    if (use_tanh) {
        const float u = SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    return 0.5f * x * (1.0f + erff(x * INV_SQRT_2));
}
extern "C" __global__ void gelu_f32(const float* in, float* out, i64 n, int use_tanh) {
    GRID_STRIDE(i, n) { out[i] = gelu_of(in[i], use_tanh); }
}
// GELU written in bf16: the operand of the GEMM that reads it (`gelu_linear`), no f32 copy.
extern "C" __global__ void gelu_f32_bf16(const float* in, bf16_t* out, i64 n, int use_tanh) {
    GRID_STRIDE(i, n) { out[i] = f32_to_bf16(gelu_of(in[i], use_tanh)); }
}
// GELU of a bf16 activation (a linear's bf16 output under bf16 precision), written in bf16.
extern "C" __global__ void gelu_bf16_bf16(const bf16_t* in, bf16_t* out, i64 n, int use_tanh) {
    GRID_STRIDE(i, n) { out[i] = f32_to_bf16(gelu_of(bf16_to_f32(in[i]), use_tanh)); }
}
// The same, eight elements per thread by 16-byte loads and stores (in and out 16-byte aligned),
// the last n % 8 one by one: the same bits as gelu_bf16_bf16.
extern "C" __global__ void gelu_bf16_bf16_x8(const bf16_t* in, bf16_t* out, i64 n, int use_tanh) {
    GRID_STRIDE(i, n / 8) {
        float f[8];
        dpt_unpack8(dpt_ld16(in + 8 * i), f);
#pragma unroll
        for (int k = 0; k < 8; ++k) f[k] = gelu_of(f[k], use_tanh);
        dpt_st16(out + 8 * i, dpt_pack8(f));
    }
    GRID_STRIDE(j, n % 8) { out[n / 8 * 8 + j] = f32_to_bf16(gelu_of(bf16_to_f32(in[n / 8 * 8 + j]), use_tanh)); }
}
__device__ __forceinline__ float gelu_grad_of(float x, int use_tanh) {
    if (use_tanh) {
        const float u = SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
        const float t = tanhf(u);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * 0.044715f * x * x);
    }
    return 0.5f * (1.0f + erff(x * INV_SQRT_2)) + x * expf(-0.5f * x * x) * INV_SQRT_2PI;
}
extern "C" __global__ void gelu_bwd_f32(const float* g, const float* in, float* out, i64 n, int use_tanh) {
    GRID_STRIDE(i, n) { out[i] = g[i] * gelu_grad_of(in[i], use_tanh); }
}
// The same for a bf16 activation: bf16 gradient in, bf16 gradient out (f32 arithmetic).
extern "C" __global__ void gelu_bwd_bf16(const bf16_t* g, const bf16_t* in, bf16_t* out, i64 n, int use_tanh) {
    GRID_STRIDE(i, n) { out[i] = f32_to_bf16(bf16_to_f32(g[i]) * gelu_grad_of(bf16_to_f32(in[i]), use_tanh)); }
}
// The same, eight elements per thread (g, in and out 16-byte aligned), as gelu_bf16_bf16_x8.
extern "C" __global__ void gelu_bwd_bf16_x8(const bf16_t* g, const bf16_t* in, bf16_t* out, i64 n, int use_tanh) {
    GRID_STRIDE(i, n / 8) {
        float gf[8], xf[8];
        dpt_unpack8(dpt_ld16(g + 8 * i), gf);
        dpt_unpack8(dpt_ld16(in + 8 * i), xf);
#pragma unroll
        for (int k = 0; k < 8; ++k) gf[k] *= gelu_grad_of(xf[k], use_tanh);
        dpt_st16(out + 8 * i, dpt_pack8(gf));
    }
    GRID_STRIDE(j, n % 8) {
        const i64 e = n / 8 * 8 + j;
        out[e] = f32_to_bf16(bf16_to_f32(g[e]) * gelu_grad_of(bf16_to_f32(in[e]), use_tanh));
    }
}
// out = bf16(x + bias[i % n]) with a bf16 bias: a bf16-output linear's bias when the GEMM could
// not add it (the fused epilogue's numbers: one rounding of the f32 sum).
extern "C" __global__ void add_bias_bf16(const float* x, const bf16_t* bias, bf16_t* out, i64 total, i64 n) {
    GRID_STRIDE(i, total) { out[i] = f32_to_bf16(x[i] + bf16_to_f32(bias[i % n])); }
}

extern "C" __global__ void fill_f32(float* out, i64 n, float v) { GRID_STRIDE(i, n) { out[i] = v; } }
extern "C" __global__ void scale_f32(float* x, i64 n, float s) { GRID_STRIDE(i, n) { x[i] *= s; } }
// acc += x (gradient accumulation into the flat buffer).
extern "C" __global__ void add_assign_f32(float* acc, const float* x, i64 n) { GRID_STRIDE(i, n) { acc[i] += x[i]; } }

// Packed copy of a strided view of rank ≤ 6 (dims and strides in elements, outermost first).
struct Strided6 { i64 shape[6]; i64 strides[6]; int rank; };

// Where element `i` of the packed copy lives in the view: i's digits in the view's dims (the
// innermost first) times their strides. The loop is over all six slots with constant indices,
// skipping those past the rank: indexed by a run-time dim, the shape and strides would be copied
// to local memory (a 104-byte stack frame the first GPU profile showed, read per element).
__device__ __forceinline__ i64 strided_offset(const Strided6& s, i64 i) {
    i64 off = 0;
#pragma unroll
    for (int d = 5; d >= 0; --d) {
        if (d < s.rank) {
            const i64 idx = i % s.shape[d];
            i /= s.shape[d];
            off += idx * s.strides[d];
        }
    }
    return off;
}

extern "C" __global__ void strided_copy_f32(const float* src, float* out, i64 n, i64 offset, Strided6 s) {
    GRID_STRIDE(i, n) { out[i] = src[offset + strided_offset(s, i)]; }
}

// The same for a view whose innermost dim is contiguous (stride 1; `s` describes the outer
// dims): a row of `cols` elements per block iteration, its start computed once — the kernel
// above divides by every dim for every element. Broadcasting a bias over rows (outer stride 0),
// column slices and head split/merge permutes take this path.
extern "C" __global__ void strided_rows_f32(const float* src, float* out, i64 rows, i64 cols, i64 offset, Strided6 s) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const i64 base = offset + strided_offset(s, r);
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) out[r * cols + c] = src[base + c];
    }
}

extern "C" __global__ void f32_to_bf16(const float* in, bf16_t* out, i64 n) { GRID_STRIDE(i, n) { out[i] = f32_to_bf16(in[i]); } }
// Four elements per thread (one 16-byte load, one 8-byte store) for `in` 16-byte and `out`
// 8-byte aligned: the casts of GEMM operands are memory-bound, and 2-byte stores waste half of
// each transaction. The last n % 4 elements one by one.
extern "C" __global__ void f32_to_bf16_x4(const float* in, bf16_t* out, i64 n) {
    const float4* in4 = (const float4*)in;
    uint2* out4 = (uint2*)out;
    GRID_STRIDE(i, n / 4) {
        const float4 v = in4[i];
        uint2 o;
        o.x = (unsigned)f32_to_bf16(v.x) | ((unsigned)f32_to_bf16(v.y) << 16);
        o.y = (unsigned)f32_to_bf16(v.z) | ((unsigned)f32_to_bf16(v.w) << 16);
        out4[i] = o;
    }
    GRID_STRIDE(j, n % 4) { out[n / 4 * 4 + j] = f32_to_bf16(in[n / 4 * 4 + j]); }
}
extern "C" __global__ void bf16_to_f32(const bf16_t* in, float* out, i64 n) { GRID_STRIDE(i, n) { out[i] = bf16_to_f32(in[i]); } }
