#!/usr/bin/env bash
# The test command (README, CI): installs what the tests need on a fresh machine, then runs
# every test of the workspace — the multi-process ones under mpirun -np 2, and the NVRTC
# compile check of every CUDA kernel (NVRTC 13.0 from PyPI; no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
# Open MPI refuses root without these; CI and dev machines here run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
NVRTC_VENV=${DPTRAIN_NVRTC_VENV:-/tmp/dptrain-nvrtc-venv}
NVRTC_LIB="$NVRTC_VENV/lib/python3.11/site-packages/nvidia/cu13/lib"
if ! ls "$NVRTC_VENV"/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13 >/dev/null 2>&1; then
  python3 -m venv "$NVRTC_VENV"
  "$NVRTC_VENV/bin/pip" install -q 'nvidia-cuda-nvrtc==13.0.*'
fi
NVRTC_LIB=$(ls -d "$NVRTC_VENV"/lib/python3*/site-packages/nvidia/cu13/lib | head -n1)
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DPTRAIN_REQUIRE_NVRTC=1
# cuda-emu: the CUDA kernels also run on their CPU emulator (core/tests/cuda_emu.rs and the
# trainer's GPU path in launcher/tests/cli.rs), so the GPU code is exercised without a GPU.
# fault-injection: `dptrain train --fault` kills or hangs a rank (launcher/tests/mpi.rs).
# The emulator runs blocks and threads in a shuffled order, not index order, so a kernel whose
# result depends on the order (float atomics, a race) fails the bit-for-bit comparisons.
export DPTRAIN_CUDA_EMULATOR_SCHEDULE=${DPTRAIN_CUDA_EMULATOR_SCHEDULE:-1}
cargo test --workspace --features dptrain-launcher/cuda-emu,dptrain-launcher/fault-injection
# Each emulated device buffer borders an inaccessible page, right after its end above; again with
# the page right before its start, for the kernels' op checks and the optimizers, so an access
# before a buffer (a negative index: padding, causal offsets) faults too.
DPTRAIN_CUDA_EMULATOR_GUARD=front cargo test --workspace --features dptrain-launcher/cuda-emu,dptrain-launcher/fault-injection \
  --test cuda_emu --test optim_emu
