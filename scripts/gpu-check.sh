#!/usr/bin/env bash
# The one-shot GPU check, for a machine with an NVIDIA driver and PyTorch's pip NVIDIA libraries
# but no Rust toolchain, no MPI and no network:
#   here:   cargo build --release -p dptrain-launcher --no-default-features --features cuda
#   there:  bash scripts/gpu-check.sh [path/to/dptrain]      (default target/release/dptrain)
# Prints the device, the commit and one table: (a) every op forward/backward GPU vs CPU, (b) the
# default GPT trained 20 steps on each device with each optimizer, (c) GPT-124M bf16 tokens/s vs PyTorch eager and
# torch.compile with MFU and device memory (benches/gpt124m_torch.py, run with
# DPTRAIN_TORCH_PYTHON or python3), dptrain with each fusion off in turn, one step profiled by
# kernel class; the same for the 10.9 M model of examples/shakespeare-char.toml against eager;
# (d) a 1-rank NCCL all-reduce and the NCCL reducer's pass in a CUDA graph; with $OUT set, each profiled step's every kernel in
# $OUT/profile-*.tsv and the whole output in $OUT/gpu-check.log; meant to finish within 7 minutes (torch.compile's compilation
# is most of it).
# A check that fails within 4 minutes (a kernel fault ends the CUDA context) runs once more
# with DPTRAIN_FLASH=0 DPTRAIN_WIDE_LOADS=0 DPTRAIN_GELU_EPILOGUE=0 DPTRAIN_SOLVER=0, its profiles in $OUT/retry;
# the exit code is the first run's.
# `DPTRAIN_FLASH=0 bash scripts/gpu-check.sh` gives the unfused-attention line to compare,
# `DPTRAIN_EPILOGUE=0` the line with each linear's bias in a pass of its own. NVRTC, cuBLAS(Lt),
# cuSOLVER and NCCL come from pip's NVIDIA wheels (PyTorch dependencies), whose lib directories are put
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
# The whole output also goes to $OUT/gpu-check.log as it is printed: the device tool returns only
# the tail of stdout (the table is longer), and a run cut short by a time limit keeps its log.
if [ -n "${OUT:-}" ] && mkdir -p "$OUT"; then
  exec > >(tee -a "$OUT/gpu-check.log") 2>&1
fi
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# On the device machine $OUT is the folder that comes back: every profiled kernel goes there.
start=$SECONDS
timeout 480 "$BIN" gpu-check ${OUT:+--profile-out "$OUT"}
rc=$?
# A kernel fault (an illegal address, say) ends the process's CUDA context and every part after
# it. A GPU visit is minutes long, so when the check fails early it runs once more with the
# newest kernels off (flash attention, 16-byte loads, GELU in cuBLASLt's epilogues, SOAP's
# refresh in cuSOLVER: the paths only a GPU can fault in), which still gives part (c)'s speed on the remaining paths.
elapsed=$((SECONDS - start))
if [ "$rc" -ne 0 ] && [ "$elapsed" -lt 240 ] && { [ "${DPTRAIN_FLASH:-1}" != 0 ] || [ "${DPTRAIN_WIDE_LOADS:-1}" != 0 ] || [ "${DPTRAIN_GELU_EPILOGUE:-1}" != 0 ] || [ "${DPTRAIN_SOLVER:-1}" != 0 ]; }; then
  echo "gpu-check.sh: the check failed (exit $rc after ${elapsed} s); once more with DPTRAIN_FLASH=0 DPTRAIN_WIDE_LOADS=0 DPTRAIN_GELU_EPILOGUE=0 DPTRAIN_SOLVER=0"
  DPTRAIN_FLASH=0 DPTRAIN_WIDE_LOADS=0 DPTRAIN_GELU_EPILOGUE=0 DPTRAIN_SOLVER=0 timeout $((540 - elapsed)) "$BIN" gpu-check ${OUT:+--profile-out "$OUT/retry"}
  echo "gpu-check.sh: the retry exited $?"
fi
exit "$rc"
