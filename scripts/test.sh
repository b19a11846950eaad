#!/usr/bin/env bash
# The test command (README, CI): installs what the tests need on a fresh machine, then runs
# every test of the workspace, the multi-process ones under mpirun -np 2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Open MPI refuses root without these; CI and dev machines here run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo test --workspace
