#!/usr/bin/env bash
# One device call: GPU tests, kernel parity + pass timings, a step profile, training throughput
# (ours, dense, Llama; the official release if its checkout is at $OFFICIAL) and decode speed.
#   bash benchmarks/gpu_check_and_bench.sh     (results under $OUT)
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
OFFICIAL=${OFFICIAL:-.official}
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.txt"
t0=$SECONDS
timeout 110 python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | grep -v Warn | tail -6 | tee "$OUT/gpu_tests.txt"
echo "[tests $((SECONDS - t0)) s]"; t0=$SECONDS
timeout 110 python3 benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | grep -v Warn | tee "$OUT/kernels.txt"
echo "[kernels $((SECONDS - t0)) s]"; t0=$SECONDS
timeout 40 python3 benchmarks/attention_block.py --json "$OUT/attention_block.json" 2>&1 | grep -v Warn | tee "$OUT/attention_block.txt"
timeout 40 python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 25 2>&1 | grep -v Warn | tee "$OUT/profile_244M.txt"
echo "[profile $((SECONDS - t0)) s]"; t0=$SECONDS
timeout 120 python3 benchmarks/train_throughput.py --steps 6 \
  --models moeut-244M:16,dense-244M:16,llama-244M:16,moeut-1B:8,dense-1B:8,moeut-44M:32,dense-44M:32 \
  --json "$OUT/train.json" 2>&1 | grep -v Warn | tee "$OUT/train.txt"
echo "[train $((SECONDS - t0)) s]"; t0=$SECONDS
[ -d "$OFFICIAL" ] && timeout 80 python3 benchmarks/train_throughput.py --steps 6 --official "$OFFICIAL" \
  --models official-244M:16 --json "$OUT/train_official.json" 2>&1 | grep -v Warn | tee "$OUT/train_official.txt"
echo "[official $((SECONDS - t0)) s]"; t0=$SECONDS
timeout 80 python3 benchmarks/decode.py --new-tokens 64 --json "$OUT/decode.json" 2>&1 | grep -v Warn | tee "$OUT/decode.txt"
echo "[decode $((SECONDS - t0)) s]"
