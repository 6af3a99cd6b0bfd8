#!/usr/bin/env bash
# Set up, lint and run the whole test suite (CPU: unit tests, Triton kernels through TRITON_INTERPRET=1,
# integration tests of train/generate/eval; tests/gpu is skipped without CUDA). The tests run on one
# pytest-xdist worker per core; extra arguments go to pytest (e.g. -n 0 for one process, -k NAME).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q tests -n auto --dist worksteal "$@"
