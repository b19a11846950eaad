// The emulator's scheduler (see emu.h).
#include "emu.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {
constexpr unsigned kBlock = 64;
// Largest block run as requested (see emu.h).
constexpr unsigned kMaxBlock = 128;
constexpr unsigned kMaxGrid = 3;
constexpr size_t kStack = 256 * 1024;
enum State { Runnable, AtBarrier, AtWarpBarrier, Done };

ucontext_t sched;
ucontext_t ctxs[kMaxBlock];
State state[kMaxBlock];
unsigned cur;
const std::function<void()>* body;
std::vector<char> stacks(kMaxBlock* kStack);
float slots[kMaxBlock];
unsigned mma_a[kMaxBlock][4], mma_b[kMaxBlock][2];
const unsigned char* ldsm_row[kMaxBlock];

// cp.async copies a thread has issued and not yet waited for, with the number of its group
// (the count of commits before it).
struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned group;
};
std::vector<AsyncCopy> async_copies[kMaxBlock];
unsigned async_groups[kMaxBlock];

// The schedule (see emu_set_schedule): 0 runs blocks and threads in index order; another seed
// shuffles both, differently for every launch and every round.
unsigned long long schedule_seed = 0, schedule_state = 0;

unsigned long long next_draw() {
    unsigned long long z = (schedule_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// 0, 1, ..., n - 1, shuffled when a schedule seed is set (Fisher-Yates).
void order(unsigned* o, unsigned n) {
    for (unsigned i = 0; i < n; ++i) o[i] = i;
    if (schedule_seed == 0) return;
    for (unsigned i = n; i > 1; --i) {
        const unsigned j = (unsigned)(next_draw() % i);
        const unsigned t = o[i - 1];
        o[i - 1] = o[j];
        o[j] = t;
    }
}

float bf16_bits(unsigned pair, unsigned half) {
    const unsigned u = ((pair >> (16 * half)) & 0xffffu) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// PTX requires 16-byte alignment of an ldmatrix row and of both cp.async addresses (a GPU
// faults on a misaligned one).
void require_aligned16(const void* p, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        std::fprintf(stderr, "cuda emulator: %s address %p (thread %u of block %u) is not 16-byte aligned\n", what, p, threadIdx.x,
                     blockIdx.x);
        std::abort();
    }
}

void trampoline() {
    (*body)();
    if (!async_copies[cur].empty()) {
        std::fprintf(stderr, "cuda emulator: thread %u of block %u ended with %zu cp.async copies it never waited for\n", cur,
                     blockIdx.x, async_copies[cur].size());
        std::abort();
    }
    state[cur] = Done;
    swapcontext(&ctxs[cur], &sched);
}
}  // namespace

void __syncthreads() {
    state[cur] = AtBarrier;
    swapcontext(&ctxs[cur], &sched);
}

namespace {
// Waits for the other live lanes of this thread's warp (a warp collective's rendezvous).
void warp_sync() {
    state[cur] = AtWarpBarrier;
    swapcontext(&ctxs[cur], &sched);
}
}  // namespace

float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const unsigned t = threadIdx.x;
    slots[t] = v;
    warp_sync();
    const float r = slots[t ^ (unsigned)lane_mask];
    warp_sync();
    return r;
}

// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type": lane l, g = l / 4,
// q = l % 4. A (16 × 16, bf16 pairs, low half first): reg 0 row g, cols 2q, 2q+1; reg 1 row g+8;
// regs 2, 3 the same rows at cols + 8. B (16 × 8): reg 0 rows 2q, 2q+1 of col g; reg 1 rows + 8.
// C (16 × 8, f32): c0, c1 row g, cols 2q, 2q+1; c2, c3 row g+8.
void emu_mma_bf16_16816(float* c, const unsigned* a, const unsigned* b) {
    const unsigned t = threadIdx.x;
    std::memcpy(mma_a[t], a, sizeof mma_a[t]);
    std::memcpy(mma_b[t], b, sizeof mma_b[t]);
    warp_sync();
    const unsigned w0 = t & ~31u, lane = t & 31u, g = lane >> 2, q = lane & 3u;
    float am[16][16], bm[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned gl = l >> 2, ql = l & 3u;
        for (unsigned e = 0; e < 2; ++e) {
            am[gl][2 * ql + e] = bf16_bits(mma_a[w0 + l][0], e);
            am[gl + 8][2 * ql + e] = bf16_bits(mma_a[w0 + l][1], e);
            am[gl][2 * ql + 8 + e] = bf16_bits(mma_a[w0 + l][2], e);
            am[gl + 8][2 * ql + 8 + e] = bf16_bits(mma_a[w0 + l][3], e);
            bm[2 * ql + e][gl] = bf16_bits(mma_b[w0 + l][0], e);
            bm[2 * ql + 8 + e][gl] = bf16_bits(mma_b[w0 + l][1], e);
        }
    }
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = g + (i >> 1) * 8, col = 2 * q + (i & 1);
        float acc = c[i];
        for (unsigned k = 0; k < 16; ++k) acc += am[row][k] * bm[k][col];
        c[i] = acc;
    }
    warp_sync();
}

// PTX ISA, "Warp-level matrix load instruction: ldmatrix" (.m8n8.x4.b16): lanes 8i..8i+7 give the
// addresses of rows 0..7 of matrix i (8 bf16 each); lane l receives register i = the two elements
// of matrix i at row l / 4, columns 2(l % 4), 2(l % 4) + 1 — or with .trans at rows 2(l % 4),
// 2(l % 4) + 1 of column l / 4 (the matrix read column-major), the first in the low half.
void emu_ldmatrix_x4(unsigned* r, const void* row, bool trans) {
    const unsigned t = threadIdx.x, w0 = t & ~31u, lane = t & 31u;
    require_aligned16(row, "an ldmatrix row");
    ldsm_row[t] = static_cast<const unsigned char*>(row);
    warp_sync();
    for (unsigned i = 0; i < 4; ++i) {
        if (trans) {
            uint16_t lo, hi;
            std::memcpy(&lo, ldsm_row[w0 + 8 * i + 2 * (lane & 3)] + 2 * (lane >> 2), 2);
            std::memcpy(&hi, ldsm_row[w0 + 8 * i + 2 * (lane & 3) + 1] + 2 * (lane >> 2), 2);
            r[i] = (unsigned)lo | ((unsigned)hi << 16);
        } else {
            std::memcpy(&r[i], ldsm_row[w0 + 8 * i + (lane >> 2)] + 4 * (lane & 3), 4);
        }
    }
    warp_sync();
}

// A 16-byte load or store (ld/st.v4.u32): a GPU faults on an address that is not 16-byte
// aligned, so the emulator stops there too.
uint4 emu_ld16(const void* p) {
    require_aligned16(p, "a 16-byte load");
    uint4 v;
    std::memcpy(&v, p, 16);
    return v;
}

void emu_st16(void* p, uint4 v) {
    require_aligned16(p, "a 16-byte store");
    std::memcpy(p, &v, 16);
}

// cp.async.cg.shared.global, 16 bytes: the destination is NaN (0xFF bytes) until the copy's
// group is waited for.
void emu_cp_async16(void* dst, const void* src) {
    require_aligned16(dst, "a cp.async destination");
    require_aligned16(src, "a cp.async source");
    std::memset(dst, 0xFF, 16);
    async_copies[threadIdx.x].push_back({dst, src, async_groups[threadIdx.x]});
}

void emu_cp_async_commit() { ++async_groups[threadIdx.x]; }

// cp.async.wait_group: every committed group but the newest `pending` has landed.
void emu_cp_async_wait(unsigned pending) {
    const unsigned t = threadIdx.x, committed = async_groups[t];
    std::vector<AsyncCopy>& q = async_copies[t];
    std::vector<AsyncCopy> left;
    for (const AsyncCopy& c : q) {
        if (c.group + pending < committed) {
            std::memcpy(c.dst, c.src, 16);
        } else {
            left.push_back(c);
        }
    }
    q.swap(left);
}

// A CUDA kernel may not depend on the order in which blocks, or threads between two barriers,
// run: a nonzero seed makes the emulator run them in a pseudo-random order of its own, so a
// result that changes with the seed shows such a dependence (float atomics, a race).
extern "C" void emu_set_schedule(unsigned long long seed) {
    schedule_seed = seed;
    schedule_state = seed;
}

void emu_launch(unsigned grid, unsigned block, const std::function<void()>& b) {
    body = &b;
    const unsigned g = grid < kMaxGrid ? grid : kMaxGrid;
    const unsigned nb = block <= kMaxBlock ? block : kBlock;
    gridDim = {g, 1, 1};
    blockDim = {nb, 1, 1};
    unsigned blocks[kMaxGrid], threads[kMaxBlock];
    order(blocks, g);
    for (unsigned bk = 0; bk < g; ++bk) {
        const unsigned bi = blocks[bk];
        blockIdx = {bi, 0, 0};
        for (unsigned i = 0; i < nb; ++i) {
            getcontext(&ctxs[i]);
            ctxs[i].uc_stack.ss_sp = stacks.data() + i * kStack;
            ctxs[i].uc_stack.ss_size = kStack;
            ctxs[i].uc_link = &sched;
            makecontext(&ctxs[i], trampoline, 0);
            state[i] = Runnable;
            async_copies[i].clear();
            async_groups[i] = 0;
        }
        // Warp by warp (in shuffled order), each warp's threads run until they wait at
        // __syncthreads or end, meeting at each warp collective on the way; then the block's
        // barrier lets all of them go on.
        const unsigned nwarps = (nb + 31) / 32;
        for (;;) {
            unsigned warps[kMaxBlock / 32];
            order(warps, nwarps);
            for (unsigned k = 0; k < nwarps; ++k) {
                const unsigned lo = 32 * warps[k], n = (nb - lo < 32 ? nb - lo : 32);
                for (;;) {
                    order(threads, n);
                    for (unsigned j = 0; j < n; ++j) {
                        const unsigned i = lo + threads[j];
                        if (state[i] != Runnable) continue;
                        cur = i;
                        threadIdx = {i, 0, 0};
                        swapcontext(&sched, &ctxs[i]);
                    }
                    unsigned at_warp = 0, at_block = 0;
                    for (unsigned i = lo; i < lo + n; ++i) {
                        at_warp += state[i] == AtWarpBarrier;
                        at_block += state[i] == AtBarrier;
                    }
                    if (at_warp == 0) break;
                    if (at_block > 0) {
                        std::fprintf(stderr, "cuda emulator: in warp %u of block %u, lanes wait at a warp collective while others wait at __syncthreads\n",
                                     warps[k], bi);
                        std::abort();
                    }
                    for (unsigned i = lo; i < lo + n; ++i)
                        if (state[i] == AtWarpBarrier) state[i] = Runnable;
                }
            }
            bool live = false;
            for (unsigned i = 0; i < nb; ++i) {
                if (state[i] == AtBarrier) {
                    state[i] = Runnable;
                    live = true;
                }
            }
            if (!live) break;
        }
    }
}
