#!/usr/bin/env bash
# The one-shot GPU check, for a machine with an NVIDIA driver and PyTorch's pip NVIDIA libraries
# but no Rust toolchain, no MPI and no network:
#   here:   cargo build --release -p dptrain-launcher --no-default-features --features cuda
#   there:  bash scripts/gpu-check.sh [path/to/dptrain]      (default target/release/dptrain)
# Prints the device, the commit and one table: (a) every op forward/backward GPU vs CPU, (b) the
# default GPT trained 20 steps on each device, (c) GPT-124M bf16 tokens/s vs PyTorch eager and
# torch.compile with MFU and device memory (benches/gpt124m_torch.py, run with
# DPTRAIN_TORCH_PYTHON or python3), dptrain with each fusion off in turn, one step profiled by
# kernel class; the same for the 10.9 M model of examples/shakespeare-char.toml against eager;
# (d) a 1-rank NCCL all-reduce and the NCCL reducer's pass in a CUDA graph; with $OUT set, each profiled step's every kernel in
# $OUT/profile-*.tsv; meant to finish within 7 minutes (torch.compile's compilation
# is most of it).
# `DPTRAIN_FLASH=0 bash scripts/gpu-check.sh` gives the unfused-attention line to compare,
# `DPTRAIN_EPILOGUE=0` the line with each linear's bias in a pass of its own. NVRTC, cuBLAS(Lt)
# and NCCL come from pip's NVIDIA wheels (PyTorch dependencies), whose lib directories are put
# on LD_LIBRARY_PATH below.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
BIN=${1:-target/release/dptrain}
if [ ! -x "$BIN" ]; then
  echo "gpu-check.sh: $BIN not found; build it on a machine with Rust (see the header of this script)" >&2
  exit 2
fi
libs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for d in glob.glob(os.path.join(sp, "nvidia", "*", "lib")):
        dirs.add(d)
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# On the device machine $OUT is the folder that comes back: every profiled kernel goes there.
timeout 480 "$BIN" gpu-check ${OUT:+--profile-out "$OUT"}
