#!/usr/bin/env bash
# The test command (README, CI): installs what the tests need on a fresh machine, then runs
# every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
  echo "scripts/test.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 2
fi
cargo test --workspace
