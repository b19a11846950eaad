#!/usr/bin/env bash
# Installs the system packages dptrain builds against: Open MPI (the `mpi` feature, on by
# default), libclang (rsmpi's bindgen) and g++ (the tests' CPU emulator of the CUDA kernels).
# Debian/Ubuntu; needs root or sudo. Idempotent.
set -euo pipefail
need=()
command -v mpicc >/dev/null 2>&1 || need+=(libopenmpi-dev)
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin)
command -v g++ >/dev/null 2>&1 || need+=(g++)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "scripts/setup.sh: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "scripts/setup.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 2
fi
