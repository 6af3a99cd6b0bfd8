#!/usr/bin/env bash
# Twenty-sixth session, why quack's down dx lost in the graphed step: that pass alone at the step's token
# counts (1B: batch 8 x 1024 = 8192; 244M: 16384) with the config sweep, and a 1B step profiled with the
# backend on and off.     (call 1 as in gpu_session26.sh; call 2, carry [".hopper/b"])
set -u
export PYTHONUNBUFFERED=1 MOEUT_AUTOTUNE=0
S=$OUT/s; mkdir -p "$S"
source benchmarks/install_hopper.sh > "$S/env.txt" 2>&1 || { tail -5 "$S/env.txt"; exit 3; }
timeout 60 python3 benchmarks/quack_experts.py --shapes 1B --tokens 8192 --only "down dx" --sweep-until 45 \
  --json "$S/quack_8192.json" > "$S/quack_8192.txt" 2>&1; grep "^|\|^  1B" "$S/quack_8192.txt"
for switch in 1 0; do limit=60; [ $switch = 1 ] && limit=100
  MOEUT_HOPPER_GEMM=$switch timeout $limit python3 benchmarks/profile_step.py --model moeut-1B --batch 8 --top 14 --steps 2 \
    --json "$S/profile_1B_$switch.json" > "$S/profile_1B_$switch.txt" 2>&1
done
python3 benchmarks/profile_diff.py "$S/profile_1B_0.json" "$S/profile_1B_1.json" 2>&1 | head -30
cd "$OUT" && tar czf s.tgz s && rm -rf s
