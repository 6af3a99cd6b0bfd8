#!/usr/bin/env bash
# Device calls: GPU tests, kernel parity + pass timings, attention block, a step profile, training
# throughput (ours, dense, Llama; the official release if its checkout is at $OFFICIAL) and decode.
# All stages take ~35 min on one GPU. On a machine of 4 GPUs they fit one call as parallel lanes:
#   TRAIN_COMPILE_LIMIT=470 LANE_LIMIT=495 bash benchmarks/gpu_lanes.sh "tests parity kernels" \
#     "train train_small train_graph profile attention" "decode decode_compile" "train_compile"
# (the official release, stage `official`, needs its checkout carried as .official: ~3 min).
# Before the stages, benchmarks/gpu_smoke.py checks each fused path; one that fails is switched off
# (MOEUT_...=0) for the benchmarks, never for the tests.
# Results under $OUT; every script writes its JSON as it goes, so a time limit keeps what finished.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
OFFICIAL=${OFFICIAL:-.official}
STAGES=${*:-tests parity kernels attention train profile train_small train_graph train_compile official decode decode_compile trainer}
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee -a "$OUT/env.txt"
# Each fused GPU path checked once; one that fails is turned off (MOEUT_...=0) so the stages still run.
eval "$(python3 benchmarks/gpu_smoke.py 2> >(tee -a "$OUT/env.txt" >&2))"
run() {  # stage name, time limit, command...
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return ;; esac
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v Warn | tee "$OUT/$name.txt" | tail -40
  echo "[$name: $((SECONDS - t0)) s]"
}
TEST_ENV="env -u MOEUT_ROPE_TIME_MAJOR -u MOEUT_FUSED_ROUTER_GRAD -u MOEUT_FUSED_ENTROPY -u MOEUT_FUSED_SUM -u MOEUT_FUSED_ROUTER -u MOEUT_FUSED_ROPE -u MOEUT_FUSED_NORM -u MOEUT_NORM_PASS -u MOEUT_LOOP_N -u MOEUT_FUSED_ROW_DOT -u MOEUT_FUSED_ROUTE -u MOEUT_EXPERT_GEMV"
run tests 300 $TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=8
# The same tests as two halves (each kernel / whole models), for two calls or lanes: together ~7 min.
run tests_kernels 480 $TEST_ENV python3 -m pytest -q tests/gpu/test_kernels.py -p no:cacheprovider --durations=5
run tests_models 480 $TEST_ENV python3 -m pytest -q tests/gpu/test_models.py -p no:cacheprovider --durations=5
# Everything but the torch.compile tests (~160 s of the ~6 min), for a quick check after a change.
run tests_fast 300 $TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=5 -k "not compile"
run parity 50 env MOEUT_AUTOTUNE=0 python3 benchmarks/kernels.py --parity only --json "$OUT/parity.json"
run kernels 120 python3 benchmarks/kernels.py --parity no --json "$OUT/kernels.json"
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
# torch.compile (default mode) of the model's forward, for MoEUT and dense alike (issue 3: same care).
run train_compile "${TRAIN_COMPILE_LIMIT:-280}" python3 benchmarks/train_throughput.py --steps 6 --compile \
  --models moeut-244M:16,dense-244M:16,moeut-44M:32,dense-44M:32 --json "$OUT/train_compile.json"
# The official release autotunes its kernel for minutes on first use: a long slot, one model at a time.
[ -d "$OFFICIAL" ] && run official "${OFFICIAL_LIMIT:-150}" python3 benchmarks/train_throughput.py --steps 6 \
  --official "$OFFICIAL" --models "${OFFICIAL_MODELS:-official-244M:16,official-126M:16,official-318M:16}" \
  --json "$OUT/train_official.json"
# fp32 master weights cast before the expert kernels (default) against rounded inside them
# (MOEUT_WEIGHT_CAST=1), same call (RESULTS.md D.2).
run train_cast 360 bash -c "python3 benchmarks/train_throughput.py --steps 6 \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8,moeut-44M:32 --json $OUT/train_cast_default.json && \
  MOEUT_WEIGHT_CAST=1 python3 benchmarks/train_throughput.py --steps 6 --models moeut-244M:16,moeut-1B:8,moeut-44M:32 \
  --json $OUT/train_cast_in_kernel.json && python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16 --json $OUT/train_cast_graph_default.json && MOEUT_WEIGHT_CAST=1 \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16 \
  --json $OUT/train_cast_graph_in_kernel.json"
# One bf16 copy per expert weight and forward, gradients summed in the kernel (default) against a
# cast per application and autograd's sums (MOEUT_SHARE_WEIGHTS=0), eager and graphed, same call.
run train_share 420 bash -c "python3 benchmarks/train_throughput.py --steps 6 \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_share.json && \
  MOEUT_SHARE_WEIGHTS=0 python3 benchmarks/train_throughput.py --steps 6 --models moeut-244M:16,moeut-1B:8 \
  --json $OUT/train_noshare.json && python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_share_graph.json && \
  MOEUT_SHARE_WEIGHTS=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 \
  --json $OUT/train_noshare_graph.json"
run profile_1B 90 python3 benchmarks/profile_step.py --model moeut-1B --batch 8 --top 30
# The tests of what changed most recently (edit the -k expression to suit).
run tests_recent 300 $TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=5 \
  -k "${RECENT_TESTS:-shared or triton or deterministic or graphed or compile}"
# The top-k sum kernel (default) against torch.sum (MOEUT_FUSED_SUM=0), graphed steps, same call; and
# the same-batch comparison at twice the batch (the paper's batch is 64 x 1024 tokens per step).
run train_sum 420 bash -c "python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_sum_graph.json && \
  MOEUT_FUSED_SUM=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 \
  --json $OUT/train_nosum_graph.json && python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:32,dense-244M:32,moeut-1B:16,dense-1B:16 --json $OUT/train_batch2x_graph.json && \
  python3 benchmarks/train_throughput.py --steps 6 --models moeut-244M:16,dense-244M:16 --json $OUT/train_eager.json"
# Matmul widths padded to multiples of 8 (MoEUT's router, dense's d_ff 4110; default) against their
# own widths (MOEUT_ALIGN_MATMULS=0), graphed steps, same call; eager pair for peak memory.
run train_align 330 bash -c "python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_align_graph.json && \
  MOEUT_ALIGN_MATMULS=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_noalign_graph.json && \
  python3 benchmarks/train_throughput.py --steps 6 --models moeut-244M:16,dense-244M:16 --json $OUT/train_align_eager.json"
# Dense decoding with its FFN padded to an aligned width once per call (default) against its own
# width (MOEUT_ALIGN_DECODE=0): is the decode baseline, too, faster than measured until now?
run decode_align 150 bash -c "python3 benchmarks/decode.py --models dense-244M --new-tokens 128 --modes static+graph \
  --json $OUT/decode_dense_aligned.json && MOEUT_ALIGN_DECODE=0 python3 benchmarks/decode.py --models dense-244M \
  --new-tokens 128 --modes static+graph --json $OUT/decode_dense_unaligned.json"
# The sixth session's last launch cuts, off by default until tests/gpu passes with them: the router's
# backward kernel and the combine backward's gates read at their destination. Tests first, then
# eager (launch-bound) and graphed steps with them on against off, same call.
NEW_PATHS="env MOEUT_ROUTER_BACKWARD_KERNEL=1 MOEUT_GATES_AT_DST=1"
run tests_new_paths 300 $NEW_PATHS python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=5 \
  -k "router or combine or probability or shared or deterministic or graphed"
run train_launches 400 bash -c "python3 benchmarks/train_throughput.py --steps 6 --models moeut-244M:16,moeut-1B:8 \
  --json $OUT/train_launches_off.json && $NEW_PATHS python3 benchmarks/train_throughput.py --steps 6 \
  --models moeut-244M:16,moeut-1B:8 --json $OUT/train_launches_on.json && python3 benchmarks/train_throughput.py \
  --steps 6 --cuda-graph --models moeut-244M:16 --json $OUT/train_launches_off_graph.json && $NEW_PATHS \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16 --json $OUT/train_launches_on_graph.json"
# Seventh session: the fused expert MLP and the joint Q/K/selector projection (default) against the
# composed operators and four matmuls (MOEUT_FUSED_MLP=0 MOEUT_JOINT_QK=0), graphed, same call; the
# Llama baseline graphed too; an eager pair for peak memory.
run train_fused 420 bash -c "python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8,llama-244M:16 --json $OUT/train_graph.json && \
  MOEUT_FUSED_MLP=0 MOEUT_JOINT_QK=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_unfused.json && \
  python3 benchmarks/train_throughput.py --steps 6 --models moeut-244M:16,dense-244M:16 --json $OUT/train_eager.json"
run decode 200 python3 benchmarks/decode.py --new-tokens 128 --modes static+graph \
  --variants default,separate-qk,no-overlap --json "$OUT/decode.json"
run decode_profile 120 python3 benchmarks/decode_profile.py --top 16
# `moeut train` itself, eager against --cuda-graph (needs a tokenizer carried as .gpuassets/tokenizer.model)
run trainer 400 python3 benchmarks/trainer_speed.py --models moeut-126M,moeut-244M,dense-244M --steps 50 \
  --tokenizer .gpuassets/tokenizer.model --json "$OUT/trainer.json"
# torch.compile of a 244M decoding step takes minutes on the device's host CPU (18 unrolled layers).
run decode_compile 300 python3 benchmarks/decode.py --new-tokens 64 --modes static+graph+compile \
  --json "$OUT/decode_compile.json"
# Ninth session: the weight gradient's gate on its register operand, the FFN residual inside the top-k
# sums, SwitchHead V's gate gradient from the input-gradient GEMM (defaults) against all three off;
# graphed steps, the attention block both ways, and a profile of the new step. Same call.
OLD_S9="env MOEUT_WGRAD_SCALE=grad MOEUT_FOLD_RESIDUAL=0 MOEUT_EPILOGUE_DOT=0"
run ab_s9 420 bash -c "python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16 --json $OUT/train_graph_s9.json && $OLD_S9 python3 benchmarks/train_throughput.py \
  --steps 6 --cuda-graph --models moeut-244M:16 --json $OUT/train_graph_s9_off.json && \
  python3 benchmarks/attention_block.py --json $OUT/attention_s9.json && \
  $OLD_S9 python3 benchmarks/attention_block.py --json $OUT/attention_s9_off.json && \
  python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 40"
# For the next session (PERF_NOTES, "First device calls"): where the weight-gradient kernel's step time
# goes (shared weights' fp32 accumulators on against off, graphed, with a profile of each), the
# autotune key with the weight's layout (a switch removed after this call: no change, RESULTS I.2), and
# the FFN's passes at 1B. ~8 min on one GPU.
run next_s10 560 bash -c "python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_share.json && MOEUT_SHARE_WEIGHTS=0 \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 \
  --json $OUT/train_graph_noshare.json && MOEUT_AUTOTUNE_BY_LAYOUT=1 python3 benchmarks/train_throughput.py \
  --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_by_layout.json && \
  python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 25 && MOEUT_SHARE_WEIGHTS=0 \
  python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 25 && \
  python3 benchmarks/kernels.py --parity no --shapes 1B --json $OUT/kernels_1B.json"
# Tenth session: a shared weight's gradients summed over MOEUT_WGRAD_DEFER applications per launch
# (default 3) against one launch per application (1); graphed steps at 244M and 1B for 1-4, the dense
# pair in the default's run, eager peak memory both ways, the new kernel rows and a profile. ~9 min.
run s10_defer 590 bash -c "$TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider -x --durations=5 \
  -k 'weight_grad or shared or deterministic or graphed'; \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_graph_defer3.json && \
  for d in 1 2 4; do MOEUT_WGRAD_DEFER=\$d python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_defer\$d.json; done && \
  python3 benchmarks/train_throughput.py --steps 6 --models moeut-244M:16,dense-244M:16 --json $OUT/train_eager.json && \
  MOEUT_WGRAD_DEFER=1 python3 benchmarks/train_throughput.py --steps 6 --models moeut-244M:16 \
  --json $OUT/train_eager_defer1.json && python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 25 && \
  python3 benchmarks/kernels.py --parity no --shapes 244M --json $OUT/kernels_244M.json"
# Tenth session, last call: the attention residual inside SwitchHead's output sum (default) against
# MOEUT_FOLD_ATTENTION_RESIDUAL=0, graphed; the final code's 244M/1B pair with dense, the smaller
# profiles, and a profile; GPU tests of what changed first. ~7 min.
run s10_final 560 bash -c "$TEST_ENV timeout 200 python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=5 \
  -k 'combine or graphed or cuda_graph or deterministic or matches_cpu or kv_cache or generation or fullgraph and tiny'; \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_graph_final.json && \
  MOEUT_FOLD_ATTENTION_RESIDUAL=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16 --json $OUT/train_graph_nofold.json && \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-44M:32,moeut-126M:16,moeut-318M:16 \
  --json $OUT/train_graph_small.json && python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 25"
# For the next session (PERF_NOTES, "First device calls"): step profiles by category at 244M and 1B
# (the 1B one has not been taken since the sixth session), and the FFN passes at 244M. ~4 min.
run next_s11 300 bash -c "python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 25 \
  --json $OUT/profile_244M.json && python3 benchmarks/profile_step.py --model moeut-1B --batch 8 --top 25 \
  --json $OUT/profile_1B.json && python3 benchmarks/kernels.py --parity no --shapes 244M --json $OUT/kernels_244M.json"
# Eleventh session, call 2: which moeut line (or autograd node) launches each glue kernel (casts, copies,
# adds, sort and index glue), MoEUT 244M; the dense 244M by category beside it. ~2 min.
run s11_sites 400 bash -c "python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 10 --sites 70 \
  --json $OUT/profile_244M_sites.json && python3 benchmarks/profile_step.py --model dense-244M --batch 16 --top 25 \
  --sites 30 --json $OUT/profile_dense_244M.json"
# Eleventh session, call 3: GPU tests of what changed, then graphed 244M/1B steps with the dense pair;
# the three changes off together (244M, 1B: the tenth session's code path) and one at a time (244M):
# the regulariser's kernels (MOEUT_FUSED_ENTROPY), the relayed residual gradient
# (MOEUT_RELAY_RESIDUAL_GRAD), the sums' bf16 copies (MOEUT_LOWP_COPY; measured +0.06%, removed after
# this call, RESULTS J.3). ~7.5 min.
S11_OFF="MOEUT_FUSED_ENTROPY=0 MOEUT_RELAY_RESIDUAL_GRAD=0 MOEUT_LOWP_COPY=0"
run s11_ab 540 bash -c "$TEST_ENV timeout 200 python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=5 \
  -k 'probability or relay or residual_copies or sum_choices or deterministic or graphed or cuda_graph or combine or fullgraph and tiny'; \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_graph_s11.json && \
  env $S11_OFF python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 \
  --json $OUT/train_graph_s11_off.json && \
  MOEUT_FUSED_ENTROPY=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16 \
  --json $OUT/train_graph_s11_noentropy.json && \
  MOEUT_RELAY_RESIDUAL_GRAD=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16 \
  --json $OUT/train_graph_s11_norelay.json && \
  MOEUT_LOWP_COPY=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16 \
  --json $OUT/train_graph_s11_nocopy.json"
# Eleventh session, last call: GPU tests of the final code's changes, graphed 244M/1B steps with the
# dense pair, the smaller profiles, and the 244M step's glue by site. ~6 min.
run s11_final 500 bash -c "$TEST_ENV timeout 150 python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=5 \
  -k 'relay or probability or sum_choices or deterministic or shared or fullgraph and 244M'; \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_graph_final.json && \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-44M:32,moeut-126M:16,moeut-318M:16 \
  --json $OUT/train_graph_small.json && python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 12 \
  --sites 45 --json $OUT/profile_244M.json"
# Twelfth session: the whole GPU test module on one commit, then peak memory of an eager 244M step
# (MoEUT and dense at the same batch). ~7 min.
run s12_verify 570 bash -c "$TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=8 --tb=short; \
  python3 benchmarks/train_throughput.py --steps 6 --models moeut-244M:16,dense-244M:16 --json $OUT/train_eager_244M.json"
# Twelfth session: graphed steps of MoEUT and dense at several batch sizes each (the paper trains at
# batch 64 x 1024 tokens; earlier tables use 16 at 244M and 8 at 1B). ~6 min.
run s12_batch 560 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-244M:32,dense-244M:32,moeut-244M:64,dense-244M:64,moeut-1B:8,dense-1B:8,moeut-1B:16,dense-1B:16,moeut-1B:32,dense-1B:32 \
  --json "$OUT/train_graph_batches.json"
# For the next session's first call (PERF_NOTES, "First device calls"): what could build kernels besides
# Triton, the rewritten experiment scripts once on the GPU, and graphed steps with the new peak-memory
# count. ~4 min.
run next_s13 300 bash -c "nvcc --version 2>&1 | tail -2; python3 -c 'import cutlass; print(\"cutlass\", cutlass.__version__)' 2>&1 | tail -1; \
  ls -d /usr/local/cuda*/include/cute 2>&1 | head -2; \
  for e in store_order tma_store warp_specialize; do python3 benchmarks/experiments/\$e.py 2>&1 | grep -E '^(244M|1B)' | head -12; done; \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,dense-244M:16 --json $OUT/train_graph_peak.json"
# Thirteenth session. s13_verify ran at 45d8b4e, s13_rest_ab at 76250d0, s13_ab2 at 41c06d5; the narrow epilogue
# dot they measure (MOEUT_EPILOGUE_DOT_NARROW[_COMBINE]) was slower in graphed steps and is gone (RESULTS L).
# Thirteenth session. s13_verify: the whole tests/gpu module after expert_mm.py's split and the narrow
# epilogue dot (~7 min), then the kernel rows at 244M (down dx + gate gradient: epilogue against the
# row-dot pass). s13_ab: graphed 244M/1B steps with MOEUT_EPILOGUE_DOT_NARROW on, off, on (~5 min).
run s13_verify 580 bash -c "$TEST_ENV timeout 470 python3 -m pytest -q tests/gpu -p no:cacheprovider --durations=8 --tb=short; \
  python3 benchmarks/kernels.py --parity no --shapes 244M --json $OUT/kernels_244M.json 2>&1 | grep -E 'down dx|up dx|FFN|ffn' | head -20"
run s13_ab 560 bash -c "python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_graph_on.json && \
  MOEUT_EPILOGUE_DOT_NARROW=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 \
  --json $OUT/train_graph_off.json && \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_on2.json"
# s13_verify's pytest ran out of its 470 s at 144 of 160 tests (all passed): the file's last tests, then s13_ab.
run s13_rest_ab 590 bash -c "$TEST_ENV timeout 200 python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short \
  -k 'relay or graphed_train or train_with_cuda_graph or decoding_step or expert_gemv or small_route or fused_rope'; \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_graph_on.json && \
  MOEUT_EPILOGUE_DOT_NARROW=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 \
  --json $OUT/train_graph_off.json && \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_on2.json"
# s13_rest_ab measured the epilogue dot slower (244M 178.6k/178.7k on against 181.6k off): now the expert MLP's
# alone (default) against none, and the combine's added.
run s13_ab2 560 bash -c "python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_mlp.json && \
  MOEUT_EPILOGUE_DOT_NARROW=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 \
  --json $OUT/train_graph_none.json && \
  MOEUT_EPILOGUE_DOT_NARROW_COMBINE=1 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16 \
  --json $OUT/train_graph_both.json && \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_mlp2.json"
# s13_final: after the epilogue dot was removed again, the expert-projection tests on the final code (~3 min).
run s13_final 230 bash -c "$TEST_ENV timeout 190 python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short \
  -k 'combine or expert_mlp or shared_weight or deterministic'"
# For the next session's first call (PERF_NOTES, "First device calls"): which config each autotuning key gets
# in a 244M step and in two kernels.py processes (down dx took 0.311 ms against up fwd's 0.181, L.3). ~4 min.
run next_s14 330 bash -c "python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 12 --json $OUT/profile_244M.json; \
  for i in 1 2; do python3 benchmarks/kernels.py --parity no --shapes 244M --json $OUT/kernels_244M_\$i.json 2>&1 | \
  grep -E '^244M +(up|down) (fwd|dx|dW) \\(|_expert_mm_kernel|_weight_grad_kernel'; done"
# Fourteenth session. s14_norm: the LayerNorm kernels (moeut/norm.py) on the GPU: their tests and the
# model-level ones they touch, the standalone table, and a 244M step's profile (~4 min).
run s14_norm 540 bash -c "$TEST_ENV timeout 300 python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short \
  -k 'layer_norm or deterministic or matches_cpu or graphed_train_step or kv_cache or generation or fullgraph'; \
  python3 benchmarks/norm.py --json $OUT/norm.json; \
  python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 12 --json $OUT/profile_244M_norm.json 2>&1 | head -40"
# s14_ab (after s14_norm: the partial sums in a kernel of their own, the GPU test's tolerance for bf16
# parameters): the LayerNorm tests again, the standalone table (GPU time), then graphed 244M/1B steps,
# MoEUT and dense, with torch's LayerNorm (MOEUT_FUSED_NORM=0) and with ours (~8 min).
run s14_ab 590 bash -c "$TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short -k 'layer_norm or deterministic'; \
  python3 benchmarks/norm.py --json $OUT/norm.json; \
  MOEUT_FUSED_NORM=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_graph_torch_norm.json && \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 --json $OUT/train_graph_moeut_norm.json"
# s14_pass: LayerNorm's pass-through output (x's other gradient added in its backward) on the GPU: the tests
# it touches, then graphed 244M steps, MoEUT and dense, with it off (MOEUT_NORM_PASS=0) and on (~4 min).
run s14_pass 400 bash -c "$TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short \
  -k 'layer_norm or deterministic or graphed_train_step or matches_cpu or relayed or shared_weight'; \
  MOEUT_NORM_PASS=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16 --json $OUT/train_graph_pass_off.json && \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,dense-244M:16 --json $OUT/train_graph_pass_on.json"
# s14_module: the whole tests/gpu module on the final code (~7 min).
run s14_module 540 $TEST_ENV timeout 500 python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short --durations=5
# For the fifteenth session's first call (PERF_NOTES "First device calls"): training's counting-sort routing
# (MOEUT_ROUTE_LARGE=1, off until this measures it): its GPU tests, its GPU time against torch's sort path
# (benchmarks/route.py), then graphed 244M/1B MoEUT steps with it off, on, off (~6 min).
run next_s15 580 bash -c "$TEST_ENV python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short -k 'route'; \
  python3 benchmarks/route.py --json $OUT/route.json; \
  for run in off:0 on:1 off_again:0; do MOEUT_ROUTE_LARGE=\${run#*:} python3 benchmarks/train_throughput.py --steps 6 \
  --cuda-graph --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_route_\${run%:*}.json 2>&1 | grep -E '^moeut'; done"
# Fifteenth session. s15_joint: the router's selection and the regulariser's sum as one autograd node
# (MOEUT_FUSED_ROUTER_GRAD, router.select_with_prob_sum) and LayerNorm's partial sums in 128 programs: their
# GPU tests, LayerNorm's backward launch shapes (norm.py --sweep), the counting sort's kernels (route.py
# --kernels), then graphed 244M/1B steps with the joint gradient off, on (with dense beside), off (~7 min).
# (The counting sort and benchmarks/route.py were removed after this call, RESULTS N.1: next_s15's and this
# stage's route.py lines no longer run.)
run s15_joint 590 bash -c "$TEST_ENV timeout 200 python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short \
  -k 'joint or probability_sum or layer_norm or router or deterministic'; \
  python3 benchmarks/norm.py --shapes 16384x1024 --sweep --json $OUT/norm_sweep.json 2>&1 | tail -22; \
  python3 benchmarks/route.py --kernels --shapes 16384x16x387 2>&1 | tail -24; \
  MOEUT_FUSED_ROUTER_GRAD=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_joint_off.json 2>&1 | grep -E '^(moeut|dense)'; \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 \
  --json $OUT/train_graph_joint_on.json 2>&1 | grep -E '^(moeut|dense)'; \
  MOEUT_FUSED_ROUTER_GRAD=0 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16,moeut-1B:8 --json $OUT/train_graph_joint_off_again.json 2>&1 | grep -E '^(moeut|dense)'"
# s15_final: after s15_joint, the GPU tests its changes touch (the joint-gradient tests held to an fp32
# reference; LayerNorm's backward in 2048-element tiles, norm.py --sweep's best), then the final graphed
# 244M/1B steps, MoEUT and dense (~5 min).
run s15_final 540 bash -c "$TEST_ENV timeout 300 python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short \
  -k 'joint or router or probability_sum or layer_norm or deterministic or graphed_train_step or matches_cpu or relayed'; \
  python3 benchmarks/norm.py --shapes 16384x1024,8192x1536 --json $OUT/norm_final.json 2>&1 | tail -5; \
  python3 benchmarks/train_throughput.py --steps 6 --cuda-graph --models moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 \
  --json $OUT/train_graph_final.json 2>&1 | grep -E '^(moeut|dense)'"
# s16_sites: a 244M step's profile with every glue kernel attributed to its autograd node (--sites), then
# the whole GPU test module on the same code (~8.5 min).
run s16_sites 590 bash -c "python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 25 --sites 80 \
  --json $OUT/profile_sites.json > $OUT/profile_sites.txt 2>&1; \
  $TEST_ENV timeout 500 python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short --durations=5 > $OUT/tests.txt 2>&1; \
  tail -5 $OUT/tests.txt"
# s16_rope: RoPE writing its output and gradient in the head view's layout (MOEUT_ROPE_TIME_MAJOR):
# the GPU tests it touches and the whole-module tests s16_sites's time limit cut off, then graphed
# steps with it off (0), on (1), on for the gradient only (grad; that form was removed after this run
# at b2314c4, and grad now means on) and off again, and a 244M profile with it on (diff against
# s16_sites's) (~8 min).
run s16_rope 590 bash -c "$TEST_ENV timeout 200 python3 -m pytest -q tests/gpu -p no:cacheprovider --tb=short \
  -k 'rope or shared_weight_copies or deterministic or joint_router_gradient_matches or decoding_step_gemv or \
  graphed_train_step or stops_and_resumes or relayed or cuda_graph_generation or fullgraph and tiny or matches_cpu' \
  > $OUT/tests.txt 2>&1; tail -3 $OUT/tests.txt; \
  for run in off:0:moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 on:1:moeut-244M:16,dense-244M:16,moeut-1B:8,dense-1B:8 \
  grad:grad:moeut-244M:16 off_again:0:moeut-244M:16,dense-244M:16; do set -- \${run//:/ }; \
  MOEUT_ROPE_TIME_MAJOR=\$2 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models \$(echo \$run | cut -d: -f3-) --json $OUT/train_graph_rope_\$1.json 2>&1 | grep -E '^(moeut|dense)' | sed \"s/^/\$1 /\"; done; \
  python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 5 --json $OUT/profile_rope_on.json > /dev/null 2>&1"
# s17_atomic: the top-k sum's round trip against integer (fixed-point) atomic adds into [T, D], the memory
# side only (benchmarks/experiments/atomic_combine.py, ~30 s).
run s17_atomic 90 python3 benchmarks/experiments/atomic_combine.py
# s17_profile: a 244M step's profile on the final code (the autotuner's choice per key: RESULTS P.1 saw
# SwitchHead's value input gradient tuned to another config once the gate gradient was written in
# (row, choice) order), ~1 min.
run s17_profile 90 python3 benchmarks/profile_step.py --model moeut-244M --batch 16 --top 5 --json "$OUT/profile.json"
# s17_pins: graphed MoEUT_244M steps with one autotuning key pinned (MOEUT_PIN_CONFIG) to each config the
# autotuner did not choose in s17_profile, for the three wide-input keys, and SwitchHead's value input
# gradient pinned back to the config every profile before P.1 had chosen; baseline first and last (~5 min;
# a fresh machine compiles every kernel in the first run, which took over 60 s in RESULTS P.3).
run s17_pins 560 bash -c 'for pin in none \
  "mm|{\"I\":1024,\"O\":128,\"SCALE_AT_DST\":true}|1" "mm|{\"I\":1024,\"O\":128,\"SCALE_AT_DST\":true}|2" \
  "mm|{\"RELU\":true}|1" "mm|{\"RELU\":true}|2" \
  "mm|{\"I\":1024,\"O\":128,\"SCALE\":false,\"RELU\":false}|0" "mm|{\"I\":1024,\"O\":128,\"SCALE\":false,\"RELU\":false}|2" \
  "mm|{\"ROW_DOT\":true}|0" none; do \
  if [ "$pin" = none ]; then rules="[]"; else IFS="|" read -r k key c <<< "$pin"; rules="[{\"kernel\":\"$k\",\"key\":$key,\"config\":$c}]"; fi; \
  echo "pin $rules: $(MOEUT_PIN_CONFIG="$rules" timeout 120 python3 benchmarks/train_throughput.py --steps 6 --cuda-graph \
  --models moeut-244M:16 2>&1 | grep -E "^moeut")"; done'
