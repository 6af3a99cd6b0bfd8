"""moeut: Mixture-of-Experts Universal Transformers (Csordás et al., NeurIPS 2024).

Drop-in for the official release's API (`MoEUTLM`, `MoEUT`, `AttentionMask`, `MoEUTOutput`, KV-cache
dicts, `profiles`), with its defects fixed, a CPU path, and Triton kernels on CUDA. Importing needs
neither CUDA nor Triton.
"""
from moeut import profiles
from moeut.attention import AttentionMask, KVCache, SwitchHeadRope
from moeut.dense import DenseLM
from moeut.model import MoEUT, MoEUTLayer, MoEUTLM, MoEUTOutput, MultilayerKVCache
from moeut.moe import SigmaMoE

__version__ = "0.1.0"
__all__ = ["MoEUTLM", "MoEUT", "MoEUTLayer", "AttentionMask", "MoEUTOutput", "KVCache", "MultilayerKVCache",
           "SwitchHeadRope", "SigmaMoE", "DenseLM", "profiles"]
