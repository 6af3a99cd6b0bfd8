"""Whether a fused Triton path runs for a tensor: it is on CUDA, Triton is importable and not disabled
(`MOEUT_DISABLE_TRITON=1`), and the path's own switch (`MOEUT_FUSED_ROUTER=0`, ...) is not off.

Kept apart from the kernel modules so that importing the model never imports Triton.
"""
from __future__ import annotations

import os
from typing import Optional

from torch import Tensor


def use_fused(t: Tensor, switch: Optional[str] = None) -> bool:
    if t.device.type != "cuda" or (switch is not None and os.environ.get(switch, "1") == "0"):
        return False
    from . import triton_expert_mm
    return triton_expert_mm.available()
