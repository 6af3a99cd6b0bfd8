#!/usr/bin/env bash
# Twenty-sixth session, issue 33's second call: quack's Hopper GEMM as the gathered-product backend.
# Its GPU tests, graphed training steps with it on, off, on again (MoEUT_244M batch 16, MoEUT_1B batch
# 8: the spread between processes beside the difference), then the standalone passes again with the
# regrouped nine-application weight gradient and the bare products.
#   call 1, carry [".hopper/a"]: mkdir -p /tmp/hopper && cp .hopper/a/part_a /tmp/hopper/
#   call 2, carry [".hopper/b"]: OUT=$OUT bash benchmarks/gpu_session26.sh
set -u
export PYTHONUNBUFFERED=1 MOEUT_AUTOTUNE=0
S=$OUT/s; mkdir -p "$S"
cap() { local left=$((${DEADLINE:-560} - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"; }   # the tar must run
{ date -u; nvidia-smi -L; python3 -c 'import torch,triton;print(torch.__version__,triton.__version__)'; } > "$S/env.txt" 2>&1
source benchmarks/install_hopper.sh >> "$S/env.txt" 2>&1 || { tail -5 "$S/env.txt"; exit 3; }
timeout $(cap 120) python3 -m pytest -q -p no:cacheprovider --tb=short tests/gpu/test_hopper_gemm.py tests/unit/test_hopper_gemm.py \
  > "$S/tests.txt" 2>&1; tail -3 "$S/tests.txt"
for run in on off on_again; do
  switch=1; [ "$run" = off ] && switch=0
  limit=120; [ "$run" = on ] && limit=180   # the first run compiles every kernel
  MOEUT_HOPPER_GEMM=$switch timeout $(cap $limit) python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
    --models moeut-244M:16,moeut-1B:8 --json "$S/step_$run.json" > "$S/step_$run.txt" 2>&1
  grep -E '^(moeut|dense)' "$S/step_$run.txt" | sed "s/^/$run  /"; tail -2 "$S/step_$run.txt" | grep -i error
done
timeout $(cap 120) python3 benchmarks/quack_experts.py --shapes 244M,1B --json "$S/quack.json" > "$S/quack.txt" 2>&1
echo "quack_experts rc=$?"; grep "^|" "$S/quack.txt"
cd "$OUT" && tar czf s.tgz s && rm -rf s
