#!/usr/bin/env bash
# The main job on a fresh clone: set up, run the official example, then train the tiny MoEUT on the
# Python standard library for a few minutes and print validation perplexity (vs a unigram model) and a
# greedy sample decoded with the KV cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python example.py
moeut train --model moeut-tiny --steps 250 --out "runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
