"""One optimizer step of `moeut train`: forward and backward over the micro-batches, gradient clipping,
AdamW, run eagerly or replayed from one CUDA graph (`--cuda-graph`).

A MoEUT step launches thousands of small kernels (routing, casts, the shared layers' 9 applications);
on a host that needs ~40 µs per launch the GPU waits for the CPU. Captured once, the whole step
(optimizer included) is one graph launch. What capture needs, and where it is handled here:
  - fixed input memory: each step's tokens are copied into one static buffer;
  - a learning rate the graph reads from memory: AdamW (fused, capturable) gets a tensor lr, which
    is refreshed from the scheduler's float before every replay;
  - no host syncs and no lazy state inside the graph: two eager warm-up steps (real training steps)
    on a side stream create the optimizer state and tune the Triton kernels first;
  - autocast's weight-cast cache off (its entries would not outlive the capture);
  - router statistics, which need the logits on the host, come from a separate no-grad forward.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def step_body(fwd, model, opt, batch_AMT: Tensor, amp: torch.dtype, clip: float, world: int,
              cast_cache: bool = True) -> Tuple[Tensor, Tensor, Tensor, Optional[List[Tensor]]]:
    """Train on batch [accum, micro, T+1] (inputs are [:, :-1], targets [:, 1:]); returns device
    tensors (mean loss, mean reg loss, gradient norm before clipping) and any collected router logits."""
    accum = batch_AMT.shape[0]
    device = batch_AMT.device
    loss_sum = torch.zeros((), device=device)
    reg_sum = torch.zeros((), device=device)
    router_logits = None
    for m in range(accum):
        x = batch_AMT[m]
        sync_ctx = fwd.no_sync() if (world > 1 and m < accum - 1 and hasattr(fwd, "no_sync")) else nullcontext()
        with sync_ctx:
            with torch.autocast(device.type, amp, enabled=amp != torch.float32, cache_enabled=cast_cache):
                out = fwd(x[:, :-1])
                loss = F.cross_entropy(out.outputs.float().reshape(-1, out.outputs.shape[-1]), x[:, 1:].reshape(-1))
            ((loss + out.reg_loss) / accum).backward()
        loss_sum += loss.detach() / accum
        reg_sum += out.reg_loss.detach() / accum
        router_logits = out.router_logits if getattr(out, "router_logits", None) else router_logits
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, reg_sum, gnorm, router_logits


class GraphedTrainStep:
    """`step_body` captured in a CUDA graph after `warmup` eager steps; call it like `step_body`
    with a host batch. Single process, no torch.compile (the trainer checks)."""

    def __init__(self, fwd, model, opt, amp: torch.dtype, clip: float, warmup: int = 2):
        self.fwd, self.model, self.opt, self.amp, self.clip = fwd, model, opt, amp, clip
        self.warmup = warmup
        self.steps_run = 0
        self.graph = None
        self.static_batch = None
        self.outputs = None
        device = next(model.parameters()).device
        self.lr = [torch.tensor(float(g["lr"]), device=device) for g in opt.param_groups]
        for g in opt.param_groups:   # also after loading an optimizer state saved by an eager run
            g["capturable"] = True

    def _body(self):
        return step_body(self.fwd, self.model, self.opt, self.static_batch, self.amp, self.clip, 1, cast_cache=False)

    def _with_tensor_lr(self, fn):
        floats = [g["lr"] for g in self.opt.param_groups]
        for g, t in zip(self.opt.param_groups, self.lr):
            g["lr"] = t
        try:
            return fn()
        finally:   # the scheduler keeps working on floats
            for g, f in zip(self.opt.param_groups, floats):
                g["lr"] = f

    def __call__(self, batch_AMT: Tensor):
        for g, t in zip(self.opt.param_groups, self.lr):
            t.fill_(float(g["lr"]))
        if self.static_batch is None or self.static_batch.shape != batch_AMT.shape:
            if self.graph is not None:
                raise ValueError("GraphedTrainStep: the batch shape changed after capture")
            self.static_batch = torch.empty(batch_AMT.shape, dtype=batch_AMT.dtype, device=self.lr[0].device)
        self.static_batch.copy_(batch_AMT, non_blocking=True)
        if self.steps_run < self.warmup:   # real steps, off the capture stream
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._with_tensor_lr(self._body)
            torch.cuda.current_stream().wait_stream(side)
            self.steps_run += 1
            return out[:3]
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):   # recorded, not run: the replay below runs this step
                self.outputs = self._with_tensor_lr(self._body)[:3]
        self.graph.replay()
        self.steps_run += 1
        return self.outputs


@torch.no_grad()
def collect_router_logits(model, backbone, batch_MT: Tensor, amp: torch.dtype) -> List[Tensor]:
    """Router logits of every layer application on one micro-batch (a no-grad forward in train mode)."""
    backbone.collect_router_logits = True
    try:
        with torch.autocast(batch_MT.device.type, amp, enabled=amp != torch.float32):
            return model(batch_MT[:, :-1]).router_logits
    finally:
        backbone.collect_router_logits = False
