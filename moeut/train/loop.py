"""One process's part of a run, once the run directory is locked: set up, resume, loop, save.

`run_training` reads as the run goes. `set_up` builds the model and the optimizer; a resume reads
the checkpoint's weights into the whole model before FSDP shards it (`load_weights`; an FSDP run
resuming from a sharded checkpoint reads only its own rows afterwards) and its optimizer, schedule
and RNG state once the optimizer exists (`restore_training_state`). `train_steps` is the loop: one
step, one host sync for the stop and divergence flags every rank must agree on, then the log,
evaluation and checkpoint that fall on that step. `save_state` checks the updated state finite on
every rank before anything is written, so a poisoned optimizer never rotates a good checkpoint out.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from moeut.models import build_model, peak_bf16_flops, training_flops_per_token
from moeut.train import checkpoint as ckpt_lib
from moeut.train.checkpoint import (
    ModelSpec,
    optimizer_state_by_name,
    optimizer_state_by_position,
    sharded_optimizer_record,
)
from moeut.train.config import TrainConfig, lr_lambda
from moeut.train.data import Batches
from moeut.train.distributed import barrier
from moeut.train.fsdp import load_optimizer_state, load_sharded_state, save_sharded_state, shard_model
from moeut.train.monitor import (
    Reporter,
    StepClock,
    expert_statistics,
    progress_line,
    router_stats,
    sample_text,
    unigram_perplexity,
    validation_perplexity,
)
from moeut.train.step import FlatGradientStep, GraphedTrainStep, collect_router_logits, set_optimizer_mode, step_body


class _StopFlag:
    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signum


def _rng_state() -> Dict[str, Any]:
    """The RNG states as tensors and plain data (no NumPy objects: checkpoints hold no pickles)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (str(name), keys.astype(np.int64).tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


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
    return [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in vectors], "weight_decay": weight_decay if decay_vectors else 0.0},
    ]


def optimizer_parameter_names(model: torch.nn.Module) -> List[str]:
    """The parameters' names in the optimizer's order (the positions of a one-process AdamW state)."""
    decay, no_decay = _split_for_weight_decay(model)
    return [n for n, _ in decay + no_decay]


def step_graph_blockers(cfg: TrainConfig, device) -> List[str]:
    """Why the step cannot be replayed from CUDA graphs (empty: it can)."""
    reasons = {
        "a CUDA device (this is CPU)": device.type != "cuda",
        "no --compile (torch.compile makes its own graphs)": cfg.compile,
        "no --activation-checkpointing (its recomputation runs outside the captured forward)": cfg.activation_checkpointing,
        "no --parallel fsdp (its gathers and reduce-scatters run eagerly)": cfg.parallel == "fsdp",
    }
    return [need for need, blocked in reasons.items() if blocked]


@dataclass
class Trainee:
    """The model of one process and everything that updates it."""

    model: torch.nn.Module
    backbone: torch.nn.Module  # the transformer (MoEUTLM.transformer), or the model itself
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    amp: torch.dtype  # the autocast dtype (float32: none)
    fsdp: bool
    graphed_steps: bool  # each step replayed from CUDA graphs
    start_step: int = 0
    clock: Optional[Dict[str, Any]] = None  # the resumed run's StepClock state
    resumed_from: Optional[Path] = None  # the checkpoint it resumed from


def load_weights(model: torch.nn.Module, resume_from, source, fsdp: bool, say):
    """The weights a run starts from, into the whole (not yet sharded) model: the checkpoint's on a
    resume (`resume_from`: the `Checkpoint` rank 0 read, its path on the other ranks), the source's
    with --init-from. Returns the checkpoint (its training record kept) or None, and whether the
    model's rows are still to be read from its shards after sharding."""
    if resume_from is not None:
        spec = ModelSpec.of(model, optimizer_parameter_names(model))
        if not isinstance(resume_from, ckpt_lib.Checkpoint):  # ranks other than 0 read it themselves
            resume_from = ckpt_lib.read_checkpoint(resume_from, "training" if fsdp else "all", spec)
        if resume_from.model is None and resume_from.layout == ckpt_lib.SINGLE:
            resume_from.model = ckpt_lib.read_checkpoint(resume_from.path, "model", spec).model
    if source is not None:  # --init-from: the source's weights, read and checked now
        model.load_state_dict(source.weights(ModelSpec.of(model)))
        say(
            f"initialised from {source.path} ({source.kind}{f', step {source.step}' if source.step is not None else ''})"
        )
    read_own_shards = resume_from is not None and resume_from.model is None
    if resume_from is not None and not read_own_shards:
        try:
            model.load_state_dict(resume_from.model)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {resume_from.path} does not fit this run: {str(e)[:300]}"
            ) from None
        resume_from.model = None
    return resume_from, read_own_shards


def restore_training_state(t: Trainee, resume_from, read_own_shards: bool, rank: int, fused_adamw: bool) -> None:
    """The optimizer, schedule, RNG and clock of the checkpoint, into a set-up trainee."""
    training = resume_from.training
    saved, by_name = training["optimizer"], training.get("optimizer_keys") == "names"
    names = optimizer_parameter_names(t.model)
    try:
        if read_own_shards:
            load_sharded_state(t.model, t.opt, resume_from.path, saved)
        elif t.fsdp:
            load_optimizer_state(t.model, t.opt, saved if by_name else optimizer_state_by_name(saved, names))
        else:
            t.opt.load_state_dict(optimizer_state_by_position(saved, names) if by_name else saved)
        t.sched.load_state_dict(training["scheduler"])
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
        raise ckpt_lib.CheckpointError(f"checkpoint {resume_from.path} does not fit this run: {str(e)[:300]}") from None
    set_optimizer_mode(t.opt, fused=fused_adamw, capturable=t.graphed_steps)  # not the saving run's
    rng = training["rng"]
    _set_rng_state(rng[rank % len(rng)] if isinstance(rng, list) else rng, str(resume_from.path))
    t.start_step = int(training["step"])
    t.clock = training.get("clock")
    t.resumed_from = Path(resume_from.path)


def set_up(
    cfg: TrainConfig, vocab: int, kwargs: Dict[str, Any], rank: int, device, resume_from, source, say
) -> Trainee:
    """The model (seeded), its weights, FSDP sharding, AdamW and the schedule; on a resume, their state."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg.model, vocab, kwargs).to(device)
    backbone = getattr(model, "transformer", model)
    backbone.activation_checkpointing = cfg.activation_checkpointing
    fsdp, amp = cfg.parallel == "fsdp", amp_dtype(cfg)
    resume_from, read_own_shards = load_weights(model, resume_from, source, fsdp, say)
    if fsdp:
        shard_model(model, amp, reshard_after_forward=not cfg.fsdp_keep_gathered)
    graphed_steps = cfg.cuda_graph != "off" and not step_graph_blockers(cfg, device)
    fused_adamw = device.type == "cuda" and not fsdp
    opt = torch.optim.AdamW(
        optimizer_groups(model, cfg.weight_decay, cfg.decay_vectors),
        lr=cfg.lr,
        betas=(0.9, 0.999),
        fused=fused_adamw,
        capturable=graphed_steps,
    )
    t = Trainee(
        model,
        backbone,
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        amp,
        fsdp,
        graphed_steps,
    )
    if resume_from is not None:
        restore_training_state(t, resume_from, read_own_shards, rank, fused_adamw)
    return t


def amp_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def save_state(
    cfg: TrainConfig,
    t: Trainee,
    run_dir: Path,
    step: int,
    loss: torch.Tensor,
    clock: StepClock,
    rank: int,
    world: int,
    device,
) -> None:
    """The state after step `step`'s update, checked finite on every rank before anything is written
    (a poisoned optimizer state makes NaN weights from a finite loss), then saved."""
    if not state_is_finite(t.model, t.opt, world):
        raise Diverged(
            f"the weights or the optimizer state became non-finite at step {step} (the loss before "
            f"that update was {float(loss.item()):.4g}); training stopped and nothing was saved. "
            + last_good_checkpoint(run_dir)
            + " Try a lower --lr or a stronger --clip in a new run."
        )

    def training_state(opt_state, keys):
        return {
            "optimizer": opt_state,
            "optimizer_keys": keys,
            "scheduler": t.sched.state_dict(),
            "rng": _rng_state(),
            "data_position": step * cfg.batch_size,
            "config": asdict(cfg),
            "clock": clock.state(),
        }

    if t.fsdp:
        ckpt_lib.save_sharded_checkpoint(
            run_dir,
            step,
            lambda shard_dir: save_sharded_state(t.model, t.opt, shard_dir),
            lambda opt_state: training_state(sharded_optimizer_record(opt_state), "names"),
            keep=cfg.keep_checkpoints,
            loss=float(loss.item()),
            rank=rank,
            world=world,
            device=device,
        )
    elif rank == 0:
        ckpt_lib.save_checkpoint(
            run_dir,
            step,
            t.model.state_dict(),
            training_state(t.opt.state_dict(), "positions"),
            keep=cfg.keep_checkpoints,
            loss=float(loss.item()),
        )


def evaluate_and_report(
    cfg: TrainConfig,
    t: Trainee,
    step: int,
    valid_tokens,
    tok,
    sample_prompt: str,
    reporter: Reporter,
    clock: StepClock,
    tokens_per_step: int,
    bar,
    rank: int,
) -> None:
    """Validation perplexity (every rank of a sharded model runs it; rank 0 reports), then on rank 0 of
    an unsharded model the expert statistics and, with --sample-tokens, a sample."""
    if rank == 0 or t.fsdp:
        ppl = validation_perplexity(t.model, valid_tokens, cfg.context, cfg.eval_windows, t.amp == torch.bfloat16)
    if rank != 0:
        return
    reporter.log({"step": step, "val_ppl": round(ppl, 4), **clock.record(step * tokens_per_step)})
    bar.write(f"step {step}: validation perplexity {ppl:.2f}")
    if t.fsdp:  # statistics and samples need the whole model in one process
        return
    stats = expert_statistics(t.model, valid_tokens, cfg.context, t.amp)
    image = stats.pop("ffn_usage_image", None)
    reporter.log({"step": step, **{k: round(v, 5) for k, v in stats.items()}})
    if image is not None:
        reporter.image("ffn_expert_usage", image, step)
    if cfg.sample_tokens:
        text = sample_text(t.model, tok, sample_prompt, cfg.sample_tokens)
        reporter.log({"step": step, "sample": text})
        bar.write(f"step {step} sample: {text!r}")
        reporter.text("sample", text, step)


def train_steps(
    cfg: TrainConfig,
    t: Trainee,
    run_dir: Path,
    train_tokens,
    valid_tokens,
    tok,
    vocab_kwargs,
    rank: int,
    world: int,
    device,
    accum: int,
    launched: float,
    say,
) -> Dict[str, Any]:
    """The loop from `t.start_step` to cfg.steps (or a stop). Returns how it ended."""
    model, backbone, sched = t.model, t.backbone, t.sched
    fwd = torch.compile(model) if cfg.compile else model
    # Several processes average one flat gradient buffer with one all-reduce per step (train_step).
    graphed = (
        GraphedTrainStep(fwd, model, t.opt, t.amp, cfg.clip, flat_gradients=world > 1) if t.graphed_steps else None
    )
    flat_step = (
        FlatGradientStep(fwd, model, t.opt, t.amp, cfg.clip) if world > 1 and graphed is None and not t.fsdp else None
    )
    batches = Batches(train_tokens, cfg.context, cfg.batch_size, cfg.seed)
    has_router = hasattr(backbone, "collect_router_logits")  # MoEUT; the dense baseline has none
    k_ffn = getattr(getattr(getattr(backbone, "layers", [None])[0], "ffn", None), "n_heads", 0) if has_router else 0
    flops_per_token = training_flops_per_token(cfg.model, tok.vocab_size, vocab_kwargs, cfg.context)
    peak = peak_bf16_flops(device) if cfg.precision == "bf16" else None
    print_every = cfg.print_interval or 10 * cfg.log_interval
    sample_prompt = cfg.sample_prompt or tok.decode([int(x) for x in valid_tokens[:8]])
    tokens_per_step = cfg.batch_size * cfg.context
    reporter = Reporter(cfg, run_dir, rank, say)
    stop = _StopFlag()
    # Signal handlers can only be installed from the main thread (a notebook or test runner may not be).
    old_handlers = (
        {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=t.start_step,
        disable=rank != 0 or not cfg.progress,
        dynamic_ncols=True,
        unit="step",
        file=sys.stdout,
    )
    model.train()
    clock = StepClock(t.clock, launched, startup_steps=GraphedTrainStep.WARMUP + 1 if graphed is not None else 1)
    steps_since = 0
    step = t.start_step
    try:
        while step < cfg.steps:
            clock.start()
            batch = batches.batch(step, rank, world, accum)
            log_step = (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.steps
            router_logits = None
            if graphed is not None:
                loss_sum, reg_sum, gnorm = graphed(batch)
                if log_step and has_router and k_ffn:
                    router_logits = collect_router_logits(model, backbone, batch[-1].to(device), t.amp)
            else:
                if has_router:
                    backbone.collect_router_logits = log_step
                batch = batch.to(device, non_blocking=True)
                if flat_step is not None:
                    loss_sum, reg_sum, gnorm, router_logits = flat_step(batch)
                else:
                    loss_sum, reg_sum, gnorm, router_logits = step_body(
                        fwd, model, t.opt, batch, t.amp, cfg.clip, world
                    )
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
                    + last_good_checkpoint(run_dir)
                    + " Try a lower --lr or a stronger --clip in a new run."
                )
            if step % cfg.log_interval == 0 or step == cfg.steps:
                if world > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                tokens_per_s = tokens_per_step * steps_since / max(clock.interval(), 1e-9)
                rec = {
                    "step": step,
                    "loss": round(loss_sum.item(), 6),
                    "reg_loss": round(reg_sum.item(), 6),
                    "lr": sched.get_last_lr()[0],
                    "grad_norm": round(float(gnorm), 5),
                    "tokens_per_s": round(tokens_per_s, 1),
                    **clock.record(step * tokens_per_step),
                }
                if peak:
                    rec["mfu"] = round(flops_per_token * tokens_per_s * world / peak, 4)
                if router_logits and k_ffn:
                    rec.update(router_stats(router_logits, k_ffn))
                reporter.log(rec)
                bar.set_postfix(
                    loss=f"{rec['loss']:.3f}",
                    tok_s=f"{rec['tokens_per_s']:.0f}",
                    **({"mfu": f"{100 * rec['mfu']:.1f}%"} if "mfu" in rec else {}),
                )
                if rank == 0 and (step % print_every < cfg.log_interval or step == cfg.steps):
                    bar.write(progress_line(rec, cfg.steps, (step - t.start_step) / max(clock.wall_here(), 1e-9)))
                steps_since = 0
            bar.update(1)
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                eval_started = time.perf_counter()
                evaluate_and_report(
                    cfg, t, step, valid_tokens, tok, sample_prompt, reporter, clock, tokens_per_step, bar, rank
                )
                barrier(world)
                clock.evaluating += time.perf_counter() - eval_started
            if step % cfg.ckpt_interval == 0 or step == cfg.steps:
                save_state(cfg, t, run_dir, step, loss_sum, clock, rank, world, device)
            asked_to_stop = bool(cfg.stop_after) and step - t.start_step >= cfg.stop_after
            if stopping or asked_to_stop:
                if step % cfg.ckpt_interval != 0 and step != cfg.steps:
                    save_state(cfg, t, run_dir, step, loss_sum, clock, rank, world, device)
                if rank == 0:
                    bar.write(
                        f"stopped by signal at step {step}; checkpoint written. Continue with: "
                        f"moeut train --resume {run_dir}"
                    )
                # a real signal's number (the command exits 128 + it); the testing aid's stop is none
                return {
                    "stopped": True,
                    "step": step,
                    "run_dir": str(run_dir),
                    "signal": int(stop.signal) if stop.signal is not None and not asked_to_stop else None,
                }
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        reporter.close()
        if has_router:
            backbone.collect_router_logits = False
    result = {"stopped": False, "step": step, "run_dir": str(run_dir)}
    if rank == 0 or t.fsdp:
        ppl = validation_perplexity(model, valid_tokens, cfg.context, cfg.eval_windows, t.amp == torch.bfloat16)
    if rank == 0:
        result["val_ppl"] = ppl
        result["unigram_ppl"] = unigram_perplexity(train_tokens, valid_tokens, tok.vocab_size)
        result["sample"] = None if t.fsdp else sample_text(model, tok, sample_prompt, 60)
    return result
