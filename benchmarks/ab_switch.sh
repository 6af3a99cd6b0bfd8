#!/usr/bin/env bash
# One change against the default, measured the way every session since the ninth has: the GPU tests it
# touches first, then graphed training steps with the default, with the change, and with the default
# again (the two default runs give the spread between processes), and a step profile with the change,
# to diff against a profile of the default (`profile_diff.py`).
#
#   bash benchmarks/ab_switch.sh OUT "MOEUT_FOO=1 [MOEUT_BAR=0 ...]"
#   env: AB_TESTS  pytest -k expression over tests/gpu (none: skip the tests)
#        AB_MODELS train_throughput.py --models (default MoEUT_244M and MoEUT_1B; add dense ones for work
#                  both models do)
#        AB_TEST_ENV  a command prefix for the tests only (gpu_check_and_bench.sh passes its TEST_ENV, so
#                  a fused path the smoke check switched off is still tested)
#        AB_RUN_LIMIT seconds per training run (default 120: a fresh machine compiles every kernel in its
#                  first run, which took over 60 s in RESULTS P.3)
# A value may be JSON without spaces, e.g. SOME_VAR=[{"key":{"RELU":true},"config":1}].
# Writes OUT/ab_tests.txt, OUT/ab_{default,change,default_again}.json, OUT/ab_profile_change.json.
set -u
OUT=${1:?usage: ab_switch.sh OUT "MOEUT_FOO=1 ..."}; CHANGE=${2:?usage: ab_switch.sh OUT "MOEUT_FOO=1 ..."}
read -r -a assignments <<< "$CHANGE"
MODELS=${AB_MODELS:-moeut-244M:16,moeut-1B:8}
if [ -n "${AB_TESTS:-}" ]; then
  ${AB_TEST_ENV:-} env "${assignments[@]}" timeout 240 python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short \
    -k "$AB_TESTS" > "$OUT/ab_tests.txt" 2>&1
  tail -3 "$OUT/ab_tests.txt"
fi
for run in default change default_again; do
  if [ "$run" = change ]; then set -- "${assignments[@]}"; else set --; fi
  env "$@" timeout "${AB_RUN_LIMIT:-120}" python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
    --models "$MODELS" --json "$OUT/ab_$run.json" 2>&1 | grep -E '^(moeut|dense|llama)' | sed "s/^/$run  /"
done
env "${assignments[@]}" timeout 90 python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 5 \
  --json "$OUT/ab_profile_change.json" > /dev/null 2>&1 && echo "profile: $OUT/ab_profile_change.json"
