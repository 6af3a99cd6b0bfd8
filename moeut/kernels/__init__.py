"""Triton kernels, one family per file. They import torch, Triton and `moeut.settings` only (nothing
from the model or the operators); `moeut/ops/` chooses when to call them and holds the PyTorch form
each one is tested against. All of them also run on CPU tensors under `TRITON_INTERPRET=1`.
"""
