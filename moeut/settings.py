"""The settings a user has a reason to change, in one typed object, read once from the environment.

| variable                  | field         | default | effect |
|---------------------------|---------------|---------|--------|
| `MOEUT_TRITON=0`          | `triton`      | on      | every operator takes its PyTorch path, on CUDA too |
| `MOEUT_AUTOTUNE=0`        | `autotune`    | on      | one tile config per kernel variant: no tuning (short runs, tests) |
| `MOEUT_PYTORCH_OPS=a,b`   | `pytorch_ops` | none    | these operators take their PyTorch path on CUDA (debugging one kernel); names in `OPS` |
| `MOEUT_WGRAD_DEFER=N`     | `wgrad_defer` | 9       | applications of a shared expert weight whose gradients one launch sums: fewer launches and one write of the fp32 sum, against keeping N - 1 applications' operands alive; 0: no shared bf16 copy at all (each application casts its weights and gets its own gradient) |

Change them in code through `moeut.settings.settings` (tests do), or in the environment before the
first import of moeut. A bad value is an error at import, naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import FrozenSet, Mapping

# The operators with a Triton kernel that MOEUT_PYTORCH_OPS can send back to PyTorch (the expert GEMMs
# and weight gradients follow `triton` alone: their PyTorch paths are the references they are tested against).
OPS = ("router", "entropy", "rope", "norm", "row_dot", "topk_sum", "route", "expert_gemv")
MAX_WGRAD_DEFER = 9  # weight-gradient launches take at most this many applications (triton_weight_grad)


@dataclass
class Settings:
    triton: bool = True
    autotune: bool = True
    pytorch_ops: FrozenSet[str] = field(default_factory=frozenset)
    wgrad_defer: int = 9

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        def flag(name: str) -> bool:
            raw = env.get(name, "1").strip()
            if raw not in ("0", "1"):
                raise ValueError(f"{name} must be 0 or 1, got {raw!r}")
            return raw == "1"

        ops = frozenset(o.strip() for o in env.get("MOEUT_PYTORCH_OPS", "").split(",") if o.strip())
        unknown = sorted(ops - set(OPS))
        if unknown:
            raise ValueError(f"MOEUT_PYTORCH_OPS names unknown operators {unknown}; choose from {', '.join(OPS)}")
        raw = env.get("MOEUT_WGRAD_DEFER", "9").strip()
        if not raw.isdigit() or int(raw) > MAX_WGRAD_DEFER:
            raise ValueError(f"MOEUT_WGRAD_DEFER must be a whole number from 0 to {MAX_WGRAD_DEFER}, got {raw!r}")
        return cls(triton=flag("MOEUT_TRITON"), autotune=flag("MOEUT_AUTOTUNE"), pytorch_ops=ops, wgrad_defer=int(raw))


settings = Settings.from_env()
