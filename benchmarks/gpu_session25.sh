#!/usr/bin/env bash
# Twenty-fifth session's device calls, one stage per call:
#   OUT=$OUT bash benchmarks/gpu_session25.sh seeded   (carry [".gpuassets"]: english/, eval/, english_paper.model)
#   OUT=$OUT bash benchmarks/gpu_session25.sh tests    (carry [".hopper"]: part a of the CuTe DSL library, docs, model)
#   OUT=$OUT bash benchmarks/gpu_session25.sh quack    (carry [".hopper"]: part b and the wheels; right after "tests")
set -u
export PYTHONUNBUFFERED=1 MOEUT_AUTOTUNE=0
S=$OUT/s; mkdir -p "$S"
{ date -u; nvidia-smi -L; git log --oneline -1; python3 -c 'import torch,triton;print(torch.__version__,triton.__version__)'; } > "$S/env.txt" 2>&1
case "$1" in
seeded)
  D=.gpuassets/english
  timeout 560 python3 benchmarks/seeded_comparison.py --data $D/python-docs.jsonl.gz,$D/linux-docs.jsonl.gz \
    --tokenizer .gpuassets/english_paper.model --models moeut-44M,dense-44M --seeds 0,1,2 --steps "${STEPS:-300}" \
    --batch-size 32 --budgets 3 --eval-data .gpuassets/eval --eval-limit 300 --out /tmp/runs --json "$S/seeded.json" 2>&1 \
    | tr '\r' '\n' | grep -v "batch/s" > "$S/seeded_log.txt"; echo "rc=${PIPESTATUS[0]}" >> "$S/seeded_log.txt"
  grep "^{\|rc=\|Error\|step mode" "$S/seeded_log.txt" | cut -c1-400 | tail -12 ;;
tests)
  mkdir -p /tmp/hopper && cp .hopper/part_a /tmp/hopper/ 2>/dev/null
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py > "$S/test_kernels.txt" 2>&1; echo "rc=$?" >> "$S/test_kernels.txt"
  tail -3 "$S/test_kernels.txt"
  timeout 230 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_models.py -k "not compile" > "$S/test_models.txt" 2>&1; echo "rc=$?" >> "$S/test_models.txt"
  tail -3 "$S/test_models.txt"
  timeout 45 python3 benchmarks/logging_cost.py --models moeut-44M,moeut-244M > "$S/logging_cost.txt" 2>&1; echo "rc=$?" >> "$S/logging_cost.txt"
  grep -v Warn "$S/logging_cost.txt" | tail -5
  timeout 90 python3 benchmarks/fsdp_check.py --model moeut-1B --data .hopper/python-docs.jsonl.gz \
    --tokenizer .hopper/english_paper.model --steps 8 --batch-size 8 > "$S/fsdp_check.txt" 2>&1; echo "rc=$?" >> "$S/fsdp_check.txt"
  grep -v "Warn\|warn" "$S/fsdp_check.txt" | tail -14 ;;
quack)
  cat /tmp/hopper/part_a .hopper/part_b > /tmp/hopper/cu13.tar.xz || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .hopper/*.whl > "$S/pip.txt" 2>&1
  tar -xJf /tmp/hopper/cu13.tar.xz -C /tmp/site || exit 4
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  timeout 520 python3 benchmarks/quack_experts.py --shapes 244M,1B --json "$S/quack.json" > "$S/quack.txt" 2>&1; echo "rc=$?" >> "$S/quack.txt"
  tail -40 "$S/quack.txt" ;;
esac
cd "$OUT" && tar czf s.tgz s && rm -rf s
