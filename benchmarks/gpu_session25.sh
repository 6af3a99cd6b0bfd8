#!/usr/bin/env bash
# Twenty-fifth session's device calls, one stage per call:
#   OUT=$OUT SEEDS=0,1 bash benchmarks/gpu_session25.sh seeded     (carry [".gpuassets"]: english/, eval/, the model)
#   OUT=$OUT SEEDS=2 bash benchmarks/gpu_session25.sh seeded tests  (the second call: the last seed, then GPU tests)
#   OUT=$OUT bash benchmarks/gpu_session25.sh costs                 (logging cost, FSDP2 on MoEUT_1B)
set -u
export PYTHONUNBUFFERED=1 MOEUT_AUTOTUNE=0
S=$OUT/s; mkdir -p "$S"
{ date -u; nvidia-smi -L; git log --oneline -1; python3 -c 'import torch,triton;print(torch.__version__,triton.__version__)'; } > "$S/env.txt" 2>&1
for stage in "$@"; do
case "$stage" in
seeded)
  D=.gpuassets/english
  timeout 560 python3 benchmarks/seeded_comparison.py --data $D/python-docs.jsonl.gz,$D/linux-docs.jsonl.gz \
    --tokenizer .gpuassets/english_paper.model --models moeut-44M,dense-44M --seeds "${SEEDS:-0,1,2}" --steps "${STEPS:-300}" \
    --batch-size 32 --budgets 3 --eval-data .gpuassets/eval --eval-limit 300 --out /tmp/runs --json "$S/seeded_${SEEDS:-all}.json" 2>&1 \
    | tr '\r' '\n' | grep -v "batch/s" > "$S/seeded_log.txt"; echo "rc=${PIPESTATUS[0]}" >> "$S/seeded_log.txt"
  grep "^{\|rc=\|Error\|step mode" "$S/seeded_log.txt" | cut -c1-400 | tail -12 ;;
tests)
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py -k aligned > "$S/test_kernels.txt" 2>&1; echo "rc=$?" >> "$S/test_kernels.txt"
  tail -3 "$S/test_kernels.txt"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_models.py -k "not compile" > "$S/test_models.txt" 2>&1; echo "rc=$?" >> "$S/test_models.txt"
  tail -3 "$S/test_models.txt" ;;
costs)
  timeout 45 python3 benchmarks/logging_cost.py --models moeut-44M,moeut-244M > "$S/logging_cost.txt" 2>&1; echo "rc=$?" >> "$S/logging_cost.txt"
  grep -v Warn "$S/logging_cost.txt" | tail -5
  timeout 90 python3 benchmarks/fsdp_check.py --model moeut-1B --data .gpuassets/english/python-docs.jsonl.gz \
    --tokenizer .gpuassets/english_paper.model --steps 8 --batch-size 8 > "$S/fsdp_check.txt" 2>&1; echo "rc=$?" >> "$S/fsdp_check.txt"
  grep -v "Warn\|warn" "$S/fsdp_check.txt" | tail -14 ;;
esac
done
cd "$OUT" && tar czf s.tgz s && rm -rf s
