#!/usr/bin/env bash
# The second of issue 33's two device calls (see stage_hopper_wheels.sh): install quack and the CuTe DSL
# from the carried parts, then time the expert passes against ours.   OUT=$OUT bash benchmarks/gpu_quack.sh
set -u
export PYTHONUNBUFFERED=1 MOEUT_AUTOTUNE=0
S=$OUT/s; mkdir -p "$S"
{ date -u; nvidia-smi -L; python3 -c 'import torch,triton;print(torch.__version__,triton.__version__)'; } > "$S/env.txt" 2>&1
cat /tmp/hopper/part_a .hopper/b/part_b > /tmp/hopper/cu13.tar.xz || { echo "part a missing: the machine was not kept warm"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .hopper/b/*.whl > "$S/pip.txt" 2>&1
tar -xJf /tmp/hopper/cu13.tar.xz -C /tmp/site || exit 4
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
python3 -c "import cutlass, quack; print('quack', getattr(quack, '__version__', '?'))" >> "$S/env.txt" 2>&1
timeout 530 python3 benchmarks/quack_experts.py --shapes 244M,1B --sweep-until 430 --json "$S/quack.json" > "$S/quack.txt" 2>&1
echo "rc=$?" >> "$S/quack.txt"
grep -v "^  File\|^    " "$S/quack.txt" | tail -30
cd "$OUT" && tar czf s.tgz s && rm -rf s
