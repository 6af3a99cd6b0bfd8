"""No matmul of a 244M training step (MoEUT or its dense baseline) is misaligned for cuBLAS: such a
width (dense's d_ff 4110, MoEUT's 387 experts) once cost the dense baseline a third of its speed on
the H200, and made every MoEUT/dense ratio measured against it too kind (benchmarks/LOG.md, sixth session)."""

import sys
from pathlib import Path

import pytest
import torch

from moeut import DenseLM, MoEUTLM, moe, profiles

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from alignment_audit import misaligned, misaligned_matmuls


@pytest.mark.parametrize(
    "build",
    [
        lambda: MoEUTLM(8000, **{**profiles.MoEUT_244M, "n_layers": 2}),
        lambda: DenseLM(8000, **{**profiles.Dense_244M, "n_layers": 2}),
    ],
    ids=["moeut-244M", "dense-244M"],
)
def test_244M_training_step_has_no_misaligned_matmul(build, monkeypatch):
    monkeypatch.setattr(moe, "PADDING_MIN_ROWS", 128)  # the rule, at an eighth of the real threshold's rows
    torch.manual_seed(0)
    model = build().train()
    tokens = torch.randint(0, 8000, (1, 129))
    found, total = misaligned_matmuls(model, tokens)
    assert total > 10 and not found, found
    found, _ = misaligned_matmuls(model, tokens[:, :121])  # 120 rows: below the padding threshold
    assert found and all("387" in shapes or "4110" in shapes for _, shapes, _ in found), found


def test_misaligned_operand_rule():
    x = torch.zeros(64, 400, dtype=torch.bfloat16)
    assert not misaligned(x) and not misaligned(x.t()) and not misaligned(x[:, :387])
    assert misaligned(torch.zeros(64, 387, dtype=torch.bfloat16))  # rows of 774 bytes
    assert misaligned(torch.zeros(64, 387, dtype=torch.bfloat16).t())  # the same, column-major
    assert not misaligned(torch.zeros(64, 388))  # fp32: 4 elements are 16 bytes
    assert misaligned(x[:, 3:])  # data not on a 16-byte boundary
