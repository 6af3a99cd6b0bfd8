#!/usr/bin/env bash
# Issue #4/#5 device call (2 GPUs): MoEUT-44M and dense-44M trained with DDP on both GPUs on the
# machine's Python sources with one shared tokenizer and the same token budget, then both evaluated
# on every zero-shot task in full, one model per GPU.
#   bash benchmarks/gpu_44m_runs.sh   (expects .gpuassets/tokenizer.model and .evaldata/ carried along)
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOEUT_AUTOTUNE=0   # one kernel config: no autotune compile time in a short run
STEPS=${STEPS:-763}                          # 763 steps x 64 x 1024 tokens = 50.0M tokens
{ date -u; nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } | tee "$OUT/env.txt"
for m in moeut-44M dense-44M; do
  mkdir -p /tmp/r_$m && cp .gpuassets/tokenizer.model /tmp/r_$m/
done
train() {  # model, time limit (SIGTERM: the trainer checkpoints and exits cleanly)
  local t0=$SECONDS
  timeout -s TERM "$2" python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m moeut train \
    --model "$1" --steps "$STEPS" --batch-size 64 --context 1024 --out /tmp/r_$1 --eval-interval 250 \
    --eval-windows 256 --log-interval 25 --ckpt-interval 250 --no-progress --no-tensorboard \
    --cache-dir /tmp/cache > "$OUT/train_$1.txt" 2>&1
  echo "[$1: rc $? in $((SECONDS - t0)) s]"
  grep -v Warn "$OUT/train_$1.txt" | tail -8
  cp /tmp/r_$1/metrics.jsonl "$OUT/metrics_$1.jsonl"
}
train moeut-44M 330
train dense-44M 150
t0=$SECONDS
CUDA_VISIBLE_DEVICES=0 timeout 110 python3 -m moeut eval --checkpoint /tmp/r_moeut-44M --tasks all \
  --data-dir .evaldata --batch-size 128 --json "$OUT/eval_moeut-44M.json" > "$OUT/eval_moeut-44M.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 110 python3 -m moeut eval --checkpoint /tmp/r_dense-44M --tasks all \
  --data-dir .evaldata --batch-size 128 --json "$OUT/eval_dense-44M.json" > "$OUT/eval_dense-44M.txt" 2>&1 &
wait
echo "[evals $((SECONDS - t0)) s]"
for m in moeut-44M dense-44M; do echo "== $m"; grep -v "Warn\|it/s\|batch/s\|paradigm" "$OUT/eval_$m.txt" | tail -14; done
