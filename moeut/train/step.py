"""One optimizer step of `moeut train`: forward and backward over the micro-batches, gradient clipping,
AdamW; run eagerly or replayed from CUDA graphs, in one process or several.

A MoEUT step launches thousands of small kernels (routing, casts, the shared layers' 9 applications);
on a host that needs ~40 µs per launch the GPU waits for the CPU. Captured once, the step is replayed
with one launch per graph. What capture needs, and where it is handled here:
  - fixed input memory: each step's tokens are copied into one static buffer;
  - a learning rate the graph reads from memory: AdamW (fused, capturable) gets a tensor lr, which
    is refreshed from the scheduler's float before every replay;
  - no host syncs and no lazy state inside the graph: two eager warm-up steps (real training steps)
    on a side stream create the optimizer state and tune the Triton kernels first;
  - autocast's weight-cast cache off (its entries would not outlive the capture);
  - router statistics, which need the logits on the host, come from a separate no-grad forward.

Several processes (`world > 1`) reduce gradients themselves rather than through DDP's hooks, which a
graph cannot hold: every parameter's `.grad` is a view into one fp32 buffer (`FlatGradients`); the
forward and backward of all micro-batches accumulate into it (one graph), one all-reduce averages
it, and clipping and AdamW run on the result (a second graph). Without CUDA the same three phases
run eagerly, which is how the CPU tests check this path against one process.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def forward_backward(
    fwd, batch_AMT: Tensor, amp: torch.dtype, cast_cache: bool = True, world: int = 1
) -> Tuple[Tensor, Tensor, Optional[List[Tensor]]]:
    """Accumulate the gradients of batch [accum, micro, T+1] (inputs [:, :-1], targets [:, 1:]) into
    the parameters' `.grad`; returns device tensors (mean loss, mean reg loss) and any collected
    router logits. Under torch's DDP wrapper only the last micro-batch all-reduces."""
    accum = batch_AMT.shape[0]
    device = batch_AMT.device
    loss_sum = torch.zeros((), device=device)
    reg_sum = torch.zeros((), device=device)
    router_logits = None
    for m in range(accum):
        x = batch_AMT[m]
        sync_ctx = fwd.no_sync() if (world > 1 and m < accum - 1 and hasattr(fwd, "no_sync")) else nullcontext()
        if hasattr(fwd, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter after the last micro-batch only
            fwd.set_requires_gradient_sync(m == accum - 1)
        with sync_ctx:
            with torch.autocast(device.type, amp, enabled=amp != torch.float32, cache_enabled=cast_cache):
                out = fwd(x[:, :-1])
                loss = F.cross_entropy(out.outputs.float().reshape(-1, out.outputs.shape[-1]), x[:, 1:].reshape(-1))
            ((loss + out.reg_loss) / accum).backward()
        loss_sum += loss.detach() / accum
        reg_sum += out.reg_loss.detach() / accum
        router_logits = out.router_logits if getattr(out, "router_logits", None) else router_logits
    return loss_sum, reg_sum, router_logits


def clip_and_step(model, opt, clip: float) -> Tensor:
    """Clip the gradient norm (none when clip <= 0) and take the optimizer step; returns the norm
    before clipping."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor over the process group's shards
        gnorm = gnorm.full_tensor()
    opt.step()
    return gnorm


def set_optimizer_mode(opt: torch.optim.Optimizer, fused: bool, capturable: bool) -> None:
    """Give `opt` this run's implementation flags after `load_state_dict`, which copies the saving run's
    (a checkpoint written by an FSDP run holds fused=False and capturable=False; one from a graphed
    run capturable=True), and put each `step` count where those flags need it: fused or capturable
    AdamW reads it as a float32 tensor on the parameter's device, the others as a CPU tensor."""
    for g in opt.param_groups:
        g["fused"], g["capturable"] = fused, capturable
        for p in g["params"]:
            state = opt.state.get(p)
            if not state or not torch.is_tensor(state.get("step")):
                continue
            device = p.device if fused or capturable else torch.device("cpu")
            state["step"] = state["step"].to(device=device, dtype=torch.float32)


def step_body(
    fwd, model, opt, batch_AMT: Tensor, amp: torch.dtype, clip: float, world: int, cast_cache: bool = True
) -> Tuple[Tensor, Tensor, Tensor, Optional[List[Tensor]]]:
    """One whole step with `.grad` freed afterwards: (mean loss, mean reg loss, gradient norm before
    clipping, router logits or None)."""
    loss_sum, reg_sum, router_logits = forward_backward(fwd, batch_AMT, amp, cast_cache, world)
    gnorm = clip_and_step(model, opt, clip)
    opt.zero_grad(set_to_none=True)
    return loss_sum, reg_sum, gnorm, router_logits


class FlatGradients:
    """Every trainable parameter's `.grad` as a view into one fp32 buffer. Backward accumulates into
    the views in place (autograd adds into an existing gradient), so the buffer is the whole
    gradient: one all-reduce averages it across processes."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        bad = [p.dtype for p in self.params if p.dtype != torch.float32]
        if bad:
            raise ValueError(f"flat gradients need fp32 parameters, found {bad[0]}")
        device = self.params[0].device
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float32, device=device)
        offset = 0
        for p in self.params:
            p.grad = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def check_views(self) -> None:
        """Autograd replaces a `.grad` it cannot add into; that would silently drop it from the buffer."""
        base = self.buffer.data_ptr()
        end = base + self.buffer.numel() * 4
        for p in self.params:
            if p.grad is None or not base <= p.grad.data_ptr() < end:
                raise RuntimeError("a parameter's gradient left the flat buffer (was .grad replaced or set to None?)")

    def all_reduce_mean(self) -> None:
        """Average across the process group (nothing to do without one)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.buffer)
            if dist.get_world_size() > 1:
                self.buffer.div_(dist.get_world_size())


class FlatGradientStep:
    """The multi-process step: forward/backward into `FlatGradients`, one all-reduce over the process
    group, clip + AdamW. Eager; `GraphedTrainStep(flat_gradients=True)` captures its first and last phase."""

    def __init__(self, fwd, model, opt, amp: torch.dtype, clip: float):
        self.fwd, self.model, self.opt, self.amp, self.clip = fwd, model, opt, amp, clip
        self.grads = FlatGradients(model)

    def __call__(self, batch_AMT: Tensor):
        self.grads.buffer.zero_()
        loss_sum, reg_sum, router_logits = forward_backward(self.fwd, batch_AMT, self.amp)
        self.grads.check_views()
        self.grads.all_reduce_mean()
        gnorm = clip_and_step(self.model, self.opt, self.clip)
        return loss_sum, reg_sum, gnorm, router_logits


class GraphedTrainStep:
    """The step captured in CUDA graphs after `warmup` eager steps; call it with a host batch, get
    (loss, reg loss, gradient norm) device tensors. By default the whole step is one graph. With
    `flat_gradients` (several processes): forward/backward is one graph, the all-reduce of the flat
    gradient buffer runs between replays, clipping and AdamW are a second graph. No torch.compile
    (the trainer checks)."""

    WARMUP = 2  # eager steps before the capture

    def __init__(
        self, fwd, model, opt, amp: torch.dtype, clip: float, warmup: int = WARMUP, flat_gradients: bool = False
    ):
        self.fwd, self.model, self.opt, self.amp, self.clip = fwd, model, opt, amp, clip
        self.warmup = warmup
        self.steps_run = 0
        self.graphs: List[torch.cuda.CUDAGraph] = []
        self.static_batch = None
        self.outputs = None
        self.flat = FlatGradients(model) if flat_gradients else None
        device = next(model.parameters()).device
        self.lr = [torch.tensor(float(g["lr"]), device=device) for g in opt.param_groups]
        set_optimizer_mode(opt, fused=bool(opt.defaults.get("fused")), capturable=True)

    def _whole_step(self):
        return step_body(self.fwd, self.model, self.opt, self.static_batch, self.amp, self.clip, 1, cast_cache=False)[
            :3
        ]

    def _forward_backward(self):
        self.flat.buffer.zero_()
        return forward_backward(self.fwd, self.static_batch, self.amp, cast_cache=False)[:2]

    def _optimizer(self):
        return clip_and_step(self.model, self.opt, self.clip)

    def _with_tensor_lr(self, fn):
        floats = [g["lr"] for g in self.opt.param_groups]
        for g, t in zip(self.opt.param_groups, self.lr):
            g["lr"] = t
        try:
            return fn()
        finally:  # the scheduler keeps working on floats
            for g, f in zip(self.opt.param_groups, floats):
                g["lr"] = f

    def _phases(self):
        """The step's parts in order; None marks the all-reduce between the graphs."""
        if self.flat is None:
            return [lambda: self._with_tensor_lr(self._whole_step)]
        return [self._forward_backward, None, lambda: self._with_tensor_lr(self._optimizer)]

    def __call__(self, batch_AMT: Tensor):
        for g, t in zip(self.opt.param_groups, self.lr):
            t.fill_(float(g["lr"]))
        if self.static_batch is None or self.static_batch.shape != batch_AMT.shape:
            if self.graphs:
                raise ValueError("GraphedTrainStep: the batch shape changed after capture")
            self.static_batch = torch.empty(batch_AMT.shape, dtype=batch_AMT.dtype, device=self.lr[0].device)
        self.static_batch.copy_(batch_AMT, non_blocking=True)
        if self.steps_run < self.warmup:  # real steps, off the capture stream
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            results = []
            with torch.cuda.stream(side):
                for phase in self._phases():
                    if phase is None:
                        self.flat.check_views()
                        self.flat.all_reduce_mean()
                    else:
                        results.append(phase())
            torch.cuda.current_stream().wait_stream(side)
            self.steps_run += 1
            return self._outputs_of(results)
        if not self.graphs:
            results = []
            for phase in self._phases():
                if phase is None:
                    self.graphs.append(None)
                    continue
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # recorded, not run: the replays below run it
                    results.append(phase())
                self.graphs.append(graph)
            self.outputs = self._outputs_of(results)
        for graph in self.graphs:
            if graph is None:
                self.flat.all_reduce_mean()
            else:
                graph.replay()
        self.steps_run += 1
        return self.outputs

    def _outputs_of(self, results):
        if self.flat is None:
            return tuple(results[0])
        (loss_sum, reg_sum), gnorm = results
        return loss_sum, reg_sum, gnorm


@torch.no_grad()
def collect_router_logits(model, backbone, batch_MT: Tensor, amp: torch.dtype) -> List[Tensor]:
    """Router logits of every layer application on one micro-batch (a no-grad forward in train mode)."""
    backbone.collect_router_logits = True
    try:
        with torch.autocast(batch_MT.device.type, amp, enabled=amp != torch.float32):
            return model(batch_MT[:, :-1]).router_logits
    finally:
        backbone.collect_router_logits = False
