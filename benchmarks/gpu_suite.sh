#!/usr/bin/env bash
# One device call: official parity, kernel and training benchmarks (+ optional GPU tests).
#   bash benchmarks/gpu_suite.sh [official_checkout] [pytest -k expression]
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
OFFICIAL=${1:-.official}
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.txt"
[ -n "${2:-}" ] && python3 -m pytest -q -s tests/gpu -p no:cacheprovider -k "$2" 2>&1 | tee "$OUT/gpu_tests.txt" | grep -v Warn | tail -8
[ -d "$OFFICIAL" ] && timeout 120 python3 benchmarks/compare_official.py --official "$OFFICIAL" --json "$OUT/parity.json" 2>&1 | grep -v Warning | tee "$OUT/parity.txt"
timeout 200 python3 benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
timeout 300 python3 benchmarks/train_throughput.py ${OFFICIAL:+--official "$OFFICIAL"} --json "$OUT/train.json" 2>&1 | grep -v Warning | tee "$OUT/train.txt"
