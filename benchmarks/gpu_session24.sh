#!/usr/bin/env bash
# Twenty-fourth session's one device call: the fixed GPU test, the seeded 44M comparison (issue 29),
# the expert statistics' cost (issue 31) and FSDP2 over a group of one on MoEUT_1B (issue 32).
#   OUT=$OUT bash benchmarks/gpu_session24.sh        (carry [".gpuassets"]: english/, eval/, english_paper.model)
set -u
export PYTHONUNBUFFERED=1 MOEUT_AUTOTUNE=0
S=$OUT/s; mkdir -p "$S"; D=.gpuassets/english
{ date -u; nvidia-smi -L; git log --oneline -1; python3 -c 'import torch,triton;print(torch.__version__,triton.__version__)'; } > "$S/env.txt" 2>&1
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py -k aligned > "$S/aligned.txt" 2>&1; echo "rc=$?" >> "$S/aligned.txt"
tail -2 "$S/aligned.txt"
timeout 340 python3 benchmarks/seeded_comparison.py --data $D/python-docs.jsonl.gz,$D/linux-docs.jsonl.gz \
  --tokenizer .gpuassets/english_paper.model --models moeut-44M,dense-44M --seeds 0,1,2 --steps 200 --batch-size 32 \
  --eval-data .gpuassets/eval --eval-limit 300 --out /tmp/runs --json "$S/seeded.json" 2>&1 | tr '\r' '\n' \
  | grep -v "batch/s" > "$S/seeded_log.txt"; echo "rc=${PIPESTATUS[0]}" >> "$S/seeded_log.txt"
grep "^{\|rc=\|Error" "$S/seeded_log.txt" | cut -c1-300 | tail -8
timeout 45 python3 benchmarks/logging_cost.py --models moeut-44M,moeut-244M > "$S/logging_cost.txt" 2>&1; echo "rc=$?" >> "$S/logging_cost.txt"
grep -v Warn "$S/logging_cost.txt" | tail -5
timeout 75 python3 benchmarks/fsdp_check.py --model moeut-1B --data $D/python-docs.jsonl.gz \
  --tokenizer .gpuassets/english_paper.model --steps 8 --batch-size 8 > "$S/fsdp_check.txt" 2>&1; echo "rc=$?" >> "$S/fsdp_check.txt"
grep -v "Warn\|warn" "$S/fsdp_check.txt" | tail -14
