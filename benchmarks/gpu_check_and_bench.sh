#!/usr/bin/env bash
# Device calls: GPU tests, kernel parity + pass timings, attention block, a step profile, training
# throughput (ours, dense, Llama; the official release if its checkout is at $OFFICIAL) and decode.
# All stages take ~35 min on one GPU. On a machine of 4 GPUs they fit one call as parallel lanes:
#   TRAIN_COMPILE_LIMIT=470 LANE_LIMIT=495 bash benchmarks/gpu_lanes.sh "tests parity kernels" \
#     "train train_small train_graph profile attention" "decode decode_compile" "train_compile"
# (the official release, stage `official`, needs its checkout carried as .official: ~3 min).
# Before the stages, benchmarks/gpu_smoke.py checks each fused path; one that fails is switched off
# (MOEUT_PYTORCH_OPS) for the benchmarks, never for the tests.
# Results under $OUT; every script writes its JSON as it goes, so a time limit keeps what finished.
# Earlier sessions' one-off stages (next_s10 ... s17_pins, train_cast, train_share, ...) are in git
# history: RESULTS.md names the commit each device call ran at.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
OFFICIAL=${OFFICIAL:-.official}
STAGES=${*:-tests parity kernels attention train profile train_small train_graph train_compile official decode decode_compile trainer}
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee -a "$OUT/env.txt"
# Each fused GPU path checked once; one that fails is sent to PyTorch (MOEUT_PYTORCH_OPS) so the stages still run.
eval "$(python3 benchmarks/gpu_smoke.py 2> >(tee -a "$OUT/env.txt" >&2))"
run() {  # stage name, time limit, command...
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return ;; esac
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v Warn | tee "$OUT/$name.txt" | tail -40
  echo "[$name: $((SECONDS - t0)) s]"
}
TEST_ENV="env -u MOEUT_PYTORCH_OPS -u MOEUT_TRITON -u MOEUT_WGRAD_DEFER"
run tests 300 $TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=8
# The same tests as two halves (each kernel / whole models), for two calls or lanes: together ~7 min.
run tests_kernels 480 $TEST_ENV python3 -m pytest -q tests/gpu/test_kernels.py -p no:cacheprovider --durations=5
run tests_models 480 $TEST_ENV python3 -m pytest -q tests/gpu/test_models.py -p no:cacheprovider --durations=5
# Everything but the torch.compile tests (~160 s of the ~6 min), for a quick check after a change.
run tests_fast 300 $TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=5 -k "not compile"
run parity 50 env MOEUT_AUTOTUNE=0 python3 benchmarks/kernel_bench.py --parity only --json "$OUT/parity.json"
run kernels 120 python3 benchmarks/kernel_bench.py --parity no --json "$OUT/kernels.json"
run attention 60 python3 benchmarks/attention_block.py --kernels 25 --json "$OUT/attention_block.json"
run train 130 python3 benchmarks/train_throughput.py --steps 6 \
  --models moeut-244M:16,dense-244M:16,llama-244M:16,moeut-1B:8,dense-1B:8,moeut-44M:32,dense-44M:32 --json "$OUT/train.json"
# after `train`: Triton's disk cache then holds every compiled kernel variant
run profile 60 python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 30
run train_small 90 python3 benchmarks/train_throughput.py --steps 6 \
  --models moeut-126M:16,dense-126M:16,moeut-318M:16,dense-319M:16 --json "$OUT/train_small.json"
# The whole training step (optimizer included) captured in a CUDA graph and replayed, MoEUT and dense alike
# (~4 min: 150 s ended it after 244M in the sixteenth session, RESULTS O).
run train_graph 260 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-44M:32,dense-44M:32,moeut-126M:16,dense-126M:16,moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 \
  --json "$OUT/train_graph.json"
# The graphed step at the sizes issue-tracked figures compare (244M and 1B against dense), ~2.5 min.
run train_graph_main 200 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models "${MAIN_MODELS:-moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8}" --json "$OUT/train_graph_main.json"
# Before / after a refactor, in one call: the graphed step of an earlier tree (carried as $BASELINE, e.g.
# `git archive <commit> moeut benchmarks/train_throughput.py | tar -x -C .baseline`), this tree, then the
# earlier one again with AB_SIDES="before after again" (drift check); ~2.5 min per side at the four main models.
run ab_tree 590 bash -c "for side in ${AB_SIDES:-before after}; do tree=.; [ \$side = after ] || tree=\${BASELINE:-.baseline}; \
  python3 \$tree/benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models \"${MAIN_MODELS:-moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8}\" --json \"$OUT/ab_tree_\$side.json\"; done"
# `moeut train` itself with default flags (batch 64 x 1024, step mode auto) on the standard library:
# the trainer's tokens/s beside train_graph_main's figure (the tokenizer is carried to skip training one).
run trainer_default 240 python3 benchmarks/trainer_speed.py --models moeut-244M --modes default --batch-size 0 \
  --steps 80 --log-interval 5 ${TOKENIZER:+--tokenizer "$TOKENIZER"} --json "$OUT/trainer_default.json"
# torch.compile (default mode) of the model's forward, for MoEUT and dense alike (issue 3: same care).
run train_compile "${TRAIN_COMPILE_LIMIT:-280}" python3 benchmarks/train_throughput.py --steps 6 --compile \
  --models moeut-244M:16,dense-244M:16,moeut-44M:32,dense-44M:32 --json "$OUT/train_compile.json"
# The official release autotunes its kernel for minutes on first use: a long slot, one model at a time.
[ -d "$OFFICIAL" ] && run official "${OFFICIAL_LIMIT:-150}" python3 benchmarks/train_throughput.py --steps 6 \
  --official "$OFFICIAL" --models "${OFFICIAL_MODELS:-official-244M:16,official-126M:16,official-318M:16}" \
  --json "$OUT/train_official.json"
run profile_1B 90 python3 benchmarks/profile_step.py --model moeut-1B --batch 8 --top 30
# The tests of what changed most recently (edit the -k expression to suit).
run tests_recent 300 $TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=5 \
  -k "${RECENT_TESTS:-shared or triton or deterministic or graphed or compile}"
run decode 200 python3 benchmarks/decode.py --new-tokens 128 --modes static+graph \
  --variants default,separate-qk,no-overlap --json "$OUT/decode.json"
run decode_profile 120 python3 benchmarks/decode_profile.py --top 16
# `moeut train` itself, eager against --cuda-graph (needs a tokenizer carried as .gpuassets/tokenizer.model)
run trainer 400 python3 benchmarks/trainer_speed.py --models moeut-126M,moeut-244M,dense-244M --steps 50 \
  --tokenizer .gpuassets/tokenizer.model --json "$OUT/trainer.json"
# torch.compile of a 244M decoding step takes minutes on the device's host CPU (18 unrolled layers).
run decode_compile 300 python3 benchmarks/decode.py --new-tokens 64 --modes static+graph+compile \
  --json "$OUT/decode_compile.json"
# A step's glue kernels by the autograd node they ran in (`profile_step.py --sites`): where the next
# copy or cast to remove is (RESULTS J.2, O.3), ~1.5 min.
run sites 120 python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 25 --sites 80 \
  --json "$OUT/profile_sites.json"
# The expert kernels by launch shape (each row one pass of one projection) at 244M and 1B, ~3 min.
run launches 200 bash -c "python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 5 --launches 40 && \
  python3 benchmarks/profile_step.py --model moeut-1B --batch 8 --top 5 --launches 40"
# One change against the default (benchmarks/ab_switch.sh: its tests, graphed steps default / change /
# default, a profile), ~6 min. E.g. AB="MOEUT_PYTORCH_OPS=topk_sum" AB_TESTS="sum" ... gpu_check_and_bench.sh ab
run ab 590 env AB_TEST_ENV="$TEST_ENV" bash benchmarks/ab_switch.sh "$OUT" "${AB:-}"
# The standalone kernel forms of benchmarks/experiments/ (each measured once; all but prescaled_wgrad.py
# refuted), ~5 min: the eighteenth session's two (TMA weight tiles, gated weight-gradient operands with
# the row-split sweep) take ~1 min each.
run experiments 420 bash -c 'for e in benchmarks/experiments/[a-z]*.py; do case $e in */common.py) continue;; esac; \
  echo "== $e"; python3 "$e" 2>&1 | grep -E "^(244M|1B)"; done'
