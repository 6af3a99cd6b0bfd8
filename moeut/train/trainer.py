"""`moeut train`: the paper's training recipe on one CPU, one GPU or many (DDP, or FSDP2: `fsdp`).

AdamW (lr 2.5e-4, betas 0.9/0.999, weight decay 0.01), linear warmup then cosine decay to 10% of
the peak, gradient clipping, batch 64 x 1024, bf16 autocast on GPU, reg_loss added to the loss.
Everything a run needs to continue lives in its checkpoints; batches depend only on (seed, step).

What a start does, in order, so that a mistake costs nothing and leaves nothing behind:
  1. every setting is checked (`validate_config`) and the model is built on the meta device, which
     checks its arguments and its size against the memory there is, allocating nothing;
  2. the data are read, the tokenizer trained in memory and the data tokenized into the shared,
     content-addressed cache, which is checked to hold at least one batch;
  3. only then is the run directory created, locked (`run_dir.RunLock`) and written.
A resume locks the run first, removes what interrupted writers left, takes the newest checkpoint
that verifies (reporting and setting aside damaged ones), and cuts metrics.jsonl back to its step.
Training stops, without saving, at the first non-finite loss or gradient norm: the checkpoints on
disk all hold finite states, and none of them is rotated out by a diverged run.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from moeut.train import checkpoint as ckpt_lib
from moeut.train.data import CACHE_FORMAT, Batches, Corpus, tokenize_corpus
from moeut.evaluate import eval_windows, windows_perplexity
from moeut.router import chosen_experts
from moeut.files import open_append, write_json_atomic
from moeut.train.run_dir import (RunLock, check_existing_run_dir, check_new_run_dir, read_json_record, read_run_json,
                                 truncate_metrics)
from moeut.models import (build_model, check_memory, check_model_size, model_kwargs, model_kwargs_of_run,
                          peak_bf16_flops, training_flops_per_token)
from moeut.train.checkpoint import (ModelSpec, optimizer_state_by_name, optimizer_state_by_position,
                                    sharded_optimizer_record)
from moeut.train.fsdp import load_optimizer_state, load_sharded_state, save_sharded_state, shard_model
from moeut.train.step import (FlatGradientStep, GraphedTrainStep, collect_router_logits, set_optimizer_mode,
                              step_body)
from moeut.train.tokenizer import (KINDS, load_tokenizer, run_tokenizer, save_tokenizer, train_paper_tokenizer,
                                   train_tokenizer)

MAX_VOCAB = 65535   # token ids are cached as uint16
MAX_LR = 10.0       # AdamW's step is about lr per weight: far above any useful value, far below float overflow


@dataclass
class TrainConfig:
    model: str = "moeut-tiny"            # moeut-<44M|126M|244M|318M|727M|1B|tiny> or dense-<...>
    init_from: str = ""                  # start from these weights: a run, one of its checkpoints, or an export
    overrides: Dict[str, Any] = field(default_factory=dict)  # constructor arguments replacing the profile's
    data: List[str] = field(default_factory=list)  # text files / dirs / JSONL; empty: Python stdlib sources
    out: str = ""                        # run directory (default runs/<model>-<time>)
    steps: int = 0                       # optimizer steps = length of the cosine schedule (0: device default)
    batch_size: int = 0                  # global sequences per optimizer step (0: 64 on GPU, 16 on CPU)
    micro_batch_size: int = 0            # sequences per forward on each process (0: all); accumulation fills the rest
    context: int = 0                     # tokens per sequence (0: 1024 on GPU, 256 on CPU)
    lr: float = 0.0                      # peak learning rate (0: 2.5e-4 on GPU, 1e-3 on CPU)
    min_lr_ratio: float = 0.1            # cosine decays to lr * this
    warmup: int = -1                     # warmup steps (-1: 0 for 44M/tiny, 4000 larger; capped at steps/10)
    weight_decay: float = 0.01
    decay_vectors: bool = True           # weight decay on norms and biases too, as the training code's
                                         # AdamW(model.parameters()) has it; false exempts them
    clip: float = -1.0                   # gradient-norm clip (-1: 0.1 for 44M/tiny, 0.25 larger; 0 disables)
    precision: str = "auto"              # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    vocab_size: int = 8000               # SentencePiece pieces
    tokenizer: str = ""                  # "" or "code": train the lossless one; "paper": the training
                                         # code's; else a SentencePiece model file to use as it is
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 0               # steps between validation runs (0: steps/10)
    eval_windows: int = -1               # validation windows per evaluation (-1: 64 on GPU, 32 on CPU; 0: all)
    ckpt_interval: int = 0               # steps between checkpoints (0: steps/10)
    keep_checkpoints: int = 3
    compile: bool = False                # torch.compile the model
    cuda_graph: str = "auto"             # replay steps from CUDA graphs: auto (whenever it applies) | on | off
    parallel: str = "ddp"                # several processes: ddp (a full copy each) | fsdp (sharded, `fsdp`)
    fsdp_keep_gathered: bool = False     # FSDP: the forward gathers each layer once, not at every
                                         # application (about half the all-gathers, more memory held)
    activation_checkpointing: bool = False
    deterministic: bool = False          # PyTorch deterministic algorithms (bitwise reproducible on GPU)
    cache_dir: str = ""                  # tokenized-data cache (default ~/.cache/moeut)
    strict_data: bool = False            # the same as decode_errors = "strict" (kept for older run.json files)
    decode_errors: str = "replace"       # bytes that are not UTF-8: replace (counted) | strict (refuse) | skip (the file)
    valid_data: List[str] = field(default_factory=list)  # validation sources (default: held out of --data)
    valid_fraction: float = 0.02         # share of --data's characters held out for validation, without --valid-data
    tensorboard: bool = True
    wandb: bool = False                  # also log to Weights & Biases (WANDB_MODE=offline works without network)
    wandb_project: str = "moeut"
    progress: bool = True
    print_interval: int = 0              # steps between plain log lines on stdout (0: 10 x log_interval)
    sample_prompt: str = ""              # prompt of the greedy sample printed at the end ("": the start of the
                                         # first validation document, so the sample is in the data's language)
    sample_tokens: int = 0               # also sample this many tokens at every evaluation (0: only at the end)
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    text_field: str = "text"             # the column / JSON field holding the text of a document
    stop_after: int = 0                  # testing aid: pretend a SIGTERM arrived after this many steps


def default_cache_dir() -> str:
    return str(Path.home() / ".cache" / "moeut")


def resolve_defaults(cfg: TrainConfig, on_gpu: bool) -> TrainConfig:
    small = cfg.model.endswith("-44M") or cfg.model.endswith("-tiny")
    cfg.steps = cfg.steps or (100_000 if on_gpu else 400)
    cfg.batch_size = cfg.batch_size or (64 if on_gpu else 16)
    cfg.context = cfg.context or (1024 if on_gpu else 256)
    cfg.lr = cfg.lr or (2.5e-4 if on_gpu else 1e-3)
    if cfg.warmup < 0:
        cfg.warmup = 0 if small else min(4000, cfg.steps // 10)
    if cfg.clip < 0:
        cfg.clip = 0.1 if small else 0.25
    cfg.eval_interval = cfg.eval_interval or max(1, cfg.steps // 10)
    if cfg.eval_windows < 0:   # measured on CPU: 32 windows every steps/10 cost 3.1% of a default run (64: 5.6%)
        cfg.eval_windows = 64 if on_gpu else 32
    cfg.ckpt_interval = cfg.ckpt_interval or max(1, cfg.steps // 10)
    if cfg.precision == "auto":
        cfg.precision = "bf16" if on_gpu else "fp32"
    cfg.out = cfg.out or f"runs/{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.cache_dir = cfg.cache_dir or default_cache_dir()
    return cfg


# Each resolved setting: (type, test, what it must be). The flag named in an error is --<name>.
_RANGES: Dict[str, tuple] = {
    "sample_tokens": (int, lambda v: 0 <= v <= 100_000, "an integer from 0 to 100000"),
    "steps": (int, lambda v: v >= 1, "a positive integer"),
    "batch_size": (int, lambda v: v >= 1, "a positive integer"),
    "micro_batch_size": (int, lambda v: v >= 0, "a non-negative integer"),
    "context": (int, lambda v: 1 <= v <= 1 << 20, "an integer from 1 to 1048576"),
    "lr": (float, lambda v: 0 < v <= MAX_LR, f"a positive number of at most {MAX_LR:g}"),
    "min_lr_ratio": (float, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "warmup": (int, lambda v: v >= 0, "a non-negative integer"),
    "weight_decay": (float, lambda v: 0 <= v < math.inf, "a non-negative, finite number"),
    "clip": (float, lambda v: 0 <= v < math.inf, "a non-negative, finite number (0: no clipping)"),
    "vocab_size": (int, lambda v: 2 <= v <= MAX_VOCAB, f"an integer from 2 to {MAX_VOCAB}"),
    "seed": (int, lambda v: 0 <= v < 1 << 63, "a non-negative integer"),
    "log_interval": (int, lambda v: v >= 1, "a positive integer"),
    "print_interval": (int, lambda v: v >= 0, "a non-negative integer (0: ten log intervals)"),
    "eval_interval": (int, lambda v: v >= 1, "a positive integer"),
    "eval_windows": (int, lambda v: v >= 0, "a non-negative integer (0: all)"),   # (-1 resolved before)
    "ckpt_interval": (int, lambda v: v >= 1, "a positive integer"),
    "keep_checkpoints": (int, lambda v: v >= 1, "a positive integer"),
    "valid_fraction": (float, lambda v: 0 <= v <= 0.5, "a number from 0 to 0.5"),
    "stop_after": (int, lambda v: v >= 0, "a non-negative integer"),
}


def check_types(cfg: TrainConfig) -> None:
    """Each setting of the type of its default (a run.json is read as untrusted data)."""
    for f in fields(TrainConfig):
        v = getattr(cfg, f.name)
        want = type(f.default) if f.default_factory is MISSING else type(f.default_factory())
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
        if want is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            raise ValueError(f"--{f.name.replace('_', '-')} must be of type {want.__name__}, got {v!r}")


def validate_config(cfg: TrainConfig, world: int = 1) -> None:
    """Every resolved setting in range and of its type (a run.json may come from anyone), and the
    batch divisible among processes and micro-batches; ValueError naming the flag."""
    def flag(name):
        return "--" + name.replace("_", "-")

    for name, (typ, ok, what) in _RANGES.items():
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float) if typ is float else int) or not ok(v):
            raise ValueError(f"{flag(name)} must be {what}, got {v!r}")
    if cfg.precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    if cfg.cuda_graph not in ("auto", "on", "off"):
        raise ValueError(f"--cuda-graph must be auto, on or off, got {cfg.cuda_graph!r}")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"--parallel must be ddp or fsdp, got {cfg.parallel!r}")
    if cfg.parallel == "fsdp" and cfg.compile is True:
        raise ValueError("--compile is not combined with --parallel fsdp (the FSDP step runs eagerly)")
    if cfg.parallel == "fsdp" and cfg.sample_tokens:
        raise ValueError("--sample-tokens needs the whole model in one process: not with --parallel fsdp "
                         "(sample the run with moeut generate)")
    if cfg.fsdp_keep_gathered is True and cfg.parallel != "fsdp":
        raise ValueError("--fsdp-keep-gathered applies to --parallel fsdp only")
    for name in ("compile", "activation_checkpointing", "deterministic", "strict_data", "tensorboard", "progress",
                 "fsdp_keep_gathered", "wandb", "decay_vectors"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{flag(name)} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("model", "out", "cache_dir", "sample_prompt", "tokenizer", "wandb_project", "init_from"):
        if not isinstance(getattr(cfg, name), str):
            raise ValueError(f"{flag(name)} must be a string, got {getattr(cfg, name)!r}")
    for name in ("data", "valid_data"):
        v = getattr(cfg, name)
        if not isinstance(v, list) or not all(isinstance(d, str) for d in v):
            raise ValueError(f"{flag(name)} must be a list of paths, got {v!r}")
    if cfg.decode_errors not in ("replace", "strict", "skip"):
        raise ValueError(f"--decode-errors must be replace, strict or skip, got {cfg.decode_errors!r}")
    if cfg.valid_fraction == 0 and not cfg.valid_data:
        raise ValueError("--valid-fraction 0 needs --valid-data: the run must validate on something")
    if not isinstance(cfg.overrides, dict) or not all(isinstance(k, str) for k in cfg.overrides):
        raise ValueError(f"--set must give KEY=VALUE pairs, got {cfg.overrides!r}")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch_size or per_rank
    if micro > per_rank or per_rank % micro:
        raise ValueError(f"--micro-batch-size {micro} must divide the per-process batch {per_rank}")


def lr_lambda(cfg: TrainConfig):
    """The learning rate's factor at a step, as the training code schedules it (`Task.create_lr_scheduler`
    and `Task.set_lr` in framework/task/task.py): a linear warmup, then a cosine annealed over the whole
    run's length to min_lr_ratio, read at step - warmup (so a run with warmup ends just above the floor)."""
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


# ------------------------------------------------------------------------------------------------
# Distributed helpers: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK.
# ------------------------------------------------------------------------------------------------

def setup_distributed(want: str = "auto", group_of_one: bool = False):
    """(rank, world size, device): `want` is auto (a GPU when there is one), cpu, cuda or cuda:N;
    under torchrun each process takes the GPU of its LOCAL_RANK unless an index is given.
    `group_of_one`: a one-process group even without torchrun (FSDP2 shards over a process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {want}: no CUDA device is available (use --device cpu)")
        device = torch.device("cuda", local) if want in ("auto", "cuda") else torch.device(want)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {want}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif group_of_one and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def end_distributed() -> None:
    """After a finished run: every rank waits for the others (rank 0 still evaluates and samples), then
    the process group is torn down. A rank that exits with gloo's group alive can abort in its
    threads' teardown ('terminate called without an active exception'; seen in CI)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_rank0(fn: Callable[[], Any], rank: int, world: int, device) -> Any:
    """Run `fn` on rank 0; if it raises, every rank raises (rank 0 its own error), so no rank waits
    forever at the next collective."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except BaseException as e:   # noqa: BLE001 (re-raised below, after the others are told)
            error = e
    if world > 1:
        failed = torch.tensor(int(error is not None), device=device)
        dist.broadcast(failed, 0)
        if failed.item() and error is None:
            raise RuntimeError("rank 0 stopped the run (its error is printed above)")
    if error is not None:
        raise error
    return result


# ------------------------------------------------------------------------------------------------
# Data: a new run's (built before its directory exists) and a resumed run's (from the cache).
# ------------------------------------------------------------------------------------------------

_KEY = re.compile(r"^[0-9a-f]{24}$")


def build_data(cfg: TrainConfig, tok: Optional[Tokenizer], say: Callable[[str], None] = print):
    """(tokenizer, cache key, train docs count, valid docs count) for --data; the tokenizer is trained
    in memory when `tok` is None. The tokenized data land in the shared cache under their key. The
    corpus streams through (see `data`): memory does not grow with its size."""
    corpus = Corpus(cfg.data, strict=cfg.strict_data, text_field=cfg.text_field, valid_sources=cfg.valid_data,
                    valid_fraction=cfg.valid_fraction, decode_errors=cfg.decode_errors)
    scan = corpus.scan(warn=say)
    say(scan.describe())
    if tok is None:
        kind = cfg.tokenizer or "code"
        say(f"training a {cfg.vocab_size}-piece {kind} tokenizer on {scan.n_train} documents")
        if kind == "paper":
            long = [0]

            def counted(texts):
                for t in texts:
                    long[0] += len(t.encode("utf-8")) + len("<STORY_SEP>") > 4192
                    yield t
            tok = train_paper_tokenizer(counted(corpus.train_texts(scan)), cfg.vocab_size)
            if long[0]:
                say(f"the paper tokenizer learns from documents of at most 4192 bytes (SentencePiece's default, "
                    f"as in the training code): {long[0]} of {scan.n_train} are longer and are only tokenized")
        else:
            tok = train_tokenizer(corpus.train_texts(scan), cfg.vocab_size, seed=cfg.seed)
    key = scan.cache_key(tok.model_bytes())
    tokenize_corpus(corpus, scan, tok, Path(cfg.cache_dir) / key, cfg.progress)
    return tok, key, scan.n_train, scan.n_valid


def open_tokens(cache_dir: str, key: str):
    cache = Path(cache_dir) / key
    train = np.memmap(cache / "train.bin", dtype=np.uint16, mode="r")
    valid = np.memmap(cache / "valid.bin", dtype=np.uint16, mode="r")
    return train, valid


def check_tokens(cfg: TrainConfig, train_tokens, valid_tokens, vocab: int) -> None:
    Batches(train_tokens, cfg.context, cfg.batch_size, cfg.seed)   # raises if not one window fits
    if len(valid_tokens) < 2:
        raise ValueError("the validation split has fewer than 2 tokens: add data")
    if len(train_tokens) and int(np.max(train_tokens)) >= vocab:
        raise ValueError(f"the cached tokens do not fit the tokenizer's {vocab} pieces (a damaged cache?)")


def resume_data(cfg: TrainConfig, run_dir: Path, user_data: Optional[List[str]], say: Callable[[str], None],
                user_valid_data: Optional[List[str]] = None):
    """A resumed run's tokens: from the cache (the user's --cache-dir or the default, never a path
    read from the run) under the key the run recorded; else rebuilt from the user's --data, or from
    the default corpus if the run used it. Paths recorded in the run are not followed."""
    record = run_dir / "data.json"
    try:
        recorded = read_json_record(record)
        key, recorded_format = recorded.get("key"), recorded.get("format")
    except (OSError, ckpt_lib.CheckpointError, AttributeError):
        key = recorded_format = None
    tok = run_tokenizer(run_dir)
    if isinstance(key, str) and _KEY.match(key) and all((Path(cfg.cache_dir) / key / f).is_file()
                                                       for f in ("train.bin", "valid.bin")):
        return tok, key
    if user_data is None and cfg.data:
        raise ValueError(f"the tokenized data of {run_dir} are not in the cache {cfg.cache_dir}; pass --cache-dir "
                         f"where they are, or --data with the run's sources (it recorded {cfg.data}) to rebuild them")
    if cfg.valid_data and not user_valid_data:
        raise ValueError(f"the tokenized data of {run_dir} are not in the cache {cfg.cache_dir}; to rebuild them pass "
                         f"--valid-data with the run's validation sources too (it recorded {cfg.valid_data})")
    if user_data is not None:
        cfg.data = list(user_data)
    if user_valid_data:
        cfg.valid_data = list(user_valid_data)
    _, new_key, n_train, n_valid = build_data(cfg, tok, say)
    if key is not None and new_key != key:
        if recorded_format == CACHE_FORMAT:
            say("warning: the data under --data are not those this run started on (their cache is gone): "
                "resuming on the new data")
        else:
            say("the token cache was rebuilt in the current format (the run's cache predates it); if --data "
                "changed too, the run continues on the new data")
    write_json_atomic(record, {"key": new_key, "format": CACHE_FORMAT, "train_documents": n_train,
                               "valid_documents": n_valid})
    return tok, new_key


# ------------------------------------------------------------------------------------------------
# Evaluation and statistics.
# ------------------------------------------------------------------------------------------------

def validation_perplexity(model, tokens: np.ndarray, context: int, max_windows=None, bf16: bool = False) -> float:
    """exp(mean token NLL) over non-overlapping windows of held-out text, in the training precision."""
    was_training = model.training
    model.eval()
    ppl, _ = windows_perplexity(model, eval_windows(tokens, context, max_windows or None), bf16=bf16)
    model.train(was_training)
    return ppl


def expert_statistics(model, tokens: np.ndarray, context: int, amp) -> Dict[str, Any]:
    """`analyze.training_summary` on two validation windows: expert usage entropy, experts never
    selected, same-token expert overlap per shared layer, residual norms. Runs at evaluations only."""
    from moeut.analyze import training_summary
    windows = list(eval_windows(tokens, context, 2))
    if not windows:
        return {}
    windows = [w for w in windows if len(w) == len(windows[0])]
    device = next(model.parameters()).device
    batch = torch.stack([w[:-1] for w in windows]).to(device)
    with torch.autocast(device.type, amp, enabled=amp != torch.float32):
        return training_summary(model, batch)


def sample_text(model, tok, prompt: str, n_tokens: int) -> str:
    """The prompt and its greedy continuation, decoded eagerly in eval mode (no decoding graphs kept, so
    nothing stays allocated beside the training step)."""
    from moeut.generate import generate
    was_training = model.training
    model.eval()
    try:
        ids = generate(model, [tok.encode(prompt)], max_new_tokens=n_tokens, temperature=0.0, eos_id=tok.eot_id,
                       cuda_graph=False, reuse_graph=False)[0]
    finally:
        model.train(was_training)
    return prompt + tok.decode(ids)


def unigram_perplexity(train: np.ndarray, valid: np.ndarray, vocab: int) -> float:
    """Perplexity on `valid` of an add-one-smoothed unigram model of `train`: the floor to beat."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[np.asarray(valid, dtype=np.int64)].mean()))


def router_stats(logits: List[torch.Tensor], k: int) -> Dict[str, float]:
    """Per layer application: expert-usage entropy (normalised to [0, 1]) and fraction never selected."""
    stats = {}
    for i, lg in enumerate(logits):
        E = lg.shape[-1]
        chosen = chosen_experts(lg.reshape(-1, E), k).flatten()
        usage = torch.bincount(chosen, minlength=E).double()
        p = usage / usage.sum()
        ent = -(p[p > 0] * p[p > 0].log()).sum().item() / math.log(E)
        stats[f"router/{i:02d}/usage_entropy"] = round(ent, 4)
        stats[f"router/{i:02d}/never_selected"] = round((usage == 0).double().mean().item(), 4)
    return stats


# ------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------

class _StopFlag:
    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signum


def _rng_state() -> Dict[str, Any]:
    """The RNG states as tensors and plain data (no NumPy objects: checkpoints hold no pickles)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (str(name), keys.astype(np.int64).tolist(), int(pos),
                                                    int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: Dict[str, Any], source: str) -> None:
    try:
        version, internal, gauss = s["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
        name, keys, pos, has_gauss, cached = s["numpy"]
        np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(s["torch"])
        if s.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ckpt_lib.CheckpointError(f"checkpoint {source}: its RNG state is malformed ({e})") from None


def config_of_run(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was started with (what `--resume` continues). Read as data: unknown keys
    are ignored, the values are checked by `validate_config` before use, and the paths it records
    are not followed: `cache_dir` is reset to the default (set your own), and `data` is only shown
    to the user unless they pass the sources again (`train(..., user_data=...)`)."""
    check_existing_run_dir(Path(run_dir), writable=False)
    meta = read_run_json(Path(run_dir))
    if "imported_from" in meta:
        raise ValueError(f"{run_dir} was imported from {meta['imported_from'].get('checkpoint')}: it has no optimizer "
                         f"state or training data to resume from; use it with `moeut eval` and `moeut generate`")
    saved = meta.get("config", {})
    known = {f.name for f in fields(TrainConfig)}
    saved = dict(saved)
    if isinstance(saved.get("cuda_graph"), bool):   # runs written before the setting had an "auto"
        saved["cuda_graph"] = "on" if saved["cuda_graph"] else "auto"
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    cfg.overrides = {**model_kwargs_of_run(meta), **(cfg.overrides or {})}
    cfg.out = str(run_dir)
    cfg.cache_dir = ""
    return cfg


def _start_new_run(cfg: TrainConfig, run_dir: Path, kwargs: Dict[str, Any], device, say, source=None) -> RunLock:
    """Checks, data and tokenizer first; then the directory, locked, with run.json, tokenizer.model
    and data.json. On failure, exactly what this start created is removed: never a file another
    process wrote (two starts racing for one --out: the loser leaves the winner's run as it was).
    `source`: --init-from's (its tokenizer unless --tokenizer; its weights' shapes checked here)."""
    check_new_run_dir(run_dir)
    given = None
    if cfg.tokenizer and cfg.tokenizer not in KINDS:
        given = load_tokenizer(cfg.tokenizer)
        cfg.vocab_size = given.vocab_size
    elif source is not None:
        if cfg.tokenizer:
            raise ValueError(f"--init-from: --tokenizer {cfg.tokenizer} would train a new tokenizer, whose pieces "
                             "the weights do not know; give a tokenizer file of the same vocabulary, or none")
        given = source.tokenizer
        cfg.vocab_size = given.vocab_size
    check_model_size(cfg.model, cfg.vocab_size, kwargs)
    with torch.device("meta"):
        meta_model = build_model(cfg.model, cfg.vocab_size, kwargs)
    if source is not None:
        try:
            ckpt_lib.check_compatible(ModelSpec.of(meta_model).tensors, source.shapes, str(source.path))
        except ckpt_lib.CheckpointError as e:
            raise ValueError(f"--init-from: {e} (the tokenizer and --set must keep every weight's shape)") from None
    check_memory(meta_model, device, "train")
    tok, key, n_train, n_valid = build_data(cfg, given, say)
    check_tokens(cfg, *open_tokens(cfg.cache_dir, key), tok.vocab_size)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
        created_dir = True
    except FileExistsError:
        created_dir = False
    lock, written = None, []
    try:
        lock = RunLock(run_dir, record=False)
        check_new_run_dir(run_dir)   # again, under the lock: another start may have won the race
        lock.record_holder()
        meta = {"model": cfg.model, "model_kwargs": kwargs, "vocab_size": tok.vocab_size, "config": asdict(cfg),
                "moeut_version": _version(), **({"init_from": source.describe()} if source is not None else {})}
        written += [run_dir / "run.json", run_dir / "tokenizer.model", run_dir / "tokenizer.json",
                    run_dir / "tokenizer_config.json", run_dir / "data.json"]
        write_json_atomic(run_dir / "run.json", meta)
        save_tokenizer(tok, run_dir)
        write_json_atomic(run_dir / "data.json", {"key": key, "format": CACHE_FORMAT, "train_documents": n_train,
                                                  "valid_documents": n_valid})
        return lock
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if lock is not None:
            lock.remove_and_release()
        if created_dir:
            try:
                run_dir.rmdir()   # only if nothing else is in it
            except OSError:
                pass
        raise


def _version() -> str:
    """The installed moeut's version (recorded in run.json)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("moeut")
    except PackageNotFoundError:
        return "unknown"


def _open_run_for_resume(cfg: TrainConfig, run_dir: Path, kwargs: Dict[str, Any], user_data, device, say,
                         user_valid_data=None):
    """(lock, checkpoint or None, run.json to write once the checkpoint loaded or None): the run locked,
    leftovers removed, the newest usable checkpoint read (`checkpoint_reader`: every newer one named
    with its fault and set aside), the data found, metrics cut back to its step. Nothing the run holds
    is rewritten before the checkpoint was found usable."""
    check_existing_run_dir(run_dir, writable=True)
    lock = RunLock(run_dir)
    try:
        for p in ckpt_lib.remove_stale_temporaries(run_dir):
            say(f"removed {p.name}, left by an interrupted write")
        meta = read_run_json(run_dir)
        vocab = meta.get("vocab_size")
        if isinstance(vocab, bool) or not isinstance(vocab, int) or not 2 <= vocab <= MAX_VOCAB:
            raise ckpt_lib.CheckpointError(f"{run_dir / 'run.json'}: vocab_size {vocab!r} is out of range")
        check_model_size(cfg.model, vocab, kwargs)
        with torch.device("meta"):
            meta_model = build_model(cfg.model, vocab, kwargs)
        check_memory(meta_model, device, "train")
        spec = ModelSpec.of(meta_model, optimizer_parameter_names(meta_model))
        tok, _ = resume_data(cfg, run_dir, user_data, say, user_valid_data)
        if tok.vocab_size != vocab:
            raise ckpt_lib.CheckpointError(f"{run_dir}: its tokenizer has {tok.vocab_size} pieces, run.json "
                                           f"says {vocab}")
        part = "training" if cfg.parallel == "fsdp" else "all"
        found = ckpt_lib.newest_usable_checkpoint(run_dir, part, spec, warn=say)
        step = found.step if found is not None else 0
        for newer in [p for p in ckpt_lib.list_checkpoints(run_dir) if ckpt_lib.checkpoint_step(p) > step]:
            say(f"moved the unusable checkpoint {newer.name} aside to {ckpt_lib.quarantine(newer).name}")
        new_meta = _extended_schedule(cfg, meta, step, say)
        dropped = truncate_metrics(run_dir, step)
        if dropped:
            say(f"metrics.jsonl: dropped {dropped} records after step {step} (they are logged again)")
        if found is None and meta.get("init_from"):
            raise ValueError(f"{run_dir} started from {meta['init_from'].get('path')} and has no checkpoint yet: "
                             "start it again (--init-from) rather than resume it from random weights")
        if found is None:
            say(f"{run_dir} has no checkpoint yet: starting it from step 0")
        return lock, found, new_meta
    except BaseException:
        lock.release()
        raise


def _extended_schedule(cfg: TrainConfig, meta: Dict[str, Any], step: int, say) -> Optional[Dict[str, Any]]:
    """`--resume --steps N` with N other than the run's length: a longer run, stated; returns the run.json
    to record it in (written once the checkpoint has loaded), or None. The cosine schedule is recomputed
    over the new length, so the learning rate at the checkpoint's step moves to where the longer cosine
    has it."""
    started = meta.get("config", {}).get("steps")
    if not isinstance(started, int) or cfg.steps == started:
        return None
    if cfg.steps <= step:
        raise ValueError(f"--steps {cfg.steps}: the run is already at step {step}; give more steps to extend it")
    before = lr_lambda(replace(cfg, steps=started))(step) * cfg.lr
    after = lr_lambda(cfg)(step) * cfg.lr
    say(f"extending the run from {started} to {cfg.steps} steps: the cosine schedule now spans {cfg.steps} steps, "
        f"so the learning rate at step {step} goes from {before:.3g} to {after:.3g}")
    return {**meta, "config": {**meta["config"], "steps": cfg.steps}}


def progress_line(rec: Dict[str, Any], steps: int, steps_per_second: float) -> str:
    """One plain line for logs (a cluster's, or --no-progress): step, loss, throughput, MFU, ETA."""
    left = (steps - rec["step"]) / max(steps_per_second, 1e-9)
    eta = f"{int(left // 3600)}h{int(left % 3600 // 60):02d}m" if left >= 3600 else f"{int(left // 60)}m{int(left % 60):02d}s"
    mfu = f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""
    return (f"step {rec['step']}/{steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.3g} | "
            f"{rec['tokens_per_s'] / 1e3:.1f}k tok/s{mfu} | ETA {eta}")


def start_wandb(cfg: TrainConfig, run_dir: Path, say):
    """A Weights & Biases run for --wandb (its files under the run directory; WANDB_MODE=offline logs
    without network, `wandb sync` uploads later)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install wandb") from None
    run = wandb.init(project=cfg.wandb_project, name=Path(cfg.out).name, dir=str(run_dir), config=asdict(cfg),
                     resume="allow", id=_wandb_id(run_dir))
    say(f"Weights & Biases: {getattr(run, 'url', None) or 'offline, in ' + str(run_dir / 'wandb')}")
    return run


def _wandb_id(run_dir: Path) -> str:
    """A W&B run id from the run directory's path, so a resumed run continues the same W&B run."""
    import hashlib
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


class StepClock:
    """Where a run's time goes, for time-to-quality: `train_seconds`, the steps' own time (from a step's
    start to the host sync that ends it; evaluation and checkpoints excluded), `wall_seconds` since the
    launch, and `startup_seconds`, what each process's first `startup_steps` steps took beyond a
    steady step (CUDA graph capture, kernel autotuning): those steps count in `train_seconds` at the
    time of the first steady step, so short runs are not charged a one-off start. All three carry over
    a resume (the checkpoint's "clock")."""

    def __init__(self, saved: Optional[Dict[str, Any]], launched: float, startup_steps: int):
        saved = saved if isinstance(saved, dict) else {}
        get = lambda k: float(saved[k]) if isinstance(saved.get(k), (int, float)) and saved[k] >= 0 else 0.0  # noqa: E731
        self.train, self.startup, self.wall_before = get("train_seconds"), get("startup_seconds"), get("wall_seconds")
        self.launched, self.startup_steps = launched, startup_steps
        self.steps, self.pending, self.since_record, self.t0 = 0, 0.0, 0.0, 0.0
        self.evaluating = get("eval_seconds")   # validation, expert statistics and samples

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        dt = time.perf_counter() - self.t0
        self.steps += 1
        if self.steps <= self.startup_steps:
            self.pending += dt
            return
        if self.steps == self.startup_steps + 1:   # the start-up steps, charged at this steady step's time
            self.train += self.startup_steps * dt
            self.since_record += self.startup_steps * dt
            self.startup += max(0.0, self.pending - self.startup_steps * dt)
        self.train += dt
        self.since_record += dt

    def interval(self) -> float:
        """Step seconds since the last `record` (the start-up steps' share included)."""
        return self.since_record if self.steps > self.startup_steps else self.pending

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.launched

    def wall_here(self) -> float:
        """Seconds since this process launched the run."""
        return time.perf_counter() - self.launched

    def record(self, tokens: int) -> Dict[str, float]:
        self.since_record = 0.0
        return {"tokens": tokens, "train_seconds": round(self.train, 3), "wall_seconds": round(self.wall(), 3),
                "startup_seconds": round(self.startup, 3), "eval_seconds": round(self.evaluating, 3)}

    def state(self) -> Dict[str, float]:
        return {"train_seconds": self.train, "wall_seconds": self.wall(), "startup_seconds": self.startup,
                "eval_seconds": self.evaluating}


class Diverged(RuntimeError):
    """The loss, the gradient norm, the weights or the optimizer state became non-finite."""


def state_is_finite(model: torch.nn.Module, opt: torch.optim.Optimizer, world: int) -> bool:
    """Whether every weight and AdamW moment is finite (this process's pieces of them under FSDP); with
    several processes every process learns whether all are (collective)."""
    tensors = [p.detach() for p in model.parameters()]
    tensors += [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    device = tensors[0].device
    bad = torch.zeros((), device=device)
    for t in tensors:
        if t.numel():
            bad += (~torch.isfinite(t)).any().float()
    if world > 1 or (dist.is_available() and dist.is_initialized()):
        dist.all_reduce(bad)
    return not bool(bad.item())


def last_good_checkpoint(run_dir: Path) -> str:
    """A sentence naming the newest checkpoint that is usable now (read and checked), or saying there is none."""
    try:
        found = ckpt_lib.newest_usable_checkpoint(run_dir, "verify", warn=lambda m: None)
    except ckpt_lib.CheckpointError:
        found = None
    if found is None:
        return "No usable checkpoint had been written."
    return f"The newest usable checkpoint, {found.path.name} (step {found.step}), holds the last state saved."


def train(cfg: TrainConfig, resume: bool = False, user_data: Optional[List[str]] = None,
          user_valid_data: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train (or, with resume=True, continue the run in cfg.out). Returns final metrics for rank 0.
    `user_data`, `user_valid_data`: --data and --valid-data given with --resume (used only if the run's
    tokenized data are not cached)."""
    launched = time.perf_counter()
    check_device_name(cfg.device)
    rank, world, device = setup_distributed(cfg.device, group_of_one=cfg.parallel == "fsdp")
    say = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    check_types(cfg)
    source = None
    if cfg.init_from and not resume:   # the model, its arguments and the tokenizer come from the source
        from moeut.train.init_from import open_source
        source = open_source(cfg.init_from, say)
        cfg.model, cfg.overrides = source.model, {**source.kwargs, **(cfg.overrides or {})}
    cfg = resolve_defaults(cfg, device.type == "cuda")
    validate_config(cfg, world)
    kwargs = model_kwargs(cfg.model, cfg.overrides)
    run_dir = Path(cfg.out)
    per_rank = cfg.batch_size // world
    accum = per_rank // (cfg.micro_batch_size or per_rank)
    graph_blockers = step_graph_blockers(cfg, device)
    if cfg.cuda_graph == "on" and graph_blockers:
        raise ValueError("--cuda-graph needs " + "; ".join(graph_blockers))
    if cfg.cuda_graph != "off" and not graph_blockers:
        mode = "CUDA graphs (each step replayed whole; --no-cuda-graph runs it eagerly)"
    else:
        mode = "eager (" + ("--no-cuda-graph" if cfg.cuda_graph == "off" else "CUDA graphs need " +
                            "; ".join(graph_blockers)) + ")"
    if cfg.parallel == "fsdp":
        mode += (f", FSDP2 over {world} process{'es' if world > 1 else ''} (parameters, gradients and AdamW state "
                 f"sharded; checkpoints one file per process{', layers kept gathered in the forward' if cfg.fsdp_keep_gathered else ''})")
    elif world > 1:
        mode += f", {world} processes averaging one flat gradient buffer per step"
    say(f"step mode: {mode}")

    check_model_size(cfg.model, cfg.vocab_size, kwargs)
    new_meta = None
    if resume:
        lock, resume_from, new_meta = on_rank0(
            lambda: _open_run_for_resume(cfg, run_dir, kwargs, user_data, device, say, user_valid_data), rank, world,
            device) \
            or (None, None, None)
    else:
        lock, resume_from = on_rank0(lambda: _start_new_run(cfg, run_dir, kwargs, device, say, source),
                                     rank, world, device), None
    barrier(world)
    if resume and rank != 0:   # rank 0 found it usable and set aside every newer one; each rank reads it
        resume_from = (ckpt_lib.list_checkpoints(run_dir) or [None])[-1]
    try:
        return _train_locked(cfg, run_dir, kwargs, rank, world, device, accum, resume_from, new_meta, say, launched,
                             source)
    finally:
        if lock is not None:
            lock.release()


def check_device_name(name: str) -> None:
    """auto, cpu, cuda or cuda:N, and a CUDA device only where there is one; ValueError naming --device."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", name):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available (use --device cpu)")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _split_for_weight_decay(model: torch.nn.Module):
    """(matrices, vectors) as (name, parameter) lists: the former decay, norms and biases do not."""
    named = list(model.named_parameters())
    return [(n, p) for n, p in named if p.dim() >= 2], [(n, p) for n, p in named if p.dim() < 2]


def optimizer_groups(model: torch.nn.Module, weight_decay: float, decay_vectors: bool = True) -> List[Dict[str, Any]]:
    """AdamW's two groups: matrices, and vectors (norms, biases). Both decay by default, as in the training
    code (`SimpleTask.create_optimizer` passes model.parameters() with one weight decay); with
    `decay_vectors=False` the vectors do not. (A checkpoint keeps its groups' settings: runs saved with
    undecayed vectors resume that way.)"""
    decay, vectors = _split_for_weight_decay(model)
    return [{"params": [p for _, p in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in vectors], "weight_decay": weight_decay if decay_vectors else 0.0}]


def optimizer_parameter_names(model: torch.nn.Module) -> List[str]:
    """The parameters' names in the optimizer's order (the positions of a one-process AdamW state)."""
    decay, no_decay = _split_for_weight_decay(model)
    return [n for n, _ in decay + no_decay]


def startup_summary(cfg: TrainConfig, model: torch.nn.Module, n_train: int, n_valid: int, device, world: int) -> str:
    """What the run will do, in a few lines: the model, the data, the token budget and how many passes
    over the training split it makes, where and in what precision, and the schedule."""
    params = sum(p.numel() for p in model.parameters())
    windows = max(n_train // (cfg.context + 1), 1)   # `Batches` draws non-overlapping windows
    tokens = cfg.steps * cfg.batch_size * cfg.context
    epochs = cfg.steps * cfg.batch_size / windows
    warm = f"warmup {cfg.warmup} steps, " if cfg.warmup else ""
    return (f"model: {cfg.model}, {params / 1e6:.1f}M parameters\n"
            f"data: {n_train:,} training tokens, {n_valid:,} validation tokens\n"
            f"budget: {cfg.steps:,} steps x {cfg.batch_size} x {cfg.context} = {tokens:,} tokens "
            f"({epochs:.2f} epochs of the training split)\n"
            f"device: {device}{f' x {world} processes' if world > 1 else ''}, precision {cfg.precision}; "
            f"AdamW lr {cfg.lr:g}, {warm}cosine to {cfg.min_lr_ratio:g} x lr, clip {cfg.clip:g}")


def step_graph_blockers(cfg: TrainConfig, device) -> List[str]:
    """Why the step cannot be replayed from CUDA graphs (empty: it can)."""
    reasons = {"a CUDA device (this is CPU)": device.type != "cuda",
               "no --compile (torch.compile makes its own graphs)": cfg.compile,
               "no --activation-checkpointing (its recomputation runs outside the captured forward)":
                   cfg.activation_checkpointing,
               "no --parallel fsdp (its gathers and reduce-scatters run eagerly)": cfg.parallel == "fsdp"}
    return [need for need, blocked in reasons.items() if blocked]


def _train_locked(cfg: TrainConfig, run_dir: Path, kwargs, rank: int, world: int, device, accum: int,
                  resume_from, new_meta: Optional[Dict[str, Any]], say, launched: float, source=None) -> Dict[str, Any]:
    """`resume_from`: the checkpoint rank 0 read (`Checkpoint`), its path on the other ranks, or None.
    `new_meta`: a run.json to write once the checkpoint has loaded (a resume that extends the run)."""
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    key = read_json_record(run_dir / "data.json").get("key")
    tok = run_tokenizer(run_dir)
    train_tokens, valid_tokens = open_tokens(cfg.cache_dir, key)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg.model, tok.vocab_size, kwargs).to(device)
    backbone = getattr(model, "transformer", model)
    backbone.activation_checkpointing = cfg.activation_checkpointing
    graphed_steps = cfg.cuda_graph != "off" and not step_graph_blockers(cfg, device)
    amp = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    fsdp = cfg.parallel == "fsdp"
    training = None
    # An FSDP run resuming from a sharded checkpoint reads only its own rows, after sharding; every
    # other resume loads whole tensors into the whole model first.
    if resume_from is not None:
        spec = ModelSpec.of(model, optimizer_parameter_names(model))
        if not isinstance(resume_from, ckpt_lib.Checkpoint):   # ranks other than 0 read it themselves
            resume_from = ckpt_lib.read_checkpoint(resume_from, "training" if fsdp else "all", spec)
        if resume_from.model is None and resume_from.layout == ckpt_lib.SINGLE:
            resume_from.model = ckpt_lib.read_checkpoint(resume_from.path, "model", spec).model
        training = resume_from.training
    if source is not None:   # --init-from: the source's weights, read and checked now
        model.load_state_dict(source.weights(ModelSpec.of(model)))
        say(f"initialised from {source.path} ({source.kind}{f', step {source.step}' if source.step is not None else ''})")
    read_own_shards = resume_from is not None and resume_from.model is None
    if resume_from is not None and not read_own_shards:
        try:
            model.load_state_dict(resume_from.model)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ckpt_lib.CheckpointError(f"checkpoint {resume_from.path} does not fit this run: {str(e)[:300]}") from None
        resume_from.model = None
    if fsdp:
        shard_model(model, amp, reshard_after_forward=not cfg.fsdp_keep_gathered)
    fused_adamw = device.type == "cuda" and not fsdp
    opt = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay, cfg.decay_vectors), lr=cfg.lr, betas=(0.9, 0.999),
                            fused=fused_adamw, capturable=graphed_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    names = optimizer_parameter_names(model)
    say(startup_summary(cfg, model, len(train_tokens), len(valid_tokens), device, world))
    start_step = 0
    if training is not None:
        saved, by_name = training["optimizer"], training.get("optimizer_keys") == "names"
        try:
            if read_own_shards:
                load_sharded_state(model, opt, resume_from.path, saved)
            elif fsdp:
                load_optimizer_state(model, opt, saved if by_name else optimizer_state_by_name(saved, names))
            else:
                opt.load_state_dict(optimizer_state_by_position(saved, names) if by_name else saved)
            sched.load_state_dict(training["scheduler"])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            raise ckpt_lib.CheckpointError(f"checkpoint {resume_from.path} does not fit this run: {str(e)[:300]}") from None
        set_optimizer_mode(opt, fused=fused_adamw, capturable=graphed_steps)   # not the saving run's
        rng = training["rng"]
        _set_rng_state(rng[rank % len(rng)] if isinstance(rng, list) else rng, str(resume_from.path))
        start_step = int(training["step"])
        if new_meta is not None and rank == 0:   # the extended length, recorded only now that the run goes on
            write_json_atomic(run_dir / "run.json", new_meta)
        say(f"resumed {run_dir} from {resume_from.path.name} at step {start_step}")
        if start_step >= cfg.steps:
            say(f"the run is complete ({start_step} of {cfg.steps} steps): nothing to train")

    fwd = torch.compile(model) if cfg.compile else model
    # Several processes average one flat gradient buffer with one all-reduce per step (train_step).
    graphed = GraphedTrainStep(fwd, model, opt, amp, cfg.clip, flat_gradients=world > 1) if graphed_steps else None
    flat_step = FlatGradientStep(fwd, model, opt, amp, cfg.clip) if world > 1 and graphed is None and not fsdp else None
    batches = Batches(train_tokens, cfg.context, cfg.batch_size, cfg.seed)
    has_router = hasattr(backbone, "collect_router_logits")  # MoEUT; the dense baseline has none
    k_ffn = getattr(getattr(getattr(backbone, "layers", [None])[0], "ffn", None), "n_heads", 0) if has_router else 0

    writer = None
    if rank == 0 and cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass
    metrics_f = open_append(run_dir / "metrics.jsonl", say) if rank == 0 else None
    wandb_run = start_wandb(cfg, run_dir, say) if rank == 0 and cfg.wandb else None
    flops_per_token = training_flops_per_token(cfg.model, tok.vocab_size, kwargs, cfg.context)
    peak = peak_bf16_flops(device) if cfg.precision == "bf16" else None
    print_every = cfg.print_interval or 10 * cfg.log_interval
    sample_prompt = cfg.sample_prompt or tok.decode([int(t) for t in valid_tokens[:8]])

    def log(rec):
        if metrics_f is not None:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            scalars = {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
                       and not isinstance(v, bool)}
            if writer is not None:
                for k, v in scalars.items():
                    writer.add_scalar(k, v, rec["step"])
            if wandb_run is not None:
                wandb_run.log(scalars, step=rec["step"])

    def save(step, loss):
        """The state after step `step`'s update, checked finite on every rank before anything is written
        (a poisoned optimizer state makes NaN weights from a finite loss), then saved."""
        if not state_is_finite(model, opt, world):
            raise Diverged(f"the weights or the optimizer state became non-finite at step {step} (the loss before "
                           f"that update was {float(loss.item()):.4g}); training stopped and nothing was saved. "
                           + last_good_checkpoint(run_dir) + " Try a lower --lr or a stronger --clip in a new run.")

        def training_state(opt_state, keys):
            return {"optimizer": opt_state, "optimizer_keys": keys, "scheduler": sched.state_dict(),
                    "rng": _rng_state(), "data_position": step * cfg.batch_size, "config": asdict(cfg),
                    "clock": clock.state()}
        if fsdp:
            ckpt_lib.save_sharded_checkpoint(
                run_dir, step, lambda shard_dir: save_sharded_state(model, opt, shard_dir),
                lambda opt_state: training_state(sharded_optimizer_record(opt_state), "names"),
                keep=cfg.keep_checkpoints, loss=float(loss.item()), rank=rank, world=world, device=device)
        elif rank == 0:
            ckpt_lib.save_checkpoint(run_dir, step, model.state_dict(), training_state(opt.state_dict(), "positions"),
                                     keep=cfg.keep_checkpoints, loss=float(loss.item()))

    stop = _StopFlag()
    # Signal handlers can only be installed from the main thread (a notebook or test runner may not be).
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=start_step, disable=rank != 0 or not cfg.progress, dynamic_ncols=True,
               unit="step", file=sys.stdout)
    model.train()
    tokens_per_step = cfg.batch_size * cfg.context
    clock = StepClock(training.get("clock") if training is not None else None, launched,
                      startup_steps=GraphedTrainStep.WARMUP + 1 if graphed is not None else 1)
    steps_since = 0
    step = start_step
    try:
        while step < cfg.steps:
            clock.start()
            batch = batches.batch(step, rank, world, accum)
            log_step = (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.steps
            router_logits = None
            if graphed is not None:
                loss_sum, reg_sum, gnorm = graphed(batch)
                if log_step and has_router and k_ffn:
                    router_logits = collect_router_logits(model, backbone, batch[-1].to(device), amp)
            else:
                if has_router:
                    backbone.collect_router_logits = log_step
                batch = batch.to(device, non_blocking=True)
                if flat_step is not None:
                    loss_sum, reg_sum, gnorm, router_logits = flat_step(batch)
                else:
                    loss_sum, reg_sum, gnorm, router_logits = step_body(fwd, model, opt, batch, amp, cfg.clip, world)
            sched.step()
            step += 1
            steps_since += 1
            # One host sync per step, for two flags every rank must agree on: a stop signal, and a
            # non-finite loss or gradient norm (which ends the run before anything is saved).
            finite = torch.isfinite(loss_sum) & torch.isfinite(torch.as_tensor(gnorm, device=loss_sum.device))
            flags = torch.stack([torch.tensor(stop.signal is not None, device=device), ~finite.to(device)]).int()
            if world > 1:
                dist.all_reduce(flags)
            stopping, diverged = (bool(v) for v in flags.tolist())
            clock.stop()
            if diverged:
                raise Diverged(
                    f"the loss or gradient norm became non-finite at step {step} (loss {loss_sum.item():.4g}, "
                    f"gradient norm {float(gnorm):.4g}); training stopped and nothing was saved after it. "
                    + last_good_checkpoint(run_dir) + " Try a lower --lr or a stronger --clip in a new run.")
            if step % cfg.log_interval == 0 or step == cfg.steps:
                if world > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                tokens_per_s = tokens_per_step * steps_since / max(clock.interval(), 1e-9)
                rec = {"step": step, "loss": round(loss_sum.item(), 6), "reg_loss": round(reg_sum.item(), 6),
                       "lr": sched.get_last_lr()[0], "grad_norm": round(float(gnorm), 5),
                       "tokens_per_s": round(tokens_per_s, 1), **clock.record(step * tokens_per_step)}
                if peak:
                    rec["mfu"] = round(flops_per_token * tokens_per_s * world / peak, 4)
                if router_logits and k_ffn:
                    rec.update(router_stats(router_logits, k_ffn))
                log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                **({"mfu": f"{100 * rec['mfu']:.1f}%"} if "mfu" in rec else {}))
                if rank == 0 and (step % print_every < cfg.log_interval or step == cfg.steps):
                    bar.write(progress_line(rec, cfg.steps, (step - start_step) / max(clock.wall_here(), 1e-9)))
                steps_since = 0
            bar.update(1)
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                eval_started = time.perf_counter()
                if rank == 0 or fsdp:   # a sharded model runs on every rank in step; rank 0 reports
                    ppl = validation_perplexity(model, valid_tokens, cfg.context, cfg.eval_windows, amp == torch.bfloat16)
                if rank == 0:
                    log({"step": step, "val_ppl": round(ppl, 4), **clock.record(step * tokens_per_step)})
                    bar.write(f"step {step}: validation perplexity {ppl:.2f}")
                if rank == 0 and not fsdp:   # statistics and samples need the whole model in one process
                    stats = expert_statistics(model, valid_tokens, cfg.context, amp)
                    image = stats.pop("ffn_usage_image", None)
                    log({"step": step, **{k: round(v, 5) for k, v in stats.items()}})
                    if writer is not None and image is not None:
                        writer.add_image("ffn_expert_usage", image[None].astype("float32"), step)
                    if cfg.sample_tokens:
                        text = sample_text(model, tok, sample_prompt, cfg.sample_tokens)
                        log({"step": step, "sample": text})
                        bar.write(f"step {step} sample: {text!r}")
                        if writer is not None:
                            writer.add_text("sample", text, step)
                barrier(world)
                clock.evaluating += time.perf_counter() - eval_started
            if step % cfg.ckpt_interval == 0 or step == cfg.steps:
                save(step, loss_sum)
            asked_to_stop = bool(cfg.stop_after) and step - start_step >= cfg.stop_after
            if stopping or asked_to_stop:
                if step % cfg.ckpt_interval != 0 and step != cfg.steps:
                    save(step, loss_sum)
                if rank == 0:
                    bar.write(f"stopped by signal at step {step}; checkpoint written. Continue with: "
                              f"moeut train --resume {run_dir}")
                # a real signal's number (the command exits 128 + it); the testing aid's stop is none
                return {"stopped": True, "step": step, "run_dir": str(run_dir),
                        "signal": int(stop.signal) if stop.signal is not None and not asked_to_stop else None}
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if metrics_f:
            metrics_f.close()
        if writer:
            writer.close()
        if wandb_run is not None:
            wandb_run.finish()
        if has_router:
            backbone.collect_router_logits = False
    result = {"stopped": False, "step": step, "run_dir": str(run_dir)}
    if rank == 0 or fsdp:
        ppl = validation_perplexity(model, valid_tokens, cfg.context, cfg.eval_windows, cfg.precision == "bf16")
    if rank == 0:
        result["val_ppl"] = ppl
        result["unigram_ppl"] = unigram_perplexity(train_tokens, valid_tokens, tok.vocab_size)
        result["sample"] = None if fsdp else sample_text(model, tok, sample_prompt, 60)
    return result
