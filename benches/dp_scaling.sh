#!/usr/bin/env bash
# Data-parallel scaling and overlap on one node, printed as tables:
#  - GPT-mini (vocab 256, ctx 128, d 128, 4 layers, 4 heads), per-rank batch 16, 1 thread per
#    rank: samples/s with 1 rank and with 2 ranks (mpirun), and the efficiency
#    sps(2) / (2 · sps(1));
#  - 2 ranks with comm.overlap on and off: median step time and the fraction of communication
#    time hidden behind backward (the reducer's own measurement, `comm_hidden` in metrics).
# Usage: bash benches/dp_scaling.sh [steps]   (needs Open MPI; builds the release binary)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-20}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 DPTRAIN_LOG=error
cargo build --release -q --bin dptrain
BIN=target/release/dptrain
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
common=(--set data.vocab=256 --set model.context=128 --set model.d_model=128 --set model.n_layers=4 --set model.n_heads=4
        --set run.threads=1 --set run.log_every=1 --set train.eval_every=0 --set train.checkpoint_every=0 --set checkpoint.keep_last=1
        --set train.steps="$STEPS" --set data.train_tokens=200000)
"$BIN" train "${common[@]}" --set train.global_batch=16 --run-dir "$OUT/one" > /dev/null
mpirun --oversubscribe --bind-to none -np 2 "$BIN" train "${common[@]}" --set train.global_batch=32 --run-dir "$OUT/two" > /dev/null
mpirun --oversubscribe --bind-to none -np 2 "$BIN" train "${common[@]}" --set train.global_batch=32 --set comm.overlap=false --run-dir "$OUT/two-seq" > /dev/null
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def recs(d):
    return [json.loads(l) for l in open(f"{out}/{d}/metrics.jsonl") if '"loss"' in l][3:]  # skip warm-up
def sps(d):
    return statistics.median(r["samples_per_s"] for r in recs(d))
one, two = sps("one"), sps("two")
print("\nDP scaling, GPT-mini, per-rank batch 16, 1 thread per rank (median samples/s after 3 warm-up steps)")
print("| ranks | samples/s | efficiency |")
print("|---|---|---|")
print(f"| 1 | {one:.1f} | 1.00 |")
print(f"| 2 | {two:.1f} | {two / (2 * one):.2f} |")
print("\nOverlap, 2 ranks (median step time; hidden = 1 − wait/comm, mean over steps)")
print("| comm.overlap | step ms | comm ms | hidden |")
print("|---|---|---|---|")
for d, name in (("two", "true"), ("two-seq", "false")):
    r = recs(d)
    step = statistics.median(32 / x["samples_per_s"] * 1e3 for x in r)
    comm = statistics.median(x["comm_s"] * 1e3 for x in r)
    hidden = statistics.mean(x["comm_hidden"] for x in r)
    print(f"| {name} | {step:.1f} | {comm:.2f} | {hidden:.2f} |")
PY
