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


def _register_with_transformers() -> None:
    """`model_type: moeut` for transformers' Auto classes (see `moeut.hf`): now if transformers is
    imported, otherwise as soon as it is (importing it here would add seconds to every `import moeut`)."""
    import importlib.abc
    import importlib.util
    import sys

    def register() -> None:
        from moeut.hf import register as register_hf

        register_hf()

    if "transformers" in sys.modules:
        register()
        return
    if importlib.util.find_spec("transformers") is None:
        return

    class RegisterAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "transformers":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_then_register(module):
                    exec_module(module)
                    register()

                spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, RegisterAfterImport())


_register_with_transformers()
__all__ = [
    "MoEUTLM",
    "MoEUT",
    "MoEUTLayer",
    "AttentionMask",
    "MoEUTOutput",
    "KVCache",
    "MultilayerKVCache",
    "SwitchHeadRope",
    "SigmaMoE",
    "DenseLM",
    "profiles",
]
