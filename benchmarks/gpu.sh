#!/usr/bin/env bash
# The maintained GPU benchmarks, one stage per question (benchmarks/README.md has the table). Each
# stage writes the results file RESULTS.md names, under $OUT (copy it to benchmarks/results/):
#
#   OUT=out bash benchmarks/gpu.sh tests throughput kernels decode      # any stages, in this order
#
# Stages: tests (the GPU test modules), throughput (graphed training steps, MoEUT and dense, 44M-1B),
# official (the official release at 244M; its checkout as $OFFICIAL), kernels (the σ-MoE FFN's passes
# against their bounds), decode (batch 1 and 32), profile (where a 244M step's time goes), fsdp (FSDP2's
# two reshard settings on MoEUT_1B, and what the trainer's expert statistics cost), quality (time to quality: benchmarks/quality.sh), before_after (the
# graphed 244M and 1B steps of an earlier tree, carried as $BASELINE, and of this one, in one call).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } > "$OUT/env.txt" 2>&1
MAIN=moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8
ALL=moeut-44M:32,dense-44M:32,moeut-126M:16,dense-126M:16,$MAIN
run() {  # stage, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "[$name: rc=$? after $((SECONDS - t0)) s]"; grep -v "^\s*$" "$OUT/$name.txt" | tail -15
}
for stage in "$@"; do
  case $stage in
    tests) run tests 480 python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=8 ;;
    throughput) run throughput 300 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models "$ALL" \
                  --json "$OUT/throughput.json" ;;
    official) run official 200 python3 benchmarks/train_throughput.py --steps 6 --official "${OFFICIAL:-.official}" \
                --models official-244M:16 --json "$OUT/throughput_official.json" ;;
    kernels) run ffn_kernels 150 python3 benchmarks/kernel_bench.py --json "$OUT/ffn_kernels.json" ;;
    decode) run decode 240 python3 benchmarks/decode.py --new-tokens 128 --modes static+graph --json "$OUT/decode.json" ;;
    profile) run profile_244m 90 python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 30 \
               --json "$OUT/profile_244m.json" ;;
    fsdp) run fsdp 120 python3 benchmarks/fsdp_reshard.py --model moeut-1B --batch-size 8 --context 1024 --steps 4
          run expert_statistics_cost 120 python3 benchmarks/expert_statistics_cost.py --models moeut-44M,moeut-244M ;;
    quality) OUT=$OUT/quality bash benchmarks/quality.sh ;;
    before_after) for side in before after; do tree=.; [ $side = after ] || tree=${BASELINE:-.baseline}
                    run "before_after_$side" 280 python3 "$tree/benchmarks/train_throughput.py" --steps 6 --cuda-graph \
                      --models "$MAIN" --json "$OUT/before_after_$side.json"; done ;;
    *) echo "unknown stage $stage (see the top of benchmarks/gpu.sh)" >&2; exit 2 ;;
  esac
done
