"""The GPU benchmark `benchmarks/kernels.py` can only run on a GPU; what it computes from its rows can be
checked here: every pass its whole-FFN roofline sums is a row the script produces, and the sum is right."""
import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import kernels  # noqa: E402


def test_roofline_passes_are_rows_of_time_shape():
    source = (BENCHMARKS / "kernels.py").read_text()
    labels = set(re.findall(r'add\(f?"([^"]+)"', source)) | set(re.findall(r'\("(top-k sum, [^"]+)"', source))
    missing = [p for p in kernels.FFN_FWD_PASSES + kernels.FFN_BWD_PASSES if p not in labels]
    assert not missing, missing


def test_ffn_roofline_sums_its_passes_of_one_shape():
    passes = kernels.FFN_FWD_PASSES + kernels.FFN_BWD_PASSES
    rows = [dict(shape="244M", pass_=p, roofline_ms=float(i + 1)) for i, p in enumerate(passes)]
    rows += [dict(shape="1B", pass_=p, roofline_ms=100.0) for p in passes]
    rows += [dict(shape="244M", pass_="down fwd [column blocks]", roofline_ms=1000.0)]   # not summed
    fwd, fwd_bwd = kernels.ffn_roofline_ms(rows, "244M")
    n = len(kernels.FFN_FWD_PASSES)
    assert fwd == sum(range(1, n + 1))
    assert fwd_bwd == sum(range(1, len(passes) + 1))
