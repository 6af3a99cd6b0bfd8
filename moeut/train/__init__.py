"""Training: `trainer.py` (`train`: starting and reopening a run behind `moeut train`), `config.py`
(`TrainConfig` and every default), `loop.py` (set up, resume, the steps, the saves), `monitor.py`
(validation, statistics, the step clock, the logs), `step.py` (the eager and CUDA-graphed steps, the
flat-gradient DDP step), `distributed.py` (the process group), `data.py` (corpus, tokenisation
cache, batches), `tokenizer.py`, `checkpoint.py` (verified safetensors checkpoints) and
`run_dir.py` (the run directory and its lock).
"""
