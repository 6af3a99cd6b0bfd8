"""How much memory a device has: the bound that sizes are checked against before allocating."""
from __future__ import annotations

import os

import torch


def device_memory(device) -> int:
    """Bytes of memory of `device`: a GPU's total, or the machine's physical RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
