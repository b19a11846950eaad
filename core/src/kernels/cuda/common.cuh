// Shared helpers for dptrain's CUDA kernels (prepended to every source before NVRTC compiles it).
// f32 everywhere; bf16 is handled as raw 16-bit storage with explicit round-to-nearest-even.
typedef unsigned short bf16_t;
typedef long long i64;
// NVRTC has no <math.h>: INFINITY is spelled out.
#define DPT_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                          // round to nearest even
    return (bf16_t)(u >> 16);
}

// Sum and max over a warp (all 32 lanes), every lane getting the result: a butterfly, so the
// order of the adds is fixed.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[32];
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    return warp_sum(lane < nwarps ? warp_sums[lane] : 0.0f);
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float warp_maxes[32];
    v = warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) warp_maxes[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    return warp_max(lane < nwarps ? warp_maxes[lane] : -DPT_INF);
}

// Counter-based draws, bit for bit those of core/src/rng.rs (mix64, draw): dropout masks are
// regenerated from (key, element index) instead of stored, and match the CPU's exactly.
typedef unsigned long long u64_t;
__device__ __forceinline__ u64_t dpt_mix64(u64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
__device__ __forceinline__ u64_t dpt_draw(u64_t key, u64_t i) {
    return dpt_mix64(key + i * 0x9E3779B97F4A7C15ULL);
}
// rng::key_of(&[a, b]).
__device__ __forceinline__ u64_t dpt_key_of2(u64_t a, u64_t b) {
    const u64_t k = dpt_mix64(0x6A09E667F3BCC909ULL ^ dpt_mix64(a + 0x9E3779B97F4A7C15ULL));
    return dpt_mix64(k ^ dpt_mix64(b + 0x9E3779B97F4A7C15ULL));
}
// A dropout mask's key. Without `step_key` it is `key`, a kernel argument. A step replayed as a
// CUDA graph keeps its kernel arguments, so there the micro-step's tape key lives in device
// memory, staged before each replay, `key` is the dropout site, and the mask's key is
// rng::key_of(&[*step_key, site]): what Dropout::site computes on the host.
__device__ __forceinline__ i64 dpt_mask_key(const u64_t* step_key, i64 key) {
    return step_key ? (i64)dpt_key_of2(*step_key, (u64_t)key) : key;
}
// Element i survives dropout when the top 32 bits of its draw reach the threshold p·2^32.
__device__ __forceinline__ bool dpt_keep(i64 key, i64 i, i64 threshold) {
    return (i64)(dpt_draw((u64_t)key, (u64_t)i) >> 32) >= threshold;
}

// 16-byte loads and stores: eight bf16 or four f32 per instruction. A memory-bound kernel over a
// wide tensor uses them where its addresses allow (dpt_aligned16): a GPU keeps its bandwidth
// only with enough bytes in flight per SM, and a 2-byte load per thread and iteration brings an
// eighth of what a 16-byte one does. A misaligned address faults on a GPU; the emulator checks.
__device__ __forceinline__ bool dpt_aligned16(const void* p) { return ((u64_t)p & 15) == 0; }
#if defined(DPT_EMU)
__device__ __forceinline__ uint4 dpt_ld16(const void* p) { return emu_ld16(p); }
__device__ __forceinline__ void dpt_st16(void* p, uint4 v) { emu_st16(p, v); }
#else
__device__ __forceinline__ uint4 dpt_ld16(const void* p) { return *(const uint4*)p; }
__device__ __forceinline__ void dpt_st16(void* p, uint4 v) { *(uint4*)p = v; }
#endif
// Four f32 by one 16-byte load or store.
__device__ __forceinline__ void dpt_ld4(const float* p, float* f) {
    const uint4 w = dpt_ld16(p);
    f[0] = __uint_as_float(w.x);
    f[1] = __uint_as_float(w.y);
    f[2] = __uint_as_float(w.z);
    f[3] = __uint_as_float(w.w);
}
__device__ __forceinline__ void dpt_st4(float* p, const float* f) {
    uint4 w;
    w.x = __float_as_uint(f[0]);
    w.y = __float_as_uint(f[1]);
    w.z = __float_as_uint(f[2]);
    w.w = __float_as_uint(f[3]);
    dpt_st16(p, w);
}
// The eight bf16 of a 16-byte word (the lower address first), widened; and eight f32 rounded
// into one (f32_to_bf16 each: the scalar kernels' bits).
__device__ __forceinline__ void dpt_unpack8(uint4 w, float* f) {
    const unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = __uint_as_float(u[k] << 16);
        f[2 * k + 1] = __uint_as_float(u[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ uint4 dpt_pack8(const float* f) {
    unsigned u[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) u[k] = (unsigned)f32_to_bf16(f[2 * k]) | ((unsigned)f32_to_bf16(f[2 * k + 1]) << 16);
    uint4 w;
    w.x = u[0];
    w.y = u[1];
    w.z = u[2];
    w.w = u[3];
    return w;
}

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)
