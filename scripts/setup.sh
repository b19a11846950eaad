#!/usr/bin/env bash
# Makes a Debian/Ubuntu machine able to build (and, with --tests, test) dptrain. Each system
# requirement is checked the way the build itself uses it, not by a package name or a file that
# merely looks right:
#   cc, c++       the linker Rust calls, and the C++ compiler of the tests' CUDA emulator (cc crate)
#   mpicc -show   how rsmpi's build-probe-mpi finds Open MPI ($MPICC honoured)
#   mpirun        what runs the multi-process tests and `mpirun -np N dptrain train`
#   libclang      what bindgen (rsmpi's mpi-sys) loads through clang-sys: libclang.so,
#                 libclang-N.so, libclang.so.N or libclang-N.so.N — never libclang-cpp — found
#                 in $LIBCLANG_PATH alone when it is set, else in `llvm-config --prefix`'s lib
#                 dirs, $LD_LIBRARY_PATH, $LIBRARY_PATH and /usr/lib*, /usr/local/lib*, and a
#                 64-bit ELF file
#   python3 venv  (--tests) the venv scripts/test.sh makes for NVRTC
#   shellcheck    (--tests) checks the sbatch scripts `dptrain slurm` writes
#   slurm, munge  (--tests) a real single-node Slurm the tests start: slurmctld, slurmd, sbatch,
#                 srun with the PMIx plugin (mpi_pmix.so), and munged with its key
# Missing ones are installed with apt-get (saying which and why), then everything is checked
# again; anything still missing ends the script with one line and exit 1.
#
#   bash scripts/setup.sh [--tests] [--check]
#   --check: report each requirement (ok/missing), install nothing; exit 1 if any is missing.
#
# DPTRAIN_SETUP_ROOT=DIR searches the system library directories under DIR instead of / — the
# tests judge fake library trees with it, since the machines CI runs on already have everything.
set -euo pipefail

tests=0
check_only=0
for arg in "$@"; do
  case "$arg" in
    --tests) tests=1 ;;
    --check) check_only=1 ;;
    *) echo "scripts/setup.sh: unknown argument '$arg' (expected --tests and/or --check)" >&2; exit 2 ;;
  esac
done
root=${DPTRAIN_SETUP_ROOT:-}

# A 64-bit ELF file (clang-sys rejects other classes). Bash builtins only: the first five bytes
# hold no NUL, so `read` keeps them.
is_elf64() {
  local hdr=""
  [ -f "$1" ] && [ -r "$1" ] || return 1
  IFS= LC_ALL=C read -r -d '' -N 5 hdr <"$1" 2>/dev/null || true
  [ "$hdr" = $'\x7fELF\x02' ]
}

# Prints the libclang files clang-sys's patterns match in one directory.
libclang_in_dir() {
  local dir=$1 f name
  [ -d "$dir" ] || return 0
  for f in "$dir"/libclang.so "$dir"/libclang-*.so "$dir"/libclang.so.* "$dir"/libclang-*.so.*; do
    [ -e "$f" ] || continue
    name=${f##*/}
    # libclang-cpp.so.N is the C++ library, not libclang; clang-sys skips it and so must we.
    case "$name" in *-cpp.*) continue ;; esac
    echo "$f"
  done
}

# Prints the first valid libclang in clang-sys's search order, or fails.
find_libclang() {
  local dirs=() f d pat prefix
  if [ -n "${LIBCLANG_PATH:-}" ]; then
    # Set: clang-sys looks there alone (a file, or a directory).
    if [ -f "$LIBCLANG_PATH" ]; then
      while IFS= read -r f; do
        if [ "$f" -ef "$LIBCLANG_PATH" ] && is_elf64 "$f"; then echo "$f"; return 0; fi
      done < <(libclang_in_dir "${LIBCLANG_PATH%/*}")
      return 1
    fi
    dirs=("$LIBCLANG_PATH")
  else
    if prefix=$("${LLVM_CONFIG_PATH:-llvm-config}" --prefix 2>/dev/null) && [ -n "$prefix" ]; then
      prefix=${prefix%%$'\n'*}
      dirs+=("$prefix/bin" "$prefix/lib" "$prefix/lib64")
    fi
    local IFS=:
    for d in ${LD_LIBRARY_PATH:-} ${LIBRARY_PATH:-}; do [ -n "$d" ] && dirs+=("$d"); done
    unset IFS
    shopt -s nullglob
    for pat in "$root"/usr/local/llvm*/lib* "$root"/usr/local/lib*/*/* "$root"/usr/local/lib*/* \
      "$root"/usr/local/lib* "$root"/usr/lib*/*/* "$root"/usr/lib*/* "$root"/usr/lib*; do
      [ -d "$pat" ] && dirs+=("$pat")
    done
    shopt -u nullglob
  fi
  for d in "${dirs[@]}"; do
    while IFS= read -r f; do
      if is_elf64 "$f"; then echo "$f"; return 0; fi
    done < <(libclang_in_dir "$d")
  done
  return 1
}

# Each requirement: name, Debian package, why, and a check that prints what it found.
names=(cc c++ mpicc mpirun libclang)
packages=(gcc g++ libopenmpi-dev openmpi-bin libclang-dev)
why=("the C compiler and linker Rust builds with"
  "the C++ compiler of the tests' CUDA-kernel emulator"
  "rsmpi's build runs \`mpicc -show\` to find Open MPI's headers and libraries"
  "runs the multi-process tests and \`mpirun -np N dptrain train\`"
  "bindgen (rsmpi's mpi-sys) loads libclang.so / libclang-N.so.1; libclang-cpp does not count")
if [ $tests -eq 1 ]; then
  names+=(python3-venv shellcheck slurm munge)
  packages+=(python3-venv shellcheck slurm-wlm munge)
  why+=("scripts/test.sh installs NVRTC from PyPI into a python3 venv"
    "the tests run shellcheck on the sbatch scripts \`dptrain slurm\` writes"
    "the tests start a single-node Slurm and run a generated sbatch script under srun --mpi=pmix"
    "Slurm authenticates through munge (munged and /etc/munge/munge.key)")
fi

check() {
  case "$1" in
    cc) command -v "${CC:-cc}" ;;
    c++) command -v "${CXX:-c++}" ;;
    mpicc) "${MPICC:-mpicc}" -show >/dev/null 2>&1 && command -v "${MPICC:-mpicc}" ;;
    mpirun) command -v mpirun ;;
    libclang) find_libclang ;;
    python3-venv) python3 -c 'import venv, ensurepip' >/dev/null 2>&1 && command -v python3 ;;
    shellcheck) command -v shellcheck ;;
    slurm)
      command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        { compgen -G "$root/usr/lib*/*/slurm*/mpi_pmix*.so" || compgen -G "$root/usr/lib*/slurm*/mpi_pmix*.so"; } >/dev/null &&
        command -v srun ;;
    munge) command -v munged >/dev/null && [ -e "$root/etc/munge/munge.key" ] && command -v munge ;;
  esac
}

missing_idx() {
  local i
  for i in "${!names[@]}"; do check "${names[$i]}" >/dev/null 2>&1 || echo "$i"; done
}

if [ $check_only -eq 1 ]; then
  status=0
  for i in "${!names[@]}"; do
    if found=$(check "${names[$i]}" 2>/dev/null); then
      echo "ok       ${names[$i]}  $found"
    else
      echo "missing  ${names[$i]}  (apt package ${packages[$i]}: ${why[$i]})"
      status=1
    fi
  done
  command -v cargo >/dev/null 2>&1 || { echo "missing  cargo  (install Rust: https://rustup.rs)"; status=1; }
  exit $status
fi

mapfile -t todo < <(missing_idx)
if [ ${#todo[@]} -gt 0 ]; then
  pkgs=()
  for i in "${todo[@]}"; do
    echo "scripts/setup.sh: ${names[$i]} missing — installing ${packages[$i]} (${why[$i]})" >&2
    pkgs+=("${packages[$i]}")
  done
  SUDO=""
  if [ "$EUID" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      SUDO="sudo"
    else
      echo "scripts/setup.sh: not root and no sudo; as root run: apt-get install -y ${pkgs[*]}" >&2
      exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/setup.sh: no apt-get on this machine; install the equivalents of: ${pkgs[*]}" >&2
    exit 1
  fi
  $SUDO apt-get update -qq >&2 || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null || true
  hash -r
  mapfile -t still < <(missing_idx)
  if [ ${#still[@]} -gt 0 ]; then
    msg=()
    for i in "${still[@]}"; do msg+=("${names[$i]} (${packages[$i]})"); done
    echo "scripts/setup.sh: still missing after apt-get install: ${msg[*]}" >&2
    exit 1
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/setup.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
