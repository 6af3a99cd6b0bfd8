"""`moeut train`: the paper's training recipe (NOTES.md §4) on one CPU, one GPU or many (DDP).

AdamW (lr 2.5e-4, betas 0.9/0.999, weight decay 0.01), linear warmup then cosine decay to 10% of
the peak, gradient clipping, batch 64 x 1024, bf16 autocast on GPU, reg_loss added to the loss.
Everything a run needs to continue lives in its checkpoints; batches depend only on (seed, step).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt_lib
from .data import Batches, collect_documents, content_key, eval_windows, split_documents, tokenize_to_file
from .evaluate import windows_perplexity
from .runs import build_model, model_kwargs, write_json_atomic
from .train_step import GraphedTrainStep, collect_router_logits, step_body
from .tokenizer import Tokenizer, train_tokenizer


@dataclass
class TrainConfig:
    model: str = "moeut-tiny"            # moeut-<44M|126M|244M|318M|727M|1B|tiny> or dense-<...>
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
    clip: float = -1.0                   # gradient-norm clip (-1: 0.1 for 44M/tiny, 0.25 larger; 0 disables)
    precision: str = "auto"              # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    vocab_size: int = 8000               # SentencePiece pieces
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 0               # steps between validation runs (0: steps/10)
    eval_windows: int = 64               # validation windows per evaluation (0: all held-out text)
    ckpt_interval: int = 0               # steps between checkpoints (0: steps/10)
    keep_checkpoints: int = 3
    compile: bool = False                # torch.compile the model
    cuda_graph: bool = False             # replay each whole step (fwd, bwd, AdamW) from a CUDA graph: one GPU
    activation_checkpointing: bool = False
    deterministic: bool = False          # PyTorch deterministic algorithms (bitwise reproducible on GPU)
    cache_dir: str = ""                  # tokenized-data cache (default ~/.cache/moeut)
    tensorboard: bool = True
    progress: bool = True
    sample_prompt: str = "def "          # prompt of the greedy sample printed at the end
    stop_after: int = 0                  # testing aid: pretend a SIGTERM arrived after this many steps


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
    cfg.ckpt_interval = cfg.ckpt_interval or max(1, cfg.steps // 10)
    if cfg.precision == "auto":
        cfg.precision = "bf16" if on_gpu else "fp32"
    if cfg.precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    cfg.out = cfg.out or f"runs/{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.cache_dir = cfg.cache_dir or str(Path.home() / ".cache" / "moeut")
    return cfg


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


# ------------------------------------------------------------------------------------------------
# Distributed helpers: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK.
# ------------------------------------------------------------------------------------------------

def setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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


# ------------------------------------------------------------------------------------------------
# Data preparation (rank 0 builds, the others wait and load).
# ------------------------------------------------------------------------------------------------

def prepare_data(cfg: TrainConfig, run_dir: Path, rank: int, world: int, resume: bool = False):
    """The run's tokenizer and its tokenized training and validation data (rank 0 builds, the others
    wait). A resumed run reads the data it started on (recorded in data.json) while they are cached, so
    files changed under --data since then do not change it; otherwise it rebuilds from --data and says
    when that gives other data than the run started on."""
    tok_path = run_dir / "tokenizer.model"
    record = run_dir / "data.json"
    if rank == 0:
        started_on = Path(json.loads(record.read_text())["cache"]) if resume and record.exists() else None
        if started_on is None or not all((started_on / f).is_file() for f in ("train.bin", "valid.bin")):
            docs = collect_documents(cfg.data)
            train_docs, valid_docs = split_documents(docs)
            if not tok_path.exists():
                print(f"training a {cfg.vocab_size}-piece tokenizer on {len(train_docs)} documents", flush=True)
                train_tokenizer(train_docs, tok_path, cfg.vocab_size, seed=cfg.seed)
            tok = Tokenizer(tok_path)
            key = content_key(train_docs + ["\0valid\0"] + valid_docs, tok.model_bytes())
            cache = Path(cfg.cache_dir) / key
            if started_on is not None and started_on.name != key:
                print(f"warning: the data under --data are not those this run started on (its cache {started_on} "
                      "is gone): resuming on the new data", flush=True)
            tokenize_to_file(train_docs, tok, cache / "train.bin", cfg.progress)
            tokenize_to_file(valid_docs, tok, cache / "valid.bin", cfg.progress)
            write_json_atomic(record, {"cache": str(cache), "train_documents": len(train_docs),
                                 "valid_documents": len(valid_docs)})
    barrier(world)
    tok = Tokenizer(tok_path)
    cache = Path(json.loads(record.read_text())["cache"])
    train = np.memmap(cache / "train.bin", dtype=np.uint16, mode="r")
    valid = np.memmap(cache / "valid.bin", dtype=np.uint16, mode="r")
    return tok, train, valid


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
        chosen = lg.reshape(-1, E).topk(k, dim=-1).indices.flatten()
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


def _rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def config_of_run(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was started with (what `--resume` continues)."""
    meta_path = Path(run_dir) / "run.json"
    if not meta_path.is_file():
        raise ckpt_lib.CheckpointError(f"--resume {run_dir}: not a moeut run directory (no run.json)")
    saved = json.loads(meta_path.read_text())["config"]
    known = {f for f in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def train(cfg: TrainConfig, resume: bool = False) -> Dict[str, Any]:
    """Train (or, with resume=True, continue the run in cfg.out). Returns final metrics for rank 0."""
    rank, world, device = setup_distributed()
    resume_dir = Path(cfg.out) if resume else None
    cfg = resolve_defaults(cfg, device.type == "cuda")
    run_dir = Path(cfg.out)
    if resume_dir is None and ckpt_lib.latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it or pick another --out")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"--micro-batch-size {micro} must divide the per-process batch {per_rank}")
    accum = per_rank // micro
    reasons = {"a CUDA device": device.type != "cuda", "one process (not DDP)": world > 1,
               "no --compile": cfg.compile, "no --activation-checkpointing": cfg.activation_checkpointing}
    missing = [need for need, bad in reasons.items() if bad]
    if cfg.cuda_graph and missing:
        raise ValueError("--cuda-graph needs " + ", ".join(missing))
    if not cfg.cuda_graph and not missing:
        # Eager MoEUT steps wait on kernel launches; off by default because the graph keeps the step's
        # memory reserved between steps (validation and sampling then need room beside it).
        print("tip: --cuda-graph replays each training step from one CUDA graph: 1.5-2.2x the tokens/s "
              "of eager steps for MoEUT_126M-244M on an H200 (benchmarks/RESULTS.md C.3)", flush=True)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(world)

    tok, train_tokens, valid_tokens = prepare_data(cfg, run_dir, rank, world, resume=resume_dir is not None)
    kwargs = model_kwargs(cfg.model, cfg.overrides)
    if rank == 0:
        meta = {"model": cfg.model, "model_kwargs": kwargs, "vocab_size": tok.vocab_size,
                "config": {k: v for k, v in asdict(cfg).items()}}
        write_json_atomic(run_dir / "run.json", meta)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg.model, tok.vocab_size, kwargs).to(device)
    backbone = getattr(model, "transformer", model)
    backbone.activation_checkpointing = cfg.activation_checkpointing
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999),
                            fused=device.type == "cuda", capturable=cfg.cuda_graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start_step = 0
    if resume_dir is not None:
        path = ckpt_lib.latest_checkpoint(run_dir)
        if path is None:
            raise ckpt_lib.CheckpointError(f"--resume {run_dir}: no checkpoint to resume from")
        state = ckpt_lib.load_checkpoint(path)
        ckpt_lib.check_compatible(model, state["model"], str(path))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for g in opt.param_groups:   # a saved run may have used the other step mode
            g["capturable"] = cfg.cuda_graph
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        start_step = state["step"]
        if rank == 0:
            print(f"resumed {run_dir} from {path.name} at step {start_step}", flush=True)

    fwd = model
    if world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)
    amp = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    graphed = GraphedTrainStep(fwd, model, opt, amp, cfg.clip) if cfg.cuda_graph else None
    batches = Batches(train_tokens, cfg.context, cfg.batch_size, cfg.seed)
    has_router = hasattr(backbone, "collect_router_logits")  # MoEUT; the dense baseline has none
    k_ffn = getattr(getattr(backbone, "layers", [None])[0], "ffn", None)
    k_ffn = k_ffn.n_heads if k_ffn is not None else 0

    writer = None
    if rank == 0 and cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass
    metrics_f = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None

    def log(rec):
        if metrics_f is not None:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            if writer is not None:
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)):
                        writer.add_scalar(k, v, rec["step"])

    def save(step):
        if rank != 0:
            return
        rng = _rng_state()
        ckpt_lib.save_checkpoint(run_dir, step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                 "scheduler": sched.state_dict(), "rng": rng,
                                                 "data_position": step * cfg.batch_size, "config": asdict(cfg)},
                                 keep=cfg.keep_checkpoints)

    stop = _StopFlag()
    # Signal handlers can only be installed from the main thread (a notebook or test runner may not be).
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=start_step, disable=rank != 0 or not cfg.progress, dynamic_ncols=True,
               unit="step", file=sys.stdout)
    model.train()
    tokens_per_step = cfg.batch_size * cfg.context
    t_last, steps_since = time.time(), 0
    step = start_step
    try:
        while step < cfg.steps:
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
                loss_sum, reg_sum, gnorm, router_logits = step_body(fwd, model, opt, batch.to(device, non_blocking=True),
                                                                    amp, cfg.clip, world)
            sched.step()
            step += 1
            steps_since += 1
            if step % cfg.log_interval == 0 or step == cfg.steps:
                if world > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                dt = time.time() - t_last
                rec = {"step": step, "loss": round(loss_sum.item(), 6), "reg_loss": round(reg_sum.item(), 6),
                       "lr": sched.get_last_lr()[0], "grad_norm": round(float(gnorm), 5),
                       "tokens_per_s": round(tokens_per_step * steps_since / max(dt, 1e-9), 1)}
                if router_logits and k_ffn:
                    rec.update(router_stats(router_logits, k_ffn))
                log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                t_last, steps_since = time.time(), 0
            bar.update(1)
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                if rank == 0:
                    ppl = validation_perplexity(model, valid_tokens, cfg.context, cfg.eval_windows, amp == torch.bfloat16)
                    log({"step": step, "val_ppl": round(ppl, 4)})
                    bar.write(f"step {step}: validation perplexity {ppl:.2f}")
                barrier(world)
            if step % cfg.ckpt_interval == 0 or step == cfg.steps:
                save(step)
            if cfg.stop_after and step - start_step >= cfg.stop_after:
                stop.signal = signal.SIGTERM
            stopping = torch.tensor(int(stop.signal is not None), device=device)
            if world > 1:
                dist.all_reduce(stopping)
            if stopping.item():
                if step % cfg.ckpt_interval != 0 and step != cfg.steps:
                    save(step)
                if rank == 0:
                    bar.write(f"stopped by signal at step {step}; checkpoint written. Continue with: "
                              f"moeut train --resume {run_dir}")
                return {"stopped": True, "step": step, "run_dir": str(run_dir)}
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if metrics_f:
            metrics_f.close()
        if writer:
            writer.close()
        if has_router:
            backbone.collect_router_logits = False
    result = {"stopped": False, "step": step, "run_dir": str(run_dir)}
    if rank == 0:
        result["val_ppl"] = validation_perplexity(model, valid_tokens, cfg.context, cfg.eval_windows,
                                                    cfg.precision == "bf16")
        result["unigram_ppl"] = unigram_perplexity(train_tokens, valid_tokens, tok.vocab_size)
        from .generate import generate
        sample_ids = generate(model, [tok.encode(cfg.sample_prompt)], max_new_tokens=60, temperature=0.0,
                              eos_id=tok.eot_id)[0]
        result["sample"] = cfg.sample_prompt + tok.decode(sample_ids)
    return result
