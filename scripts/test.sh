#!/usr/bin/env bash
# Set up and run the whole test suite (CPU: unit tests, Triton kernels through TRITON_INTERPRET=1,
# integration tests of train/generate/eval; tests/gpu is skipped without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q tests "$@"
