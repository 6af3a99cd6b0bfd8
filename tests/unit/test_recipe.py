"""The training recipe as the paper's training code runs it: its learning-rate schedule
(`Task.create_lr_scheduler` and `Task.set_lr`, framework/task/task.py: CosineAnnealingLR over the whole
run, read at iteration - warmup, times a linear warmup) and its weight decay on every parameter
(`SimpleTask.create_optimizer`: AdamW(model.parameters(), weight_decay=wd))."""
import math

import pytest
import torch

from moeut.train.trainer import TrainConfig, lr_lambda, optimizer_groups


def training_code_lr(base: float, steps: int, warmup: int, min_mult: float, iteration: int) -> float:
    """What set_lr leaves in the optimizer at `iteration`, written from its code."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=min_mult * base)
    with pytest.warns(UserWarning):   # its `step(epoch)` form, deprecated in PyTorch but what it calls
        sched.step(max(0, iteration - warmup))
    lr = opt.param_groups[0]["lr"]
    if warmup > iteration:
        lr = lr / warmup * (iteration + 1)   # set_linear_warmup
    return lr


@pytest.mark.parametrize("steps,warmup", [(1000, 0), (1000, 40), (250, 25)])
def test_the_schedule_is_the_training_codes(steps, warmup):
    cfg = TrainConfig(steps=steps, warmup=warmup, lr=2.5e-4, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    for i in sorted({0, 1, warmup - 1, warmup, warmup + 1, steps // 2, steps - 1} - {-1}):
        assert f(i) * cfg.lr == pytest.approx(training_code_lr(cfg.lr, steps, warmup, 0.1, i), rel=1e-9), i
    if warmup:
        assert f(steps - 1) > cfg.min_lr_ratio + 1e-4   # with warmup the cosine ends just above its floor


def test_weight_decay_reaches_every_parameter_unless_exempted():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = optimizer_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.01]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [g["weight_decay"] for g in optimizer_groups(model, 0.01, decay_vectors=False)] == [0.01, 0.0]
    assert math.isclose(TrainConfig().weight_decay, 0.01) and TrainConfig().decay_vectors is True
