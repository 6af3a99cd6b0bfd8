"""Whether an operator runs its Triton kernel for a tensor: the tensor is on CUDA, Triton is
importable, `settings.triton` is on and the operator is not in `settings.pytorch_ops`.

Kept apart from the kernel modules so that importing the model never imports Triton.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from moeut.settings import settings


def use_fused(t: Tensor, op: Optional[str] = None) -> bool:
    if t.device.type != "cuda" or not settings.triton or (op is not None and op in settings.pytorch_ops):
        return False
    from moeut.kernels import expert_mm as triton_expert_mm

    return triton_expert_mm.triton is not None
