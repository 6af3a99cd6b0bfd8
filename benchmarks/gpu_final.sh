#!/usr/bin/env bash
# Last device call of the 2026-11-28 session: throughput after the memory fix, a short MoEUT-44M vs
# dense-44M training on the machine's Python sources with one tokenizer, and both through `moeut eval`.
#   bash benchmarks/gpu_final.sh  (expects .gpuassets/tokenizer.model and .evaldata/ carried along)
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-300}
timeout 50 python3 benchmarks/train_throughput.py --steps 5 --models moeut-244M:16,moeut-1B:8 \
  --json "$OUT/train_memfix.json" 2>&1 | grep -v Warn | tee "$OUT/train_memfix.txt"
for m in moeut-44M dense-44M; do
  mkdir -p /tmp/r_$m && cp .gpuassets/tokenizer.model /tmp/r_$m/
  /usr/bin/time -f "%e s wall" timeout 80 python3 -m moeut train --model $m --steps $STEPS --batch-size 16 \
    --context 1024 --out /tmp/r_$m --eval-interval $STEPS --eval-windows 64 --log-interval 50 \
    --ckpt-interval $STEPS --no-progress --no-tensorboard --cache-dir /tmp/cache > "$OUT/train_$m.txt" 2>&1
  tail -6 "$OUT/train_$m.txt"; grep tokens_per_s /tmp/r_$m/metrics.jsonl | tail -1 | cut -c1-200
done
for m in moeut-44M dense-44M; do
  timeout 30 python3 -m moeut eval --checkpoint /tmp/r_$m --tasks all --data-dir .evaldata --limit 300 \
    --batch-size 64 --json "$OUT/eval_$m.json" 2>&1 | grep -v "it/s\|batch/s\|paradigm" | tail -12
done
