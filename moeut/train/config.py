"""The settings of `moeut train`: `TrainConfig`, and every default stated once, here.

Most settings have one default, the dataclass field's. Five depend on the device (`ON_DEVICE`: the
paper's batch 64 x 1024 and lr 2.5e-4 on a GPU, a run that ends in minutes on a CPU) and two on the
model's size (`warmup`, `clip`: the training code's 44M recipe has no warmup and clips at 0.1). A
field holding 0 or -1 means "the default": `resolve_defaults` fills it once the device is known, and
`default_text` states the same defaults in `moeut train --help`, so the two cannot drift apart.
`validate_config` then checks every resolved setting (a run.json may come from anyone) and names the
flag of the first one out of range.
"""

from __future__ import annotations

import math
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List

MAX_VOCAB = 65535  # token ids are cached as uint16
MAX_LR = 10.0  # AdamW's step is about lr per weight: far above any useful value, far below float overflow

# (on a GPU, on a CPU) for the settings whose field holds 0 (or -1 for eval_windows).
ON_DEVICE: Dict[str, tuple] = {
    "steps": (100_000, 400),
    "batch_size": (64, 16),
    "context": (1024, 256),
    "lr": (2.5e-4, 1e-3),
    "eval_windows": (64, 32),  # measured on CPU: 32 windows every steps/10 cost 3.1% of a default run (64: 5.6%)
}
SMALL_MODELS = ("-44M", "-tiny")  # the suffixes of the models trained with the small recipe
WARMUP = (0, 4000)  # small models, larger ones (capped at a tenth of the run)
CLIP = (0.1, 0.25)  # small models, larger ones


# The fields and their comments are a table, kept aligned.
# fmt: off
@dataclass
class TrainConfig:
    model: str = "moeut-tiny"            # moeut-<44M|126M|244M|318M|727M|1B|tiny> or dense-<...>
    init_from: str = ""                  # start from these weights: a run, one of its checkpoints, or an export
    overrides: Dict[str, Any] = field(default_factory=dict)  # constructor arguments replacing the profile's
    data: List[str] = field(default_factory=list)  # text files / dirs / JSONL; empty: Python stdlib sources
    out: str = ""                        # run directory (default runs/<model>-<time>)
    steps: int = 0                       # optimizer steps = length of the cosine schedule (0: ON_DEVICE)
    batch_size: int = 0                  # global sequences per optimizer step (0: ON_DEVICE)
    micro_batch_size: int = 0            # sequences per forward on each process (0: all); accumulation fills the rest
    context: int = 0                     # tokens per sequence (0: ON_DEVICE)
    lr: float = 0.0                      # peak learning rate (0: ON_DEVICE)
    min_lr_ratio: float = 0.1            # cosine decays to lr * this
    warmup: int = -1                     # warmup steps (-1: WARMUP by size, capped at steps/10)
    weight_decay: float = 0.01
    decay_vectors: bool = True           # weight decay on norms and biases too, as the training code's
                                         # AdamW(model.parameters()) has it; false exempts them
    clip: float = -1.0                   # gradient-norm clip (-1: CLIP by size; 0 disables)
    precision: str = "auto"              # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    vocab_size: int = 8000               # SentencePiece pieces
    tokenizer: str = ""                  # "" or "code": train the lossless one; "paper": the training
                                         # code's; else a SentencePiece model file to use as it is
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 0               # steps between validation runs (0: steps/10)
    eval_windows: int = -1               # validation windows per evaluation (-1: ON_DEVICE; 0: all)
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
# fmt: on


def default_cache_dir() -> str:
    return str(Path.home() / ".cache" / "moeut")


def is_small_model(model: str) -> bool:
    return model.endswith(SMALL_MODELS)


def resolve_defaults(cfg: TrainConfig, on_gpu: bool) -> TrainConfig:
    """Fill every setting left at "the default" (0, -1, "auto", "") for this device and model."""
    for name, (gpu, cpu) in ON_DEVICE.items():
        if getattr(cfg, name) == fields_default(name):
            setattr(cfg, name, gpu if on_gpu else cpu)
    small = is_small_model(cfg.model)
    if cfg.warmup < 0:
        cfg.warmup = WARMUP[0] if small else min(WARMUP[1], cfg.steps // 10)
    if cfg.clip < 0:
        cfg.clip = CLIP[0] if small else CLIP[1]
    cfg.eval_interval = cfg.eval_interval or max(1, cfg.steps // 10)
    cfg.ckpt_interval = cfg.ckpt_interval or max(1, cfg.steps // 10)
    if cfg.precision == "auto":
        cfg.precision = "bf16" if on_gpu else "fp32"
    cfg.out = cfg.out or f"runs/{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.cache_dir = cfg.cache_dir or default_cache_dir()
    return cfg


def fields_default(name: str) -> Any:
    """The dataclass default of one setting."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _number(v: Any) -> str:
    """2.5e-4 rather than 0.00025: as the paper and the flags write learning rates."""
    if isinstance(v, float) and v and abs(v) < 0.01:
        mantissa, exponent = f"{v:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def recipe_text() -> str:
    """The recipe `moeut train --help` opens with, from the defaults."""
    gpu = {k: v[0] for k, v in ON_DEVICE.items()}
    cpu = {k: v[1] for k, v in ON_DEVICE.items()}
    return (
        f"Train a language model with the paper's recipe: AdamW {_number(gpu['lr'])}, weight decay "
        f"{fields_default('weight_decay'):g}, cosine to {fields_default('min_lr_ratio'):.0%}, warmup, clipping, "
        f"batch {gpu['batch_size']} x {gpu['context']}, bf16 on GPU. On a CPU the defaults shrink (batch "
        f"{cpu['batch_size']} x {cpu['context']}, {cpu['steps']} steps, lr {_number(cpu['lr'])})."
    )


def _small_names() -> str:
    return "/".join(suffix.lstrip("-") for suffix in SMALL_MODELS)


def default_text(name: str) -> str:
    """A setting's default as `moeut train --help` states it, from the values `resolve_defaults` uses."""
    if name in ON_DEVICE:
        gpu, cpu = ON_DEVICE[name]
        return f"GPU {_number(gpu)}, CPU {_number(cpu)}"
    if name == "warmup":
        return f"{WARMUP[0]} for {_small_names()}, else {WARMUP[1]} capped at steps/10"
    if name == "clip":
        return f"{CLIP[0]:g} for {_small_names()}, else {CLIP[1]:g}"
    if name in ("eval_interval", "ckpt_interval"):
        return "default steps/10"
    if name == "cache_dir":
        return "default ~/.cache/moeut"
    return f"default {_number(fields_default(name))}"


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
    "eval_windows": (int, lambda v: v >= 0, "a non-negative integer (0: all)"),  # (-1 resolved before)
    "ckpt_interval": (int, lambda v: v >= 1, "a positive integer"),
    "keep_checkpoints": (int, lambda v: v >= 1, "a positive integer"),
    "valid_fraction": (float, lambda v: 0 <= v <= 0.5, "a number from 0 to 0.5"),
    "stop_after": (int, lambda v: v >= 0, "a non-negative integer"),
}


def check_types(cfg: TrainConfig) -> None:
    """Each setting of the type of its default (a run.json is read as untrusted data)."""
    for f in fields(TrainConfig):
        v = getattr(cfg, f.name)
        want = type(fields_default(f.name))
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
        raise ValueError(
            "--sample-tokens needs the whole model in one process: not with --parallel fsdp "
            "(sample the run with moeut generate)"
        )
    if cfg.fsdp_keep_gathered is True and cfg.parallel != "fsdp":
        raise ValueError("--fsdp-keep-gathered applies to --parallel fsdp only")
    for name in (
        "compile",
        "activation_checkpointing",
        "deterministic",
        "strict_data",
        "tensorboard",
        "progress",
        "fsdp_keep_gathered",
        "wandb",
        "decay_vectors",
    ):
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
