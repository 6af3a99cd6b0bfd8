"""Training: `trainer.py` (`TrainConfig`, `train`: the loop behind `moeut train`), `step.py` (the
eager and CUDA-graphed steps, the flat-gradient DDP step), `data.py` (corpus, tokenisation cache,
batches), `tokenizer.py`, `checkpoint.py` (verified safetensors checkpoints) and `run_dir.py` (the
run directory and its lock).
"""
