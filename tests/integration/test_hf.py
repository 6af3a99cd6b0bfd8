"""`moeut export` and the Hugging Face side: the directory transformers loads (after `import moeut` and
with trust_remote_code in a process that never imports it), logits equal to ours, `generate` giving
the tokens `moeut generate` gives, the tokenizer round trip, and lm-evaluation-harness scoring the
exported model with the log-likelihoods our scorer computes."""

import json
from pathlib import Path
import os
import subprocess
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

import moeut  # registers model_type "moeut" with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeut.cli import main
from moeut.evaluate import Request, score_requests
from moeut.generate import generate
from moeut.runs import load_run

from .conftest import PY, SMALL_MODEL, train_args

pytestmark = pytest.mark.slow

DENSE_SMALL = [
    "--model",
    "dense-tiny",
    "--set",
    "d_model=32",
    "--set",
    "n_layers=2",
    "--set",
    "n_heads=2",
    "--set",
    "d_ff=64",
]
TEXTS = [
    "def f(x):\n    return x  + 1\n",
    "  two  spaces\tand a tab 12345",
    "naïve café ﬁ € 日本語 🙂",
    "",
    "a </s> b <unk>",
]


def offline_env(tmp_path):
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture(scope="module", params=["moeut", "dense"])
def exported(request, corpus, tmp_path_factory):
    """(run directory, export directory) of a freshly trained tiny run of each model kind."""
    d = tmp_path_factory.mktemp(f"hf_{request.param}")
    run = d / "run"
    args = train_args(corpus, run, d / "cache", steps=4)
    if request.param == "dense":  # (train_args ends with the small MoEUT's --set flags)
        args = args[: len(args) - len(SMALL_MODEL)] + DENSE_SMALL
    assert main(args) == 0
    assert main(["export", str(run), "--out", str(d / "hf")]) == 0
    return run, d / "hf"


def test_export_writes_a_model_directory_with_a_card(exported):
    run, hf = exported
    names = {p.name for p in hf.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "moeut_remote.py",
        "README.md",
    } <= names
    config = json.loads((hf / "config.json").read_text())
    meta = json.loads((run / "run.json").read_text())
    assert config["model_type"] == "moeut" and config["moeut_model"] == meta["model"]
    assert config["max_position_embeddings"] == 32 and config["auto_map"]["AutoModelForCausalLM"]
    card = (hf / "README.md").read_text()
    last_ppl = [
        json.loads(line)["val_ppl"] for line in (run / "metrics.jsonl").read_text().splitlines() if "val_ppl" in line
    ][-1]
    assert meta["model"] in card and "| steps | 4 " in card and f"{last_ppl:.2f}" in card
    assert not [p for p in hf.parent.iterdir() if p.name.startswith(".hf.export")]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644) & ~umask for p in [hf, *hf.rglob("*")])
    assert 'from_pretrained("path/to/' in card


def test_export_refusals_write_nothing(exported, tmp_path, capsys):
    run, hf = exported
    before = sorted((p.name, p.stat().st_mtime_ns) for p in hf.iterdir())
    assert main(["export", str(run), "--out", str(hf)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in hf.iterdir()) == before
    bad = tmp_path / "scores.json"
    bad.write_text('{"lambada": 0.3}')
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--eval", str(bad)]) == 2
    assert "moeut eval --json" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["export", str(tmp_path / "no_run"), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()


def test_eval_scores_go_into_the_card(exported, tmp_path):
    run, _ = exported
    scores = tmp_path / "eval.json"
    scores.write_text(
        json.dumps(
            {
                "protocol": "p1",
                "limit": 5,
                "results": {"piqa": {"accuracy": 0.625, "accuracy_stderr": 0.01}, "blimp": {"accuracy": 0.5}},
            }
        )
    )
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--eval", str(scores)]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| piqa | 0.625 ± 0.010 |" in card and "| blimp | 0.500 |" in card and "p1" in card


def test_automodel_gives_our_logits(exported):
    run, hf = exported
    model = AutoModelForCausalLM.from_pretrained(hf)
    ours, tok, _ = load_run(run)
    x = torch.tensor([tok.encode("def main():\n    print('hi')\n")])
    torch.testing.assert_close(model(x).logits, ours(x).outputs, rtol=0, atol=0)
    # a left-padded batch: each row's logits as when it is alone
    hf_tok = AutoTokenizer.from_pretrained(hf)
    prompts = ["import os", "class Point:\n    x = 1"]
    batch = hf_tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # padding on the left
    logits = model(**batch).logits
    for i, p in enumerate(prompts):
        ids = tok.encode(p)
        torch.testing.assert_close(logits[i, -len(ids) :], ours(torch.tensor([ids])).outputs[0], rtol=1e-5, atol=1e-5)
    labels = x.clone()
    labels[0, :3] = -100
    loss = model(x, labels=labels).loss
    want = torch.nn.functional.cross_entropy(ours(x).outputs[0, 2:-1], x[0, 3:])
    torch.testing.assert_close(loss, want)


def test_generate_gives_the_tokens_of_moeut_generate(exported, capsys):
    run, hf = exported
    model = AutoModelForCausalLM.from_pretrained(hf)
    hf_tok = AutoTokenizer.from_pretrained(hf)
    ours, tok, _ = load_run(run)
    prompts = ["def ", "import numpy as np\nx ="]
    batch = hf_tok(prompts, return_tensors="pt", padding=True)
    L = batch["input_ids"].shape[1]
    encoded = [tok.encode(p) for p in prompts]

    def strip(row):  # transformers' layout: new tokens, the eos if the row stopped there, then padding
        row = row.tolist()
        return row[: row.index(tok.eot_id)] if tok.eot_id in row else row

    greedy = model.generate(**batch, max_new_tokens=12)
    want = generate(ours, encoded, 12, eos_id=tok.eot_id)
    assert [strip(r[L:]) for r in greedy] == want
    torch.manual_seed(5)
    sampled = model.generate(**batch, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=30, top_p=0.95)
    torch.manual_seed(5)
    assert [strip(r[L:]) for r in sampled] == generate(ours, encoded, 12, 0.9, 30, 0.95, eos_id=tok.eot_id)
    seeded = model.generate(**batch, max_new_tokens=12, do_sample=True, seed=11)
    assert [strip(r[L:]) for r in seeded] == generate(ours, encoded, 12, 1.0, seed=11, eos_id=tok.eot_id)
    # the command line, greedy: the same text
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "12"]) == 0
    cli_text = capsys.readouterr().out.rstrip("\n")
    assert cli_text == "def " + tok.decode(strip(greedy[0][L:]))


def test_generate_refuses_what_it_does_not_do(exported):
    _, hf = exported
    model = AutoModelForCausalLM.from_pretrained(hf)
    x = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(x, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(x, attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="not a generation option"):
        model.generate(x, max_new_tokens=2, colour="blue")
    with pytest.raises(ValueError, match="past_key_values"):
        model(x, past_key_values=object())


def test_tokenizer_round_trips_like_ours(exported):
    """The export's exact conversion: AutoTokenizer gives a fast tokenizer (no remote code) that encodes
    and decodes as the run's SentencePiece model and as the slow MoEUTTokenizer kept beside it."""
    from moeut.hf.tokenization import MoEUTTokenizer

    run, hf = exported
    hf_tok = AutoTokenizer.from_pretrained(hf)
    slow = MoEUTTokenizer(str(hf / "tokenizer.model"))
    assert hf_tok.is_fast and not isinstance(hf_tok, MoEUTTokenizer)  # transformers 5: TokenizersBackend
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == slow.eos_token_id and hf_tok.padding_side == "left"
    _, tok, _ = load_run(run)
    corpus = TEXTS + [p.read_text()[:4000] for p in sorted(Path(moeut.__file__).parent.glob("*.py"))]
    for text in corpus:
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text) == slow(text)["input_ids"]
        assert hf_tok.decode(ids) == tok.decode(ids) == slow.decode(ids) == text  # the code tokenizer is lossless
    assert "needs only transformers" in (hf / "README.md").read_text()


def test_a_conversion_that_is_not_exact_keeps_the_slow_tokenizer(exported, tmp_path, monkeypatch):
    import moeut.hf.export as export

    run, _ = exported
    monkeypatch.setattr(export, "exact_fast_tokenizer", lambda model_bytes: (None, "encoding 'x': differs"))
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    assert not (out / "tokenizer.json").exists()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "MoEUTTokenizer" and config["auto_map"]["AutoTokenizer"][0]
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert type(hf_tok).__name__ == "MoEUTTokenizer"
    assert "encoding 'x': differs" in (out / "README.md").read_text()


def test_paper_tokenizer_matches_ours(tmp_path):
    """The paper's tokenizer normalises (NFKC, collapsed spaces): not lossless, but the same as ours."""
    from moeut.hf.tokenization import MoEUTTokenizer
    from moeut.train.tokenizer import save_tokenizer, train_paper_tokenizer

    docs = [f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7}.\nA second line." for i in range(300)]
    tok = train_paper_tokenizer(docs, vocab_size=150)
    save_tokenizer(tok, tmp_path / "tok.model")
    hf_tok = MoEUTTokenizer(str(tmp_path / "tok.model"))
    assert tok.kind == "paper"
    for text in TEXTS + docs[:3]:
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text) and hf_tok.decode(ids) == tok.decode(ids)


def test_trust_remote_code_loads_without_importing_moeut(exported, tmp_path):
    run, hf = exported
    ours, tok, _ = load_run(run)
    ids = tok.encode("for i in range(3):")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(hf)!r}
        try:
            AutoModelForCausalLM.from_pretrained(path)
            sys.exit("loaded without trust_remote_code")
        except ValueError:
            pass
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        ids = tok("for i in range(3):")["input_ids"]
        print("RESULT " + json.dumps(dict(ids=ids, logits=model(torch.tensor([ids])).logits[0, -1].tolist(),
                              cls=type(model).__module__)))
    """)
    r = subprocess.run(
        [PY, "-c", script],
        capture_output=True,
        text=True,
        env=offline_env(tmp_path),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.split("RESULT ")[-1])
    assert got["ids"] == ids and got["cls"] == "moeut.hf.modeling"
    torch.testing.assert_close(torch.tensor(got["logits"]), ours(torch.tensor([ids])).outputs[0, -1])


SHIPPED_TASK = Path(__file__).resolve().parents[2] / "examples" / "lm_eval" / "local_cloze.yaml"


def test_lm_eval_harness_scores_equal_ours(exported, tmp_path):
    """`lm_eval --model hf` on a task over a local file: every per-item log-likelihood (and its
    is-greedy flag) equals our scorer's on the same context/continuation split of the same strings."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    run, hf = exported
    items = [
        dict(context="def add(a, b):\n    return", choices=[" a + b", " a - b", " None"], gold=0),
        dict(context="import os\nimport", choices=[" sys", " re"], gold=0),
        dict(context="class Point:\n    def __init__(self", choices=[", x, y):", "):"], gold=0),
    ]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "tasks").mkdir()
    # the task file the README points at, with this test's items in place of its sample
    task = SHIPPED_TASK.read_text().replace("examples/lm_eval/local_cloze.jsonl", str(data))
    (tmp_path / "tasks" / "local_cloze.yaml").write_text(task.replace("task: local_cloze", "task: moeut_local_cloze"))
    cmd = [
        PY,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={hf},trust_remote_code=True",
        "--tasks",
        "moeut_local_cloze",
        "--include_path",
        str(tmp_path / "tasks"),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--log_samples",
        "--output_path",
        str(tmp_path / "out"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    samples = [
        json.loads(line)
        for f in (tmp_path / "out").rglob("samples_moeut_local_cloze_*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert len(samples) == len(items)
    ours, tok, _ = load_run(run)
    requests, theirs = [], []
    for s in samples:
        for (_, args), resp in zip(sorted(s["arguments"].items()), s["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            whole, head = tok.encode(context + continuation), tok.encode(context)  # lm-eval's split
            requests.append(Request(head, whole[len(head) :]))
            theirs.append((float(resp[0][0]), resp[0][1] == "True"))
    scores = score_requests(ours, requests)
    for (logprob, greedy), score in zip(theirs, scores):
        assert logprob == pytest.approx(score.logprob, abs=1e-4)
        assert greedy == score.greedy


def test_import_moeut_leaves_transformers_alone_until_it_is_imported(tmp_path):
    """`import moeut` does not import transformers (seconds); importing transformers later registers
    the model type all the same."""
    script = (
        "import sys, moeut\nassert 'transformers' not in sys.modules\nimport transformers\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\nprint('moeut' in CONFIG_MAPPING)"
    )
    r = subprocess.run([PY, "-c", script], capture_output=True, text=True, env=offline_env(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]
