"""`moeut analyze` on two freshly trained tiny runs (MoEUT, and the dense baseline beside it)."""

import json

import pytest

from moeut.cli import main

from .conftest import train_args


def test_the_command_writes_figures_json_and_a_summary(corpus, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(train_args(corpus, tmp_path / "m", tmp_path / "cache", steps=2, extra=["--set", "n_layers=4"])) == 0
    dense = train_args(corpus, tmp_path / "d", tmp_path / "cache", steps=2)
    dense = dense[: dense.index("--set")] + ["--model", "dense-tiny", "--set", "d_model=32", "--set", "n_layers=2"]
    assert main(dense) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "analyze",
                str(tmp_path / "m"),
                "--compare",
                str(tmp_path / "d"),
                "--data",
                str(corpus),
                "--tokens",
                "256",
                "--out",
                str(tmp_path / "fig"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "layer applications" in printed and "expert overlap between its applications" in printed
    assert "compared with DenseLM" in printed
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == [
        "analysis.json",
        "attention_usage.png",
        "ffn_overlap.png",
        "ffn_usage.png",
        "residual.png",
        "token_diversity.png",
    ]
    saved = json.loads((tmp_path / "fig" / "analysis.json").read_text())
    assert saved["run"]["tokens"] == 256 and saved["compare"]["model"] == "DenseLM"
