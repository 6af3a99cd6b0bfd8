#!/usr/bin/env bash
# Time to quality on a GPU: MoEUT against the paper's dense baseline, the sweeps sweeps/quality_<size>.toml
# (the English corpus of scripts/english_corpus.py, its paper tokenizer), one after the other until
# DEADLINE seconds have passed, then each sweep's record, table, plot and log copied to $OUT.
#
#   OUT=out SWEEPS="244m 44m 126m" DEADLINE=540 bash benchmarks/quality.sh
#
# Inputs: data/english (the corpus and paper-8000.model) and data/eval (the zero-shot files), or, on the
# lent GPU machine, .gpuassets/english and .gpuassets/eval.tgz. A sweep cut by the deadline keeps its
# finished runs (runs/quality/<size>/sweep.json); the next call continues it, also on a fresh machine
# when that record is given back as .gpuassets/resume/<size>.json.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
DEADLINE=${DEADLINE:-540}
START=$(date +%s)
mkdir -p "$OUT" data runs/quality
[ -e data/english ] || ln -s ../.gpuassets/english data/english
[ -d data/eval ] || { mkdir -p data/eval && tar xzf .gpuassets/eval.tgz -C data/eval; }
{ date -u; nvidia-smi -L 2>/dev/null; git log --oneline -1; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)'; } \
  > "$OUT/env.txt" 2>&1
for size in ${SWEEPS:-244m 44m 126m}; do
  dir=runs/quality/$size
  if [ -f ".gpuassets/resume/$size.json" ] && [ ! -f "$dir/sweep.json" ]; then
    mkdir -p "$dir" && cp ".gpuassets/resume/$size.json" "$dir/sweep.json"
  fi
  left=$((DEADLINE - ($(date +%s) - START)))
  [ "$left" -lt 60 ] && { echo "$size: not started, $left s left" >> "$OUT/quality.log"; continue; }
  timeout -s INT -k 30 "$left" python3 -m moeut sweep "sweeps/quality_$size.toml" --out "$dir" > "$OUT/$size.log" 2>&1
  echo "rc=$? after $(( $(date +%s) - START )) s" >> "$OUT/$size.log"
  for f in sweep.json sweep.md sweep.png; do
    [ -f "$dir/$f" ] && cp "$dir/$f" "$OUT/${size}_$f"
  done
  tail -25 "$OUT/$size.log" | grep -v "^\s*$" | cut -c1-200
done
