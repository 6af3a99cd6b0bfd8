#!/usr/bin/env bash
# Twenty-fifth session, last device call: sharded (Distributed Checkpoint) FSDP checkpoints on CUDA/NCCL
# saved, resumed under FSDP and without it; then FSDP2's two reshard settings on MoEUT_1B.
#   OUT=$OUT bash benchmarks/gpu_session25_fsdp.sh      (carry [".gpuassets"])
set -u
export PYTHONUNBUFFERED=1 MOEUT_AUTOTUNE=0
D=.gpuassets/english/python-docs.jsonl.gz; T=.gpuassets/english_paper.model
A="--model moeut-tiny --data $D --tokenizer $T --batch-size 8 --context 256 --no-progress --no-tensorboard --log-interval 1"
timeout 60 python3 -m moeut train $A --steps 4 --ckpt-interval 2 --parallel fsdp --out /tmp/g 2>&1 | grep -v -i warn | tail -3
ls /tmp/g/checkpoints/step_00000004/shards; cp -r /tmp/g /tmp/g2
timeout 50 python3 -m moeut train --resume /tmp/g --steps 6 --parallel fsdp --no-progress 2>&1 | grep -i "resumed\|error" | head -3
timeout 50 python3 -m moeut train --resume /tmp/g2 --steps 6 --no-progress 2>&1 | grep -i "resumed\|error" | head -3
python3 -c "
import json
for r in ('/tmp/g', '/tmp/g2'):
    print(r, [(d['step'], d['loss']) for d in map(json.loads, open(r + '/metrics.jsonl')) if 'loss' in d])"
timeout 150 python3 benchmarks/fsdp_reshard.py --model moeut-1B --batch-size 8 --context 1024 --steps 4 2>&1 | grep -v -i warn | tail -6
