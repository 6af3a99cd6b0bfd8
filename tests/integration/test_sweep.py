"""`moeut sweep` runs the shipped tiny sweeps end to end, resumes after an interruption, and refuses a
bad file before training anything."""

import json
from pathlib import Path

import pytest

from moeut.cli import main

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"


def local_copy(name, corpus, tmp_path):
    """The shipped sweep with this machine's data and cache."""
    text = (
        (SWEEPS / name)
        .read_text()
        .replace("[train]\n", f'[train]\ndata = ["{corpus}"]\ncache-dir = "{tmp_path / "cache"}"\n', 1)
    )
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, runs", [("group_size_tiny.toml", ["G1", "G2", "AABB"]), ("k_tiny.toml", ["K2", "K4"])])
def test_the_tiny_sweeps_run_end_to_end(name, runs, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", str(local_copy(name, corpus, tmp_path)), "--out", str(out)]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert list(record["runs"]) == runs and all(r["val_ppl"] > 1 for r in record["runs"].values())
    table = (out / "sweep.md").read_text()
    assert all(f"| {r} |" in table for r in runs) and (out / "sweep.png").stat().st_size > 0
    kwargs = {r: json.loads((out / r / "run.json").read_text())["model_kwargs"] for r in runs}
    if name.startswith("group"):
        assert kwargs["G1"]["group_size"] == 1 and kwargs["AABB"]["group_type"] == "aabb"
        assert kwargs["G2"]["n_layers"] == 8  # the shared [train] set, merged with each run's
    else:
        assert [kwargs[r]["ff_k"] for r in runs] == [2, 4]


def test_an_interrupted_sweep_continues(corpus, tmp_path, capsys):
    path = local_copy("k_tiny.toml", corpus, tmp_path)
    out = tmp_path / "out"
    # first K2 finishes, then K4 is cut after 2 of its 6 steps
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    record = json.loads((out / "sweep.json").read_text())
    del record["runs"]["K4"]
    (out / "sweep.json").write_text(json.dumps(record))
    import shutil

    shutil.rmtree(out / "K4")
    assert main(["train", "--config", str(out / "K4.toml"), "--out", str(out / "K4"), "--stop-after", "2"]) == 0
    capsys.readouterr()
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "K2: done before, kept" in printed and "K4: resuming" in printed
    steps = [json.loads(line)["step"] for line in open(out / "K4" / "metrics.jsonl") if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_a_bad_sweep_file_is_refused_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nsteps = 2\n[[runs]]\nname = "a"\n[[runs]]\nname = "a"\n')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "unique" in capsys.readouterr().err and not (tmp_path / "out").exists()
    bad.write_text('trian = 1\n[[runs]]\nname = "a"\n')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "unknown keys ['trian']" in capsys.readouterr().err


def test_time_to_quality_against_the_dense_baseline(corpus, tmp_path, capsys):
    """Each run's curve against tokens, step seconds and wall seconds; per group the cost of reaching the
    dense baseline's final perplexity, the ratio to the baseline, and the plot."""
    from moeut.train.quality import crossing

    out = tmp_path / "out"
    assert main(["sweep", str(local_copy("quality_tiny.toml", corpus, tmp_path)), "--out", str(out)]) == 0
    record = json.loads((out / "sweep.json").read_text())
    for name, run in record["runs"].items():
        curve = run["curve"]
        assert [p["step"] for p in curve] == [2, 4, 6, 8], name
        assert [p["tokens"] for p in curve] == [2 * 4 * 32 * k for k in (1, 2, 3, 4)]
        for axis in ("train_seconds", "wall_seconds"):
            assert all(0 < a < b for a, b in zip([p[axis] for p in curve], [p[axis] for p in curve][1:])), axis
        assert all(p["wall_seconds"] > p["train_seconds"] for p in curve)  # evaluation and start-up are outside
    ttq = record["time_to_quality"]
    dense = [record["runs"][n]["curve"][-1]["val_ppl"] for n in ("dense-s0", "dense-s1")]
    assert ttq["baseline"] == "dense-tiny" and ttq["target_ppl"] == pytest.approx(sum(dense) / 2)
    base = ttq["groups"]["dense-tiny"]
    assert base["ratio"]["train_seconds"] == pytest.approx(1.0)
    moeut = ttq["groups"]["moeut-tiny"]
    reached = [
        crossing(record["runs"][n]["curve"], ttq["target_ppl"], "train_seconds") for n in ("moeut-s0", "moeut-s1")
    ]
    if all(r is not None for r in reached):
        want = (sum(reached) / 2) / base["total"]["train_seconds"]["mean"]
        assert moeut["ratio"]["train_seconds"] == pytest.approx(want)
    else:
        assert moeut["reached"] != "2/2"
    table = (out / "sweep.md").read_text()
    assert "GPU-time ratio" in table and "| dense-tiny (baseline) | 2 |" in table and "| moeut-tiny | 2 |" in table
    assert (out / "sweep.png").stat().st_size > 10_000


def test_crossing_interpolates_in_log_perplexity():
    from moeut.train.quality import crossing

    curve = [{"val_ppl": 100.0, "tokens": 10.0}, {"val_ppl": 10.0, "tokens": 20.0}, {"val_ppl": 5.0, "tokens": 30.0}]
    assert crossing(curve, 100.0, "tokens") == 10.0  # reached at the first validation
    assert crossing(curve, 10**1.5, "tokens") == pytest.approx(15.0)  # half way in log-perplexity
    assert crossing(curve, 4.0, "tokens") is None
    assert crossing(curve, 200.0, "tokens") == 10.0  # already below at the first validation: its cost
