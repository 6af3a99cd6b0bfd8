#!/usr/bin/env bash
# Stages of gpu_check_and_bench.sh in parallel lanes, one GPU per lane, in one device call:
#   bash benchmarks/gpu_lanes.sh "tests parity kernels attention profile" "train train_small" ...
# Lane i runs on GPU i and writes under $OUT/gpu$i. Every lane is cut at $LANE_LIMIT seconds, then
# all results are packed into $OUT/results.tgz (the device tool returns at most 8 files).
# Lanes share the host's CPUs only: timings on one GPU are not disturbed by the other GPUs' work.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
LANE_LIMIT=${LANE_LIMIT:-540}
i=0
for stages in "$@"; do
  mkdir -p "$OUT/gpu$i"
  CUDA_VISIBLE_DEVICES=$i OUT="$OUT/gpu$i" timeout "$LANE_LIMIT" \
    bash "$(dirname "$0")/gpu_check_and_bench.sh" $stages > "$OUT/gpu$i/lane.txt" 2>&1 &
  i=$((i + 1))
done
wait
for d in "$OUT"/gpu*; do echo "===== $d"; grep -v "^\s*$" "$d/lane.txt" | tail -60; done
tar czf "$OUT/results.tgz" -C "$OUT" $(cd "$OUT" && ls -d gpu*) && rm -rf "$OUT"/gpu*
