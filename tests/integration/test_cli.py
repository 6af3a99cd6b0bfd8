"""The `moeut` command: help texts, and generate / eval on a freshly trained tiny run."""

import json
import subprocess

import pytest
import torch

from moeut.cli import build_parser, main

from .conftest import PY, train_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "cmd,flags",
    [
        (
            "train",
            [
                "--model",
                "--data",
                "--steps",
                "--out",
                "--seed",
                "--resume",
                "--batch-size",
                "--context",
                "--lr",
                "--warmup",
                "--clip",
                "--precision",
                "--eval-interval",
                "--ckpt-interval",
                "--compile",
                "--activation-checkpointing",
                "--micro-batch-size",
                "--set",
            ],
        ),
        (
            "generate",
            [
                "--checkpoint",
                "--prompt",
                "--prompt-file",
                "--max-new-tokens",
                "--seed",
                "--temperature",
                "--top-k",
                "--top-p",
            ],
        ),
        ("eval", ["--checkpoint", "--tasks", "--data-dir", "--limit", "--json", "--text"]),
    ],
)
def test_help_explains_every_flag(cmd, flags, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in flags:
        assert f in text, f


def test_console_entry_point_runs():
    r = subprocess.run([PY, "-m", "moeut", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "generate" in r.stdout and "eval" in r.stdout


def test_unknown_model_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model", "moeut-2T"])
    assert "moeut-2T" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    out = d / "run"
    assert main(train_args(corpus, out, d / "cache", steps=4)) == 0
    return out


def test_generate_is_reproducible_and_batched(run_dir, capsys, tmp_path):
    args = [
        "generate",
        "--checkpoint",
        str(run_dir),
        "--prompt",
        "def ",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
        "--seed",
        "7",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("def ")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\nclass A:\n")
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt-file", str(prompts), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "import os" in out and "class A:" in out


def test_eval_text_and_tasks_write_json(run_dir, tmp_path, capsys):
    text = tmp_path / "held.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text(
        json.dumps({"goal": "open a door", "sol1": "push it", "sol2": "eat it"}) + "\n"
    )
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n")
    out_json = tmp_path / "scores.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(run_dir),
                "--text",
                str(text),
                "--tasks",
                "piqa",
                "--data-dir",
                str(tmp_path),
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    saved = json.loads(out_json.read_text())
    res = saved["results"]
    assert res["text"]["perplexity"] > 1 and res["text"]["tokens"] > 100
    assert res["piqa"]["items"] == 1 and res["piqa"]["accuracy"] in (0.0, 1.0) and res["piqa"]["accuracy_stderr"] == 0
    # where the scores come from: the checkpoint and its step, the limit, the protocol, the context used
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert saved["checkpoint"] == str(newest) and saved["step"] == int(newest.name.split("_")[1])
    assert saved["limit"] is None and "training code" in saved["protocol"]
    trained_context = json.loads((run_dir / "run.json").read_text())["config"]["context"]
    assert saved["context"] == trained_context
    printed = capsys.readouterr().out
    assert "piqa" in printed and f"{trained_context}-token windows (the run's training context" in printed
    # a task whose data is missing: named, with its source
    assert main(["eval", "--checkpoint", str(run_dir), "--tasks", "lambada", "--data-dir", str(tmp_path)]) == 2
    assert "lambada_test.jsonl" in capsys.readouterr().err


def test_train_reads_a_toml_config_and_the_command_line_wins(corpus, tmp_path, capsys):
    from tests.integration.conftest import train_args

    config = tmp_path / "run.toml"
    config.write_text(
        f'steps = 5\nseed = 7\ndata = ["{corpus}"]\nno-tensorboard = true\ncuda-graph = false\n'
        f'device = "cpu"\nsample-prompt = "def hello_world"\n[set]\nd_model = 32\nn_layers = 2\n'
    )
    base = train_args(corpus, tmp_path / "run", tmp_path / "cache", steps=3)
    base = [a for a in base if a not in ("--data", str(corpus))]
    assert main(base + ["--config", str(config)]) == 0
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["config"]["steps"] == 3 and saved["config"]["seed"] == 7  # the flag won over the file
    assert saved["config"]["data"] == [str(corpus)] and saved["config"]["device"] == "cpu"
    assert saved["model_kwargs"]["d_model"] == 32 and saved["config"]["cuda_graph"] == "off"
    assert "def hello_world" in capsys.readouterr().out
    config.write_text("stepz = 5\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run2")]) == 2
    assert "unknown setting 'stepz'" in capsys.readouterr().err
    config.write_text("steps = -4\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run3")]) == 2
    assert "--config" in capsys.readouterr().err and not (tmp_path / "run3").exists()


def test_train_device_is_checked(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["train", "--device", "cuda", "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
        assert "--device cuda: no CUDA device" in capsys.readouterr().err
    assert main(["train", "--device", "tpu", "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_every_option_of_every_command_explains_itself():
    import argparse
    from moeut.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, p in sub.choices.items()
        for a in p._actions
        if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS and not (a.help or "").strip()
    ]
    assert not missing, missing
    assert all((sub._choices_actions[i].help or "").strip() for i in range(len(sub._choices_actions)))


def test_version_closed_pipe_and_the_run_as_first_argument(tmp_path):
    import subprocess

    r = subprocess.run([PY, "-m", "moeut", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("moeut ")
    r = subprocess.run(f"{PY} -m moeut models | head -2", shell=True, capture_output=True, text=True)
    assert r.stdout.splitlines()[1].startswith("moeut-") and r.stderr == ""  # no "Broken pipe" when the reader leaves
    assert main(["generate", "--prompt", "x"]) == 2
    assert main(["generate", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "b"), "--prompt", "x"]) == 2


def test_the_router_activation_is_one_setting_from_train_to_load(corpus, tmp_path, capsys):
    from moeut.runs import load_run
    from .conftest import train_args

    run = tmp_path / "run"
    assert main(train_args(corpus, run, tmp_path / "cache", steps=2, extra=["--set", "router_activation=softmax"])) == 0
    model, _, meta = load_run(run)
    assert meta["model_kwargs"]["router_activation"] == "softmax"
    assert {m.router_activation for m in model.modules() if hasattr(m, "router_activation")} == {"softmax"}
    capsys.readouterr()
    assert (
        main(
            train_args(corpus, tmp_path / "bad", tmp_path / "cache", steps=2, extra=["--set", "router_activation=relu"])
        )
        == 2
    )
    assert "router_activation must be one of sigmoid, softmax" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
