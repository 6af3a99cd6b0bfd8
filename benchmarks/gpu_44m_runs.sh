#!/usr/bin/env bash
# Issue #4/#5 device call (4 GPUs): MoEUT-44M (DDP on GPUs 0,1) and dense-44M (DDP on GPUs 2,3) trained
# at the same time on the machine's Python sources, with one shared tokenizer and the same token budget;
# each model is then evaluated on every zero-shot task in full, its tasks split over its two GPUs.
#   bash benchmarks/gpu_44m_runs.sh   (expects .gpuassets/tokenizer.model and .evaldata/ carried along)
# Results: $OUT/results.tgz (training logs, metrics, eval JSON and logs).
set -u
OUT=${OUT:-out}; R=$OUT/r44; mkdir -p "$R"
export PYTHONUNBUFFERED=1 MOEUT_AUTOTUNE=0   # one kernel config: no autotune compile time in a short run
STEPS=${STEPS:-763}                          # 763 steps x 64 x 1024 tokens = 50.0M tokens
TRAIN_LIMIT=${TRAIN_LIMIT:-420}; EVAL_LIMIT=${EVAL_LIMIT:-150}
{ date -u; nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } | tee "$R/env.txt"
train() {  # model, GPUs (SIGTERM at the limit: the trainer checkpoints and exits cleanly)
  local t0=$SECONDS
  mkdir -p /tmp/r_$1 && cp .gpuassets/tokenizer.model /tmp/r_$1/
  CUDA_VISIBLE_DEVICES=$2 timeout -s TERM "$TRAIN_LIMIT" python3 -m torch.distributed.run --standalone \
    --nproc_per_node=2 -m moeut train --model "$1" --steps "$STEPS" --batch-size 64 --context 1024 \
    --out /tmp/r_$1 --eval-interval 250 --eval-windows 256 --log-interval 25 --ckpt-interval 250 \
    --no-progress --no-tensorboard --cache-dir /tmp/cache_$1 > "$R/train_$1.txt" 2>&1
  echo "[train $1: rc $? in $((SECONDS - t0)) s]" | tee -a "$R/train_$1.txt"
  cp /tmp/r_$1/metrics.jsonl "$R/metrics_$1.jsonl"
}
evaluate() {  # model, GPU, part name, tasks
  local t0=$SECONDS
  CUDA_VISIBLE_DEVICES=$2 timeout "$EVAL_LIMIT" python3 -m moeut eval --checkpoint /tmp/r_$1 --tasks "$4" \
    --data-dir .evaldata --batch-size 128 --json "$R/eval_$1_$3.json" > "$R/eval_$1_$3.txt" 2>&1
  echo "[eval $1 $4: rc $? in $((SECONDS - t0)) s]" | tee -a "$R/eval_$1_$3.txt"
}
train_and_eval() {  # model, GPU a, GPU b
  train "$1" "$2,$3"
  evaluate "$1" "$2" a blimp,lambada &
  evaluate "$1" "$3" b hellaswag,piqa,arc_easy,arc_challenge &
  wait
}
train_and_eval moeut-44M 0 1 &
train_and_eval dense-44M 2 3 &
wait
for f in "$R"/train_*.txt; do echo "== $f"; grep -v Warn "$f" | tail -5; done
for f in "$R"/eval_*.txt; do echo "== $f"; grep -v "Warn\|it/s\|batch/s\|paradigm" "$f" | tail -12; done
tar czf "$OUT/results.tgz" -C "$OUT" r44 && rm -rf "$R"
