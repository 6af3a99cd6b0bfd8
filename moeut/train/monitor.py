"""What a run measures and reports about itself: validation perplexity, expert statistics and samples
at evaluations, router statistics at log steps, the step clock behind time-to-quality, and the sinks
every record goes to (`Reporter`: metrics.jsonl always, TensorBoard and Weights & Biases when asked).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from moeut.evaluate import eval_windows, windows_perplexity
from moeut.files import open_append
from moeut.router import chosen_experts
from moeut.train.config import TrainConfig


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
        ids = generate(
            model,
            [tok.encode(prompt)],
            max_new_tokens=n_tokens,
            temperature=0.0,
            eos_id=tok.eot_id,
            cuda_graph=False,
            reuse_graph=False,
        )[0]
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


def startup_summary(cfg: TrainConfig, model: torch.nn.Module, n_train: int, n_valid: int, device, world: int) -> str:
    """What the run will do, in a few lines: the model, the data, the token budget and how many passes
    over the training split it makes, where and in what precision, and the schedule."""
    params = sum(p.numel() for p in model.parameters())
    windows = max(n_train // (cfg.context + 1), 1)  # `Batches` draws non-overlapping windows
    tokens = cfg.steps * cfg.batch_size * cfg.context
    epochs = cfg.steps * cfg.batch_size / windows
    warm = f"warmup {cfg.warmup} steps, " if cfg.warmup else ""
    return (
        f"model: {cfg.model}, {params / 1e6:.1f}M parameters\n"
        f"data: {n_train:,} training tokens, {n_valid:,} validation tokens\n"
        f"budget: {cfg.steps:,} steps x {cfg.batch_size} x {cfg.context} = {tokens:,} tokens "
        f"({epochs:.2f} epochs of the training split)\n"
        f"device: {device}{f' x {world} processes' if world > 1 else ''}, precision {cfg.precision}; "
        f"AdamW lr {cfg.lr:g}, {warm}cosine to {cfg.min_lr_ratio:g} x lr, clip {cfg.clip:g}"
    )


def progress_line(rec: Dict[str, Any], steps: int, steps_per_second: float) -> str:
    """One plain line for logs (a cluster's, or --no-progress): step, loss, throughput, MFU, ETA."""
    left = (steps - rec["step"]) / max(steps_per_second, 1e-9)
    eta = (
        f"{int(left // 3600)}h{int(left % 3600 // 60):02d}m"
        if left >= 3600
        else f"{int(left // 60)}m{int(left % 60):02d}s"
    )
    mfu = f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""
    return (
        f"step {rec['step']}/{steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.3g} | "
        f"{rec['tokens_per_s'] / 1e3:.1f}k tok/s{mfu} | ETA {eta}"
    )


def import_wandb():
    """The wandb module, or a ValueError naming --wandb (the trainer asks before anything is written)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install wandb (or leave --wandb out)") from None
    return wandb


def start_wandb(cfg: TrainConfig, run_dir: Path, say):
    """A Weights & Biases run for --wandb (its files under the run directory; WANDB_MODE=offline logs
    without network, `wandb sync` uploads later)."""
    run = import_wandb().init(
        project=cfg.wandb_project,
        name=Path(cfg.out).name,
        dir=str(run_dir),
        config=asdict(cfg),
        resume="allow",
        id=_wandb_id(run_dir),
    )
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
        get = lambda k: float(saved[k]) if isinstance(saved.get(k), (int, float)) and saved[k] >= 0 else 0.0
        self.train, self.startup, self.wall_before = get("train_seconds"), get("startup_seconds"), get("wall_seconds")
        self.launched, self.startup_steps = launched, startup_steps
        self.steps, self.pending, self.since_record, self.t0 = 0, 0.0, 0.0, 0.0
        self.evaluating = get("eval_seconds")  # validation, expert statistics and samples

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        dt = time.perf_counter() - self.t0
        self.steps += 1
        if self.steps <= self.startup_steps:
            self.pending += dt
            return
        if self.steps == self.startup_steps + 1:  # the start-up steps, charged at this steady step's time
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
        return {
            "tokens": tokens,
            "train_seconds": round(self.train, 3),
            "wall_seconds": round(self.wall(), 3),
            "startup_seconds": round(self.startup, 3),
            "eval_seconds": round(self.evaluating, 3),
        }

    def state(self) -> Dict[str, float]:
        return {
            "train_seconds": self.train,
            "wall_seconds": self.wall(),
            "startup_seconds": self.startup,
            "eval_seconds": self.evaluating,
        }


class Reporter:
    """Where the records of rank 0 go: one JSON line each in metrics.jsonl (always), their numbers to
    TensorBoard and Weights & Biases when the run asks. Other ranks hold a reporter that drops them."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, rank: int, say):
        self.metrics = self.writer = self.wandb_run = None
        if rank != 0:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # an optional dependency: say so once, the run goes on
                say("TensorBoard is not installed (pip install tensorboard): metrics go to metrics.jsonl only")
        self.metrics = open_append(run_dir / "metrics.jsonl", say)
        self.wandb_run = start_wandb(cfg, run_dir, say) if cfg.wandb else None

    def log(self, rec: Dict[str, Any]) -> None:
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        scalars = {
            k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, rec["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=rec["step"])

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(name, image[None].astype("float32"), step)

    def text(self, name: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(name, text, step)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
