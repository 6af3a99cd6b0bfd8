"""The training recipe as the paper's training code runs it: its learning-rate schedule
(`Task.create_lr_scheduler` and `Task.set_lr`, framework/task/task.py: CosineAnnealingLR over the whole
run, read at iteration - warmup, times a linear warmup) and its weight decay on every parameter
(`SimpleTask.create_optimizer`: AdamW(model.parameters(), weight_decay=wd))."""

import math

import pytest
import torch

from moeut.train.config import TrainConfig, lr_lambda
from moeut.train.loop import optimizer_groups


def training_code_lr(base: float, steps: int, warmup: int, min_mult: float, iteration: int) -> float:
    """What set_lr leaves in the optimizer at `iteration`, written from its code."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=min_mult * base)
    with pytest.warns(UserWarning):  # its `step(epoch)` form, deprecated in PyTorch but what it calls
        sched.step(max(0, iteration - warmup))
    lr = opt.param_groups[0]["lr"]
    if warmup > iteration:
        lr = lr / warmup * (iteration + 1)  # set_linear_warmup
    return lr


@pytest.mark.parametrize("steps,warmup", [(1000, 0), (1000, 40), (250, 25)])
def test_the_schedule_is_the_training_codes(steps, warmup):
    cfg = TrainConfig(steps=steps, warmup=warmup, lr=2.5e-4, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    for i in sorted({0, 1, warmup - 1, warmup, warmup + 1, steps // 2, steps - 1} - {-1}):
        assert f(i) * cfg.lr == pytest.approx(training_code_lr(cfg.lr, steps, warmup, 0.1, i), rel=1e-9), i
    if warmup:
        assert f(steps - 1) > cfg.min_lr_ratio + 1e-4  # with warmup the cosine ends just above its floor


def test_weight_decay_reaches_every_parameter_unless_exempted():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = optimizer_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.01]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [g["weight_decay"] for g in optimizer_groups(model, 0.01, decay_vectors=False)] == [0.01, 0.0]
    assert math.isclose(TrainConfig().weight_decay, 0.01) and TrainConfig().decay_vectors is True


@pytest.mark.parametrize("on_gpu", [True, False])
def test_the_help_states_the_defaults_the_trainer_resolves(on_gpu, capsys):
    """Each default `moeut train --help` states is the value `resolve_defaults` gives a run that leaves
    the flag alone, on either device and for either recipe size (both are read from one table)."""
    import re
    from moeut.cli import main
    from moeut.train.config import default_text, resolve_defaults

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    small, large = (resolve_defaults(TrainConfig(model=m, out="x"), on_gpu) for m in ("moeut-44M", "moeut-244M"))
    for name in ("steps", "batch_size", "context", "lr", "eval_windows"):
        gpu, cpu = re.fullmatch(r"GPU (\S+), CPU (\S+)", default_text(name)).groups()
        assert float(gpu if on_gpu else cpu) == getattr(large, name) == getattr(small, name), name
        assert default_text(name) in helped, name
    for name, cap in (("warmup", large.steps // 10), ("clip", None)):
        first, second = map(
            float, re.fullmatch(r"(\S+) for \S+, else (\S+)(?: capped at steps/10)?", default_text(name)).groups()
        )
        assert getattr(small, name) == first, name
        assert getattr(large, name) == (min(second, cap) if cap is not None else second), name
        assert default_text(name) in helped, name
    for name in ("weight_decay", "vocab_size", "log_interval", "keep_checkpoints", "valid_fraction", "seed"):
        assert float(default_text(name).removeprefix("default ")) == getattr(small, name), name
        assert f"({default_text(name)})" in helped, name
    assert re.search(r"AdamW 2\.5e-4, weight decay 0\.01, cosine to 10%", helped)
