#!/usr/bin/env bash
# The second of issue 33's two device calls (see stage_hopper_wheels.sh): install quack and the CuTe DSL
# from the carried parts, then time the expert passes against ours.   OUT=$OUT bash benchmarks/gpu_quack.sh
set -u
export PYTHONUNBUFFERED=1 MOEUT_AUTOTUNE=0
S=$OUT/s; mkdir -p "$S"
{ date -u; nvidia-smi -L; python3 -c 'import torch,triton;print(torch.__version__,triton.__version__)'; } > "$S/env.txt" 2>&1
source benchmarks/install_hopper.sh >> "$S/env.txt" 2>&1 || { tail -5 "$S/env.txt"; exit 3; }
timeout 530 python3 benchmarks/quack_experts.py --shapes 244M,1B --sweep-until 430 --json "$S/quack.json" > "$S/quack.txt" 2>&1
echo "rc=$?" >> "$S/quack.txt"
grep -v "^  File\|^    " "$S/quack.txt" | tail -30
cd "$OUT" && tar czf s.tgz s && rm -rf s
