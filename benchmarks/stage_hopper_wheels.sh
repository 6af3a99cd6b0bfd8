#!/usr/bin/env bash
# Issue 33's wheels for the GPU machine (no network there): quack-kernels and the CuTe DSL for CUDA 13,
# staged under .hopper/ (git-excluded) so that two back-to-back device calls can carry them:
#   bash benchmarks/stage_hopper_wheels.sh            # here, once (needs pip's network)
#   call 1, carry [".hopper/a"]:  mkdir -p /tmp/hopper && cp .hopper/a/part_a /tmp/hopper/
#   call 2 (within the machine's 30 s idle window), carry [".hopper/b"]:
#       OUT=$OUT bash benchmarks/gpu_quack.sh
# The CUDA-13 library wheel (~92 MB) exceeds what one call carries (64 MiB with the working tree): its
# contents go as one xz stream cut in two; the small wheels travel whole in part b.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.hopper/' .git/info/exclude || echo '/.hopper/' >> .git/info/exclude
W=.hopper/wheels; mkdir -p "$W" .hopper/a .hopper/b
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d "$W" \
  quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-cu13==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 einops==0.8.2
rm -rf .hopper/cu13 && mkdir -p .hopper/cu13
python3 -m zipfile -e "$W"/nvidia_cutlass_dsl_libs_cu13-*.whl .hopper/cu13
tar -C .hopper/cu13 -cf - nvidia_cutlass_dsl | xz -9 -T2 > .hopper/cu13.tar.xz
split -b 52M .hopper/cu13.tar.xz .hopper/part_
mv .hopper/part_aa .hopper/a/part_a && mv .hopper/part_ab .hopper/b/part_b
cp "$W"/*.whl .hopper/b/ && rm .hopper/b/nvidia_cutlass_dsl_libs_cu13-*.whl
rm -rf .hopper/cu13 .hopper/cu13.tar.xz
du -sh .hopper/a .hopper/b
