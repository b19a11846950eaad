// A CPU emulator for dptrain's CUDA kernels, for tests on machines without a GPU (feature
// `cuda-emu`). The kernel sources compile unchanged as C++ against this header: the CUDA
// built-ins become globals, a block's threads become cooperative contexts (ucontext) that run
// until they finish or reach a barrier, and __shfl_xor_sync is two warp barriers around a
// shared slot. A block runs warp by warp: one warp runs until each of its threads waits at
// __syncthreads (or has ended), its warp collectives (shuffles, mma, ldmatrix) meeting only its
// own lanes, then the next warp — a schedule a GPU may take, with the warps as far apart as it
// allows, so a warp that overwrites shared memory another warp has yet to read is caught (with
// cp.async's model below). Every dptrain kernel loops over its work with grid/block strides,
// so the emulator runs each launch with its own small configuration (at most 3 blocks — more
// than two, so partial sums combined in another block order would differ — of 64 threads: two
// warps, so cross-warp reductions are exercised) and the results do not depend on it — except
// kernels that split a tile among warps (flash attention's 4 warps), which ask for at most 128
// threads and get exactly what they ask for.
//
// Tensor-core products (mma.sync) are inline PTX on the GPU; here `emu_mma_bf16_16816` computes
// the same warp-wide 16 × 8 × 16 product from the lanes' fragments, laid out as the PTX ISA
// defines them, so a kernel's fragment indexing is tested as the GPU runs it. `ldmatrix` (each
// lane names a row of one of four 8 × 8 bf16 matrices, every lane gets its fragment words) is
// modelled the same way, and `cp.async` (global → shared copies that complete at a later
// `cp.async.wait_group`) as its worst case: the destination reads as NaN from the issue until the
// issuing thread waits for the copy's group, so reading a tile before waiting for it, or issuing
// into a tile another thread still reads, shows up as NaN; a thread that ends with a copy it
// never waited for, or either instruction given an address that is not 16-byte aligned (a
// fault on a GPU), stops the test.
#pragma once
#define DPT_EMU 1
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

struct emu_dim3 {
    unsigned x, y, z;
};
extern emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

// CUDA's built-in vector types that kernels use.
struct float4 {
    float x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
struct uint4 {
    unsigned x, y, z, w;
};

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
void emu_mma_bf16_16816(float* c, const unsigned* a, const unsigned* b);
void emu_ldmatrix_x4(unsigned* r, const void* row, bool trans);
void emu_cp_async16(void* dst, const void* src);
void emu_cp_async_commit();
void emu_cp_async_wait(unsigned pending);
uint4 emu_ld16(const void* p);
void emu_st16(void* p, uint4 v);
void emu_launch(unsigned grid, unsigned block, const std::function<void()>& body);

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
// One OS thread runs every emulated thread, so plain read-modify-write is atomic here.
inline float atomicAdd(float* p, float v) {
    float o = *p;
    *p = o + v;
    return o;
}
inline double atomicAdd(double* p, double v) {
    double o = *p;
    *p = o + v;
    return o;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    unsigned o = *p;
    *p = o + v;
    return o;
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    unsigned long long o = *p;
    if (v > o) *p = v;
    return o;
}
inline long long __double_as_longlong(double d) {
    long long i;
    std::memcpy(&i, &d, 8);
    return i;
}
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
