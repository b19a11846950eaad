// Flash attention (FlashAttention-2, Dao 2023) for causal self-attention under bf16 GEMM
// precision: scores, probabilities and their gradients live in registers one 64 × 64 tile at a
// time, never as a T × T tensor. q, k and v are read straight from the packed projection
// qkv [B, T, 3C], the output is written in [B, T, C], and the gradient straight into
// dqkv [B, T, 3C]. Two element types, one kernel body: f32 tensors (rounded to bf16 as they are
// staged in shared memory, outputs written in f32), or bf16 tensors throughout (`_bf16` entry
// points: qkv, y, dO and dqkv in bf16 — the projection's bf16 output read as it is, half the
// bytes; outputs rounded once from the f32 accumulators). lse, row maxima and D stay f32.
//
// Products run on the tensor cores through mma.sync.m16n8k16 (bf16 in, f32 accumulate), written
// as header-free inline PTX so NVRTC needs no CUDA headers. The CPU emulator has no tensor cores:
// it runs an exact model of the same instruction (emu.h: the fragment layouts of the PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type"), so every index computed here is
// the one the GPU uses.
//
// Layout of a block: 4 warps (128 threads) own a 64-row tile, 16 rows per warp (the forward's
// 128-row tiles: two such slices per warp, 64 rows apart); lane l holds rows g = l / 4 and g + 8
// of a 16-row slice and columns 2·(l % 4) + {0, 1} of each 8-column slice (the accumulator
// layout). Work items (one per head and query or key tile) are spread over blocks by a
// grid-stride loop, the tiles with the most work first. Causal: tile pairs above the diagonal
// are skipped, the pairs on it masked by index.
//
// Staging: the tiles a work item walks (K and V in forward and dQ, Q and dO in dK/dV) are
// double-buffered in shared memory. bf16 tensors go global → shared by cp.async, 16 bytes a copy,
// so tile i + 1 is in flight while the block computes on tile i (one barrier before issuing it,
// so no warp overwrites a tile another still reads; a wait and a barrier before reading it); f32
// tensors are rounded on the way, through registers. Operand fragments come from shared memory
// by ldmatrix (x4: four 8 × 8 matrices per instruction, .trans for the right operands read
// column-wise), not element by element. Both are header-free inline PTX too; the emulator models
// them (emu.h), cp.async as late as PTX allows, so a tile read before its wait reads NaN.
//
// Backward is deterministic (no atomics): dK and dV per key tile in one kernel, dQ per query tile
// in another, each recomputing P from the saved log-sum-exp; D = rowsum(dO ⊙ O) comes first.
//
// Attention dropout (threshold > 0): P·V reads P with the mask of element (bh, i, j) of the
// [B·H, T, T] probabilities applied and the survivors scaled by 1/(1 − p) — the mask the unfused
// path and the CPU draw from (key, bh·T·T + i·T + j), regenerated in backward; the softmax
// normaliser counts every probability. With O = P_d·V, rowsum(dO ⊙ O) is still Σ_j P_ij·dP_ij.

#define FA_TILE 64

#if defined(DPT_EMU)
#define fa_mma emu_mma_bf16_16816
__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}
__device__ __forceinline__ void fa_ldsm4(unsigned* r, const void* row) { emu_ldmatrix_x4(r, row, false); }
__device__ __forceinline__ void fa_ldsm4_t(unsigned* r, const void* row) { emu_ldmatrix_x4(r, row, true); }
__device__ __forceinline__ void fa_cp16(void* dst, const void* src) { emu_cp_async16(dst, src); }
__device__ __forceinline__ void fa_commit() { emu_cp_async_commit(); }
template <int N>
__device__ __forceinline__ void fa_wait() {
    emu_cp_async_wait(N);
}
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
// No bf16 tensor cores before sm_80: the file still compiles (every kernel file is compiled when
// a device opens), and the host never launches these kernels there (flash_supported).
__device__ __forceinline__ void fa_mma(float*, const unsigned*, const unsigned*) { asm volatile("trap;"); }
__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}
__device__ __forceinline__ void fa_ldsm4(unsigned*, const void*) { asm volatile("trap;"); }
__device__ __forceinline__ void fa_ldsm4_t(unsigned*, const void*) { asm volatile("trap;"); }
__device__ __forceinline__ void fa_cp16(void*, const void*) { asm volatile("trap;"); }
__device__ __forceinline__ void fa_commit() {}
template <int N>
__device__ __forceinline__ void fa_wait() {}
#else
// c += A·B for one 16 × 8 × 16 tile (fragments as described above).
__device__ __forceinline__ void fa_mma(float* c, const unsigned* a, const unsigned* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Two f32 rounded to bf16 (nearest even), lo in the low half: cvt puts its first source high.
__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// A generic pointer into shared memory as a shared-window address (what ldmatrix and cp.async
// take; no header's __cvta_generic_to_shared under NVRTC).
__device__ __forceinline__ unsigned fa_smem(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// Four 8 × 8 bf16 matrices from shared memory, lane l naming row l % 8 of matrix l / 8 (16 bytes,
// 16-byte aligned); register i gets this lane's fragment of matrix i — with _t, of its transpose.
// volatile: it reads what other threads staged, so it must stay between the barriers.
__device__ __forceinline__ void fa_ldsm4(unsigned* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem(row)));
}
__device__ __forceinline__ void fa_ldsm4_t(unsigned* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem(row)));
}
// 16 bytes global → shared without passing through registers (or L1: .cg), complete after a
// fa_wait that covers its group.
__device__ __forceinline__ void fa_cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(fa_smem(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void fa_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Every committed group but the newest N has landed (for this thread; a barrier then shows them
// to the block).
template <int N>
__device__ __forceinline__ void fa_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#endif

// Shared tiles hold bf16 pairs as 32-bit words (one access type, no aliasing); a row is D + 8
// elements (80 or 144 bytes: 16-byte aligned for cp.async and ldmatrix) so that the 8 rows one
// 8 × 8 matrix load touches fall in different banks.
template <int D>
struct alignas(16) FaTile {
    static const int LDW = (D + 8) / 2;
    unsigned w[FA_TILE * LDW];
};

// Two adjacent elements of a global tensor as one bf16 pair (the first in the low half): f32
// rounded, bf16 as stored.
__device__ __forceinline__ unsigned fa_pair(const float* p) { return fa_pack(p[0], p[1]); }
__device__ __forceinline__ unsigned fa_pair(const bf16_t* p) { return (unsigned)p[0] | ((unsigned)p[1] << 16); }
// One element written from an f32 accumulator value (bf16: rounded to nearest even).
__device__ __forceinline__ void fa_put(float* p, float v) { *p = v; }
__device__ __forceinline__ void fa_put(bf16_t* p, float v) { *p = f32_to_bf16(v); }
__device__ __forceinline__ float fa_get(const float* p) { return *p; }
__device__ __forceinline__ float fa_get(const bf16_t* p) { return bf16_to_f32(*p); }

// Rows [r0, r0 + 64) of a [rows, D] matrix (elements E) with row stride `rs`, as bf16; rows at
// or past `t` as zeros. Synchronous: through registers (f32 is rounded on the way).
template <int D, typename E>
__device__ __forceinline__ void fa_stage(FaTile<D>& s, const E* base, i64 rs, i64 r0, i64 t) {
    for (int e = threadIdx.x; e < FA_TILE * D / 2; e += blockDim.x) {
        const int r = e / (D / 2), c = (e % (D / 2)) * 2;
        s.w[r * FaTile<D>::LDW + c / 2] = r0 + r < t ? fa_pair(base + (r0 + r) * rs + c) : 0u;
    }
}

// fa_stage issued asynchronously where it can be: bf16 rows go global → shared by cp.async, 16
// bytes a copy, landing while the block computes on the other buffer (the caller commits the
// group, waits and syncs before reading it); padding rows are zeroed by plain stores. f32 (to be
// rounded) or a tensor not 16-byte aligned (`async` false) is staged synchronously.
template <int D>
__device__ __forceinline__ void fa_issue(FaTile<D>& s, const float* base, i64 rs, i64 r0, i64 t, bool) {
    fa_stage<D, float>(s, base, rs, r0, t);
}
template <int D>
__device__ __forceinline__ void fa_issue(FaTile<D>& s, const bf16_t* base, i64 rs, i64 r0, i64 t, bool async) {
    if (!async) {
        fa_stage<D, bf16_t>(s, base, rs, r0, t);
        return;
    }
    for (int e = threadIdx.x; e < FA_TILE * D / 8; e += blockDim.x) {
        const int r = e / (D / 8), c = (e % (D / 8)) * 8;
        unsigned* dst = s.w + r * FaTile<D>::LDW + c / 2;
        if (r0 + r < t) {
            fa_cp16(dst, base + (r0 + r) * rs + c);
        } else {
            dst[0] = dst[1] = dst[2] = dst[3] = 0u;
        }
    }
}

// Whether a tensor's rows can be copied 16 bytes at a time (dpt_aligned16 of its base): row
// strides are multiples of 8 elements for every head size here, so only the base decides.

// The address this lane gives ldmatrix for the four 8 × 8 matrices at rows r0..r0 + 16 and
// columns c0..c0 + 16 of a staged tile, in the order (rows, columns) = (0, 0), (8, 0), (0, 8),
// (8, 8): row r0 + l % 16, column c0 + 8·(l / 16).
template <int D>
__device__ __forceinline__ const unsigned* fa_rows16(const FaTile<D>& s, int r0, int c0) {
    const int lane = threadIdx.x & 31;
    return s.w + (r0 + (lane & 15)) * FaTile<D>::LDW + (c0 + ((lane >> 4) << 3)) / 2;
}

// A fragment (rows w0..w0+16, columns 16·ks..) of a staged tile read as a row-major M × K
// matrix: its four registers are exactly the four matrices of fa_rows16.
template <int D>
__device__ __forceinline__ void fa_load_a(const FaTile<D>& s, int w0, int ks, unsigned* a) {
    fa_ldsm4(a, fa_rows16<D>(s, w0, ks * 16));
}

// B fragments with B[k][n] = tile[n0 + n][16·ks + k], for k-steps ks and ks + 1 (b[0], b[1]): the
// tile's rows are B's columns (Kᵀ, Qᵀ, dOᵀ, Vᵀ as right operands). Four matrices side by side
// in rows n0..n0 + 8: lane l names row n0 + l % 8 of the one at column 16·ks + 8·(l / 8).
template <int D>
__device__ __forceinline__ void fa_load_bt2(const FaTile<D>& s, int n0, int ks, unsigned (*b)[2]) {
    const int lane = threadIdx.x & 31;
    unsigned r[4];
    fa_ldsm4(r, s.w + (n0 + (lane & 7)) * FaTile<D>::LDW + (ks * 16 + ((lane >> 3) << 3)) / 2);
    b[0][0] = r[0];
    b[0][1] = r[1];
    b[1][0] = r[2];
    b[1][1] = r[3];
}

// B fragments with B[k][n] = tile[16·kk + k][n0 + n], for column slices n0 and n0 + 8 (b[0],
// b[1]): the tile as it is (V, dO, K, Q as right operands of P·V, Pᵀ·dO, dS·K, dSᵀ·Q), the
// four matrices of fa_rows16 read transposed.
template <int D>
__device__ __forceinline__ void fa_load_b2(const FaTile<D>& s, int kk, int n0, unsigned (*b)[2]) {
    unsigned r[4];
    fa_ldsm4_t(r, fa_rows16<D>(s, kk * 16, n0));
    b[0][0] = r[0];
    b[0][1] = r[1];
    b[1][0] = r[2];
    b[1][1] = r[3];
}

// A fragment for k-step kk from a 16 × 64 accumulator (8 slices of 8 columns), rounded to bf16:
// the accumulator layout of slices 2kk and 2kk + 1 is the A layout of columns 16kk..16kk + 16.
__device__ __forceinline__ void fa_acc_to_a(const float (*acc)[4], int kk, unsigned* a) {
    a[0] = fa_pack(acc[2 * kk][0], acc[2 * kk][1]);
    a[1] = fa_pack(acc[2 * kk][2], acc[2 * kk][3]);
    a[2] = fa_pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[3] = fa_pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc[r] = X_r·Yᵀ over D for each of the warp's RW slices of 16 rows of staged X (A fragments
// `xa[r]`) and the 64 rows of Y. Each B fragment is read from shared memory once for all RW
// slices: the forward's 128-row tiles (RW = 2) halve the ldmatrix traffic per product.
template <int D, int RW>
__device__ __forceinline__ void fa_scores(const unsigned (*xa)[D / 16][4], const FaTile<D>& y, float (*acc)[8][4]) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int r = 0; r < RW; ++r) acc[r][nt][0] = acc[r][nt][1] = acc[r][nt][2] = acc[r][nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks += 2) {
            unsigned b[2][2];
            fa_load_bt2<D>(y, nt * 8, ks, b);
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                fa_mma(acc[r][nt], xa[r][ks], b[0]);
                fa_mma(acc[r][nt], xa[r][ks + 1], b[1]);
            }
        }
    }
}

// out[r] += P_r·Z for the warp's RW slices of 16 × 64 P (accumulator layout) and staged Z [64, D],
// each B fragment read once for all slices.
template <int D, int RW>
__device__ __forceinline__ void fa_times(const float (*p)[8][4], const FaTile<D>& z, float (*out)[D / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        unsigned a[RW][4];
#pragma unroll
        for (int r = 0; r < RW; ++r) fa_acc_to_a(p[r], kk, a[r]);
#pragma unroll
        for (int nt = 0; nt < D / 8; nt += 2) {
            unsigned b[2][2];
            fa_load_b2<D>(z, kk, nt * 8, b);
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                fa_mma(out[r][nt], a[r], b[0]);
                fa_mma(out[r][nt + 1], a[r], b[1]);
            }
        }
    }
}

__device__ __forceinline__ float fa_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float fa_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Stores this lane's rows r0 and r0 + 8 of a warp's 16 × D accumulator, row i times mul[i], into
// the rows of `base` (row stride rs; base at row 0 and the tile's first column); rows at or past
// t are padding and skipped.
template <int D, typename E>
__device__ __forceinline__ void fa_store(E* base, i64 rs, i64 r0, i64 t, const float (*acc)[4], const float* mul) {
    const int tq = (threadIdx.x & 31) & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const i64 row = r0 + 8 * i;
        if (row >= t) continue;
        E* out = base + row * rs + tq * 2;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            fa_put(out + nt * 8, acc[nt][2 * i] * mul[i]);
            fa_put(out + nt * 8 + 1, acc[nt][2 * i + 1] * mul[i]);
        }
    }
}

// Dropout of the element at `idx` of the [B·H, T, T] probabilities: x scaled, or 0.
__device__ __forceinline__ float fa_drop(float x, i64 idx, i64 key, i64 threshold, float dscale) {
    return dpt_keep(key, idx, threshold) ? x * dscale : 0.0f;
}

// exp(x) is computed as exp2(x·log₂e), the scaling folded into one fused multiply-add with the
// subtraction of the row's maximum or log-sum-exp (FlashAttention-2's softmax_scale_log2):
// one MUFU.EX2 and its range fix-up instead of expf's longer accurate sequence.
#define FA_LOG2E 1.4426950408889634f

// Whether the pair of a query tile qt of 64·RW rows and key tile kt needs the causal mask or
// padding checks per element: only where some key comes after some query (the diagonal), and
// where the query tile reaches the sequence's end (which any key tile past it does too). Every
// other pair is fully visible (for GPT-124M's T = 1024 and 64-row tiles, 120 of 136 pairs).
// (RW = 1 is written as the diagonal test itself: the backward kernels' registers are tight
// enough that ptxas spills dK/dV's with the general form.)
template <int RW>
__device__ __forceinline__ bool fa_edge(i64 qt, i64 kt, i64 t) {
    if (RW == 1) return qt == kt || (qt + 1) * FA_TILE > t;
    return (kt + 1) * FA_TILE > qt * RW * FA_TILE || (qt + 1) * RW * FA_TILE > t;
}

// Forward's and dQ's step to key tile kt of last + 1 (buffer kt % 2 of `tiles`, K then V): once
// every warp is done with the other buffer (the previous tile, or Q and dO), tile kt + 1 is
// issued into it; then tile kt is waited for and shown to the block.
template <int D, typename E>
__device__ __forceinline__ void fa_next_kv(FaTile<D>* tiles, const E* base, i64 c, i64 t, i64 kt, i64 last, bool async) {
    const int other = 2 - 2 * (int)(kt & 1);
    __syncthreads();
    if (kt < last) {
        fa_issue<D>(tiles[other], base + c, 3 * c, (kt + 1) * FA_TILE, t, async);
        fa_issue<D>(tiles[other + 1], base + 2 * c, 3 * c, (kt + 1) * FA_TILE, t, async);
        fa_commit();
        fa_wait<1>();
    } else {
        fa_wait<0>();
    }
    __syncthreads();
}

// Forward: y [B, T, C]; lse and row_max [B·H·T] (row_max: the largest scaled logit of each row
// over its unmasked keys, for the max-attention-logit probe). A work item is a query tile of
// 64·RW rows: warp w holds rows 64·r + 16·w.. of it for r < RW, and every K and V fragment read
// from shared memory serves all RW of them (RW = 2: FlashAttention-2's 128-row tiles for head
// size 64; twice the registers for scores and output).
template <int D, int RW, typename E>
__device__ void flash_fwd(const E* qkv, E* y, float* lse, float* row_max, i64 b, i64 t, i64 h, float scale, i64 key, i64 threshold,
                          float dscale) {
    // Two buffers of a K and a V tile (tiles 2j, 2j + 1): tile kt + 1 lands while the block
    // computes on tile kt. The Q tile is staged in buffer 1 (its last RW slots), read into
    // registers before the first prefetch goes there.
    static_assert(RW == 1 || RW == 2, "the Q tile is staged in buffer 1: at most two 64-row tiles");
    __shared__ FaTile<D> tiles[4];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const i64 c = h * D, rs = 3 * c, bm = FA_TILE * RW, nq = (t + bm - 1) / bm, nk = (t + FA_TILE - 1) / FA_TILE;
    const bool async = dpt_aligned16(qkv);
    for (i64 w = blockIdx.x; w < b * h * nq; w += gridDim.x) {
        const i64 qt = nq - 1 - w % nq, bh = w / nq, bb = bh / h, hh = bh % h;
        const E* base = qkv + bb * t * rs + hh * D;
        // The key tiles this query tile sees: up to the one holding its last row.
        const i64 last = ((qt + 1) * RW < nk ? (qt + 1) * RW : nk) - 1;
        __syncthreads();
#pragma unroll
        for (int r = 0; r < RW; ++r) fa_issue<D>(tiles[4 - RW + r], base, rs, qt * bm + r * FA_TILE, t, async);
        fa_issue<D>(tiles[0], base + c, rs, 0, t, async);
        fa_issue<D>(tiles[1], base + 2 * c, rs, 0, t, async);
        fa_commit();
        fa_wait<0>();
        __syncthreads();
        unsigned qa[RW][D / 16][4];
#pragma unroll
        for (int r = 0; r < RW; ++r)
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) fa_load_a<D>(tiles[4 - RW + r], warp * 16, ks, qa[r][ks]);
        float o[RW][D / 8][4];
#pragma unroll
        for (int r = 0; r < RW; ++r)
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) o[r][nt][0] = o[r][nt][1] = o[r][nt][2] = o[r][nt][3] = 0.0f;
        // Per slice r and half i (rows g and g + 8): running maximum and sum.
        float m[RW][2], l[RW][2];
#pragma unroll
        for (int r = 0; r < RW; ++r) m[r][0] = m[r][1] = -DPT_INF, l[r][0] = l[r][1] = 0.0f;
        const int rrel = warp * 16 + g;  // this lane's first row in the tile; slice r adds 64·r
        const i64 r0 = qt * bm + rrel;
        const int tlim = (int)(t - qt * bm);  // rows and columns of the tile's coordinates from here are padding
        for (i64 kt = 0; kt <= last; ++kt) {
            const int cur = (int)(kt & 1);
            fa_next_kv<D, E>(tiles, base, c, t, kt, last, async);
            const FaTile<D>&sk = tiles[2 * cur], &sv = tiles[2 * cur + 1];
            float s[RW][8][4];
            fa_scores<D, RW>(qa, sk, s);
            const bool edge = fa_edge<RW>(qt, kt, t);
            // The key tile's first column relative to the query tile's first row; the dropout
            // index of (this lane's first row, the key tile's first column).
            const int kofs = (int)(kt * FA_TILE - qt * bm);
            const i64 drop0 = (bh * t + r0) * t + kt * FA_TILE;
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                float mx[2] = {-DPT_INF, -DPT_INF};
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float v = s[r][nt][e] * scale;
                        if (edge) {
                            // In the query tile's coordinates (32-bit: fewer registers).
                            const int col = kofs + nt * 8 + tq * 2 + (e & 1), row = rrel + r * FA_TILE + (e >> 1) * 8;
                            if (col > row || col >= tlim) v = -DPT_INF;
                        }
                        s[r][nt][e] = v;
                        mx[e >> 1] = fmaxf(mx[e >> 1], v);
                    }
                float base_m[2];
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const float mn = fmaxf(m[r][i], fa_quad_max(mx[i]));
                    // A row with nothing visible yet keeps exp(−∞) = 0 everywhere.
                    base_m[i] = mn == -DPT_INF ? 0.0f : mn;
                    const float corr = exp2f((m[r][i] - base_m[i]) * FA_LOG2E);
                    m[r][i] = mn;
                    l[r][i] *= corr;
#pragma unroll
                    for (int nt = 0; nt < D / 8; ++nt) {
                        o[r][nt][2 * i] *= corr;
                        o[r][nt][2 * i + 1] *= corr;
                    }
                }
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        s[r][nt][e] = exp2f(fmaf(s[r][nt][e], FA_LOG2E, -base_m[e >> 1] * FA_LOG2E));
                        l[r][e >> 1] += s[r][nt][e];
                        if (threshold > 0) {
                            const i64 idx = drop0 + (i64)(r * FA_TILE + (e >> 1) * 8) * t + nt * 8 + tq * 2 + (e & 1);
                            s[r][nt][e] = fa_drop(s[r][nt][e], idx, key, threshold, dscale);
                        }
                    }
            }
            fa_times<D, RW>(s, sv, o);
        }
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            float li[2], inv[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                li[i] = fa_quad_sum(l[r][i]);
                inv[i] = 1.0f / li[i];
            }
            fa_store<D, E>(y + bb * t * c + hh * D, c, r0 + r * FA_TILE, t, o[r], inv);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const i64 row = r0 + r * FA_TILE + 8 * i;
                if (tq == 0 && row < t) {
                    lse[bh * t + row] = m[r][i] + logf(li[i]);
                    row_max[bh * t + row] = m[r][i];
                }
            }
        }
    }
}

// D = rowsum(dO ⊙ O) per (b, h, t) row, from dO and O in [B, T, C]. Eight lanes share a row, each
// summing d/8 adjacent elements, then a fixed shuffle tree (deterministic): a warp's load touches
// 4 rows' worth of adjacent bytes, not 32 rows'. Launch: 8 threads per row (blocks a multiple of
// 32 threads); d a multiple of 8.
template <typename E>
__device__ void flash_bwd_dot(const E* go, const E* y, float* dvec, i64 b, i64 t, i64 h, i64 d) {
    const i64 c = h * d, rows = b * h * t, per = d / 8;
    const int lane = threadIdx.x & 31, sub = lane & 7;
    const i64 warps = (i64)gridDim.x * blockDim.x / 32;
    // r0 is the same for a warp's lanes, so all of them reach the shuffles.
    for (i64 r0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32 * 4; r0 < rows; r0 += warps * 4) {
        const i64 i = r0 + (lane >> 3);
        float acc = 0.0f;
        if (i < rows) {
            const i64 tt = i % t, bh = i / t, bb = bh / h, hh = bh % h;
            const i64 off = (bb * t + tt) * c + hh * d + sub * per;
            for (i64 j = 0; j < per; ++j) acc += fa_get(go + off + j) * fa_get(y + off + j);
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        acc += __shfl_xor_sync(0xffffffffu, acc, 4);
        if (sub == 0 && i < rows) dvec[i] = acc;
    }
}
// (Under FA_PART, only in the program that defines FA_DOT: see the end of the file.)
#if !defined(FA_PART) || defined(FA_DOT)
extern "C" __global__ void flash_bwd_dot_f32(const float* go, const float* y, float* dvec, i64 b, i64 t, i64 h, i64 d) {
    flash_bwd_dot<float>(go, y, dvec, b, t, h, d);
}
extern "C" __global__ void flash_bwd_dot_bf16(const bf16_t* go, const bf16_t* y, float* dvec, i64 b, i64 t, i64 h, i64 d) {
    flash_bwd_dot<bf16_t>(go, y, dvec, b, t, h, d);
}
#endif

// dQ for one query tile per work item, into part 0 of dqkv [B, T, 3C].
template <int D, typename E>
__device__ void flash_bwd_dq(const E* qkv, const E* go, const float* lse, const float* dvec, E* dqkv, i64 b, i64 t, i64 h, float scale,
                             i64 key, i64 threshold, float dscale) {
    // K and V tiles double-buffered as in the forward; Q and dO staged first in buffer 1.
    const float scale2 = scale * FA_LOG2E;
    __shared__ FaTile<D> tiles[4];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const i64 c = h * D, rs = 3 * c, nq = (t + FA_TILE - 1) / FA_TILE;
    const bool async = dpt_aligned16(qkv) && dpt_aligned16(go);
    for (i64 w = blockIdx.x; w < b * h * nq; w += gridDim.x) {
        const i64 qt = nq - 1 - w % nq, bh = w / nq, bb = bh / h, hh = bh % h;
        const E* base = qkv + bb * t * rs + hh * D;
        __syncthreads();
        fa_issue<D>(tiles[2], base, rs, qt * FA_TILE, t, async);
        fa_issue<D>(tiles[3], go + bb * t * c + hh * D, c, qt * FA_TILE, t, async);
        fa_issue<D>(tiles[0], base + c, rs, 0, t, async);
        fa_issue<D>(tiles[1], base + 2 * c, rs, 0, t, async);
        fa_commit();
        fa_wait<0>();
        __syncthreads();
        unsigned qa[D / 16][4], da[D / 16][4];
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            fa_load_a<D>(tiles[2], warp * 16, ks, qa[ks]);
            fa_load_a<D>(tiles[3], warp * 16, ks, da[ks]);
        }
        const i64 r0 = qt * FA_TILE + warp * 16 + g;
        float li[2], di[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const i64 row = r0 + 8 * i;
            li[i] = row < t ? lse[bh * t + row] * FA_LOG2E : 0.0f;  // in log₂ units
            di[i] = row < t ? dvec[bh * t + row] : 0.0f;
        }
        float dq[D / 8][4];
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.0f;
        for (i64 kt = 0; kt <= qt; ++kt) {
            const int cur = (int)(kt & 1);
            fa_next_kv<D, E>(tiles, base, c, t, kt, qt, async);
            const FaTile<D>&sk = tiles[2 * cur], &sv = tiles[2 * cur + 1];
            float p[8][4], dp[8][4];
            fa_scores<D, 1>(&qa, sk, &p);
            fa_scores<D, 1>(&da, sv, &dp);
            const bool edge = fa_edge<1>(qt, kt, t);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const i64 col = kt * FA_TILE + nt * 8 + tq * 2 + (e & 1), row = r0 + (e >> 1) * 8;
                    const bool vis = !edge || (col <= row && col < t && row < t);
                    const float pv = vis ? exp2f(fmaf(p[nt][e], scale2, -li[e >> 1])) : 0.0f;
                    // dP: the gradient reaching P through the dropout mask.
                    const float dpv = (threshold > 0 && vis) ? fa_drop(dp[nt][e], (bh * t + row) * t + col, key, threshold, dscale) : dp[nt][e];
                    p[nt][e] = pv * (dpv - di[e >> 1]);  // dS
                }
            fa_times<D, 1>(&p, sk, &dq);
        }
        const float sc[2] = {scale, scale};
        fa_store<D, E>(dqkv + bb * t * rs + hh * D, rs, r0, t, dq, sc);
    }
}

// dK and dV for one key tile per work item, into parts 1 and 2 of dqkv.
template <int D, typename E>
__device__ void flash_bwd_dkv(const E* qkv, const E* go, const float* lse, const float* dvec, E* dqkv, i64 b, i64 t, i64 h, float scale,
                              i64 key, i64 threshold, float dscale) {
    // Two buffers of a Q and a dO tile (with their rows' lse, in log₂ units, and D): query tile
    // qt + 1 lands while the block computes on qt. K and V are staged first in buffer 1.
    const float scale2 = scale * FA_LOG2E;
    __shared__ FaTile<D> tiles[4];
    __shared__ float sl[2][FA_TILE], sd[2][FA_TILE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const i64 c = h * D, rs = 3 * c, nq = (t + FA_TILE - 1) / FA_TILE;
    const bool async = dpt_aligned16(qkv) && dpt_aligned16(go);
    for (i64 w = blockIdx.x; w < b * h * nq; w += gridDim.x) {
        // Key tile 0 sees every query tile: first.
        const i64 kt = w % nq, bh = w / nq, bb = bh / h, hh = bh % h;
        const E* base = qkv + bb * t * rs + hh * D;
        const E* gbase = go + bb * t * c + hh * D;
        // Query tile qt's Q and dO tiles into buffer j; thread r < 64 also loads row r's lse and D
        // (stored into sl, sd by the caller: a plain load's latency is hidden only if its value
        // is not needed right away).
        auto stage_q = [&](int j, i64 qt, float* lr, float* dr) {
            fa_issue<D>(tiles[2 * j], base, rs, qt * FA_TILE, t, async);
            fa_issue<D>(tiles[2 * j + 1], gbase, c, qt * FA_TILE, t, async);
            const i64 row = qt * FA_TILE + threadIdx.x;
            *lr = threadIdx.x < FA_TILE && row < t ? lse[bh * t + row] * FA_LOG2E : 0.0f;  // in log₂ units
            *dr = threadIdx.x < FA_TILE && row < t ? dvec[bh * t + row] : 0.0f;
        };
        float nl, nd;
        __syncthreads();
        fa_issue<D>(tiles[2], base + c, rs, kt * FA_TILE, t, async);
        fa_issue<D>(tiles[3], base + 2 * c, rs, kt * FA_TILE, t, async);
        stage_q(0, kt, &nl, &nd);
        if (threadIdx.x < FA_TILE) {
            sl[0][threadIdx.x] = nl;
            sd[0][threadIdx.x] = nd;
        }
        fa_commit();
        fa_wait<0>();
        __syncthreads();
        unsigned ka[D / 16][4], va[D / 16][4];
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            fa_load_a<D>(tiles[2], warp * 16, ks, ka[ks]);
            fa_load_a<D>(tiles[3], warp * 16, ks, va[ks]);
        }
        float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            dk[nt][0] = dk[nt][1] = dk[nt][2] = dk[nt][3] = 0.0f;
            dv[nt][0] = dv[nt][1] = dv[nt][2] = dv[nt][3] = 0.0f;
        }
        const i64 j0 = kt * FA_TILE + warp * 16 + g;  // this lane's key rows j0 and j0 + 8
        for (i64 qt = kt; qt < nq; ++qt) {
            const int cur = (int)((qt - kt) & 1);
            __syncthreads();
            const bool more = qt + 1 < nq;
            if (more) {
                stage_q(1 - cur, qt + 1, &nl, &nd);
                fa_commit();
                fa_wait<1>();
            } else {
                fa_wait<0>();
            }
            __syncthreads();
            const FaTile<D>&sq = tiles[2 * cur], &sdo = tiles[2 * cur + 1];
            const float *ql = sl[cur], *qd = sd[cur];
            // Transposed tiles: rows are keys, columns queries.
            float pt[8][4], dpt[8][4];
            fa_scores<D, 1>(&ka, sq, &pt);
            fa_scores<D, 1>(&va, sdo, &dpt);
            const bool edge = fa_edge<1>(qt, kt, t);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qc = nt * 8 + tq * 2 + (e & 1);
                    const i64 q = qt * FA_TILE + qc, kr = j0 + (e >> 1) * 8;
                    const bool vis = !edge || (kr <= q && q < t && kr < t);
                    const float p = vis ? exp2f(fmaf(pt[nt][e], scale2, -ql[qc])) : 0.0f;
                    float dp = dpt[nt][e];
                    if (threshold > 0 && vis) {
                        // dV reads the dropped P; dS the gradient through the same mask.
                        const i64 idx = (bh * t + q) * t + kr;
                        pt[nt][e] = fa_drop(p, idx, key, threshold, dscale);
                        dp = fa_drop(dp, idx, key, threshold, dscale);
                    } else {
                        pt[nt][e] = p;
                    }
                    dpt[nt][e] = p * (dp - qd[qc]);  // dSᵀ
                }
            fa_times<D, 1>(&pt, sdo, &dv);
            fa_times<D, 1>(&dpt, sq, &dk);
            // The next tile's lse and D, loaded before this tile's products; read after the
            // next iteration's barriers.
            if (more && threadIdx.x < FA_TILE) {
                sl[1 - cur][threadIdx.x] = nl;
                sd[1 - cur][threadIdx.x] = nd;
            }
        }
        const float sc[2] = {scale, scale}, one[2] = {1.0f, 1.0f};
        fa_store<D, E>(dqkv + bb * t * rs + c + hh * D, rs, j0, t, dk, sc);
        fa_store<D, E>(dqkv + bb * t * rs + 2 * c + hh * D, rs, j0, t, dv, one);
    }
}

// Entry points per head dimension (the fragments are sized at compile time) and element type
// (f32, or `_bf16`: qkv, y, dO and dqkv in bf16); `flash_fwd128_*` is the forward on 128-row
// query tiles. Launch: 128 threads per block, one block per work item (a head and query tile)
// up to the grid limit. Dropout: the step's key in device memory or null, key (or
// site: see dpt_mask_key), threshold (p·2³², 0 for none) and 1/(1 − p).
#define FA_FWD(D, SUF, E)                                                                                                                \
    extern "C" __global__ void flash_fwd_d##D##SUF(const E* qkv, E* y, float* lse, float* row_max, i64 b, i64 t, i64 h, float scale,    \
                                                   const u64_t* step_key, i64 key, i64 threshold, float dscale) {                      \
        flash_fwd<D, 1, E>(qkv, y, lse, row_max, b, t, h, scale, dpt_mask_key(step_key, key), threshold, dscale);                      \
    }
#define FA_FWD128(D, SUF, E)                                                                                                             \
    extern "C" __global__ void flash_fwd128_d##D##SUF(const E* qkv, E* y, float* lse, float* row_max, i64 b, i64 t, i64 h, float scale, \
                                                      const u64_t* step_key, i64 key, i64 threshold, float dscale) {                   \
        flash_fwd<D, 2, E>(qkv, y, lse, row_max, b, t, h, scale, dpt_mask_key(step_key, key), threshold, dscale);                      \
    }
#define FA_BWD_DQ(D, SUF, E)                                                                                                             \
    extern "C" __global__ void flash_bwd_dq_d##D##SUF(const E* qkv, const E* go, const float* lse, const float* dvec, E* dqkv, i64 b, \
                                                      i64 t, i64 h, float scale, const u64_t* step_key, i64 key, i64 threshold,       \
                                                      float dscale) {                                                                  \
        flash_bwd_dq<D, E>(qkv, go, lse, dvec, dqkv, b, t, h, scale, dpt_mask_key(step_key, key), threshold, dscale);                  \
    }
#define FA_BWD_DKV(D, SUF, E)                                                                                                            \
    extern "C" __global__ void flash_bwd_dkv_d##D##SUF(const E* qkv, const E* go, const float* lse, const float* dvec, E* dqkv, i64 b, \
                                                       i64 t, i64 h, float scale, const u64_t* step_key, i64 key, i64 threshold,      \
                                                       float dscale) {                                                                 \
        flash_bwd_dkv<D, E>(qkv, go, lse, dvec, dqkv, b, t, h, scale, dpt_mask_key(step_key, key), threshold, dscale);                 \
    }

// NVRTC compiles this file as one program per entry point, defining FA_PART as the one entry
// (e.g. `FA_BWD_DKV(64, _bf16, bf16_t)`; the D-vector kernels under FA_DOT): ptxas spends up to
// a second on each of these kernels, so as one program this file set the time of a device's
// first start; split, they compile in parallel (kernels/cuda/mod.rs, `programs`). The CPU
// emulator and anything else without FA_PART get every entry point.
#if defined(FA_PART)
FA_PART
#else
#define FA_ENTRIES(D, SUF, E) FA_FWD(D, SUF, E) FA_FWD128(D, SUF, E) FA_BWD_DQ(D, SUF, E) FA_BWD_DKV(D, SUF, E)
FA_ENTRIES(32, , float)
FA_ENTRIES(64, , float)
FA_ENTRIES(32, _bf16, bf16_t)
FA_ENTRIES(64, _bf16, bf16_t)
#endif
