"""moeut: Mixture-of-Experts Universal Transformers (Csordás et al., NeurIPS 2024).

Drop-in for the official release's API (`MoEUTLM`, `MoEUT`, `AttentionMask`, `MoEUTOutput`, KV-cache
dicts, `profiles`), with its defects fixed, a CPU path, and Triton kernels on CUDA. Importing needs
neither CUDA nor Triton.

Shape suffixes. A tensor's name ends in its dimensions, one letter each, with one meaning in every file
(`x_RD` is [rows, d_model], `w1_EDF` is [experts, d_model, expert width]):
    B batch          T time (queries)     L key length (cache + T)    H heads     D d_model
    R input rows (tokens B*T, or token-heads)    K experts chosen per row (top-k)
    E experts        F an expert's width (σ-MoE `expert_size`)
    N routed rows, R*K of them, sorted by expert        E1 expert offsets (E + 1 of them)
    X, C an output grouping of the N choices, X groups of C (FFN: X = R, C = K)
    S the same N choices in (group, choice) order, S = X*C (a top-k sum's input, a gate's gradient)
    I, O a projection's input and output width       M rows of a second operand (a gathered dot)
"""
from moeut import profiles
from moeut.attention import AttentionMask, KVCache, SwitchHeadRope
from moeut.dense import DenseLM
from moeut.model import MoEUT, MoEUTLayer, MoEUTLM, MoEUTOutput, MultilayerKVCache
from moeut.moe import SigmaMoE

__version__ = "0.1.0"
__all__ = ["MoEUTLM", "MoEUT", "MoEUTLayer", "AttentionMask", "MoEUTOutput", "KVCache", "MultilayerKVCache",
           "SwitchHeadRope", "SigmaMoE", "DenseLM", "profiles"]
