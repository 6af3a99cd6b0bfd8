#!/usr/bin/env bash
# Create .venv (reusing a system-wide PyTorch if there is one, e.g. a CUDA build) and install moeut.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv --system-site-packages .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[test]"
