// The emulator's scheduler (see emu.h).
#include "emu.h"

#include <ucontext.h>

#include <vector>

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {
constexpr unsigned kBlock = 64;
constexpr unsigned kMaxGrid = 2;
constexpr size_t kStack = 256 * 1024;
enum State { Runnable, AtBarrier, Done };

ucontext_t sched;
ucontext_t ctxs[kBlock];
State state[kBlock];
unsigned cur;
const std::function<void()>* body;
std::vector<char> stacks(kBlock* kStack);
float slots[kBlock];

void trampoline() {
    (*body)();
    state[cur] = Done;
    swapcontext(&ctxs[cur], &sched);
}
}  // namespace

void __syncthreads() {
    state[cur] = AtBarrier;
    swapcontext(&ctxs[cur], &sched);
}

float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const unsigned t = threadIdx.x;
    slots[t] = v;
    __syncthreads();
    const float r = slots[t ^ (unsigned)lane_mask];
    __syncthreads();
    return r;
}

void emu_launch(unsigned grid, unsigned, const std::function<void()>& b) {
    body = &b;
    const unsigned g = grid < kMaxGrid ? grid : kMaxGrid;
    gridDim = {g, 1, 1};
    blockDim = {kBlock, 1, 1};
    for (unsigned bi = 0; bi < g; ++bi) {
        blockIdx = {bi, 0, 0};
        for (unsigned i = 0; i < kBlock; ++i) {
            getcontext(&ctxs[i]);
            ctxs[i].uc_stack.ss_sp = stacks.data() + i * kStack;
            ctxs[i].uc_stack.ss_size = kStack;
            ctxs[i].uc_link = &sched;
            makecontext(&ctxs[i], trampoline, 0);
            state[i] = Runnable;
        }
        // Rounds: every live thread runs to its next barrier or to its end.
        for (;;) {
            bool live = false;
            for (unsigned i = 0; i < kBlock; ++i) {
                if (state[i] == Done) continue;
                live = true;
                state[i] = Runnable;
                cur = i;
                threadIdx = {i, 0, 0};
                swapcontext(&sched, &ctxs[i]);
            }
            if (!live) break;
        }
    }
}
