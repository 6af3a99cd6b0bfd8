"""Zero-shot scoring on hand-made fixtures with a model whose log-probabilities the test controls."""
import bz2
import json
import math

import pytest
import torch

from moeut.evaluate import Request, run_eval, score_requests, strictly_best
from moeut.model import MoEUTOutput

V = 16


class CharTokenizer:
    """One token per character: ' ' -> 0, a..m -> 1..13, anything else -> 14; eot = 15."""
    eot_id = 15
    vocab_size = V

    def encode(self, text):
        return [0 if c == " " else ord(c) - ord("a") + 1 if "a" <= c <= "m" else 14 for c in text]

    def decode(self, ids):
        return "".join(" " if i == 0 else chr(ord("a") + i - 1) for i in ids)


class TableModel(torch.nn.Module):
    """Next-token log-probabilities depend only on the current token: logp[cur] is a fixed table."""

    def __init__(self, table):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.table = table  # [V, V] log-probabilities

    def forward(self, x, mask=None, kv_cache=None):
        return MoEUTOutput(self.table[x], torch.zeros(()), None)


def dist(**probs):
    """A log-probability row: the named tokens get their probability, the rest share what is left."""
    tok = CharTokenizer()
    row = torch.zeros(V)
    named = {tok.encode(" " if k == "space" else k)[0] if k != "eot" else 15: v for k, v in probs.items()}
    rest = (1 - sum(named.values())) / (V - len(named))
    row[:] = rest
    for i, v in named.items():
        row[i] = v
    return row.log()


def table(default=None, **rows):
    t = torch.stack([default if default is not None else dist()] * V)
    tok = CharTokenizer()
    for k, r in rows.items():
        t[15 if k == "eot" else tok.encode(" " if k == "space" else k)[0]] = r
    return t


def uniform_table():
    return table()


def test_scores_sum_and_greedy():
    m = TableModel(table(a=dist(b=0.5)))
    tok = CharTokenizer()
    s = score_requests(m, [Request(tok.encode("a"), tok.encode("b")), Request(tok.encode("a"), tok.encode("c")),
                           Request(tok.encode("ka"), tok.encode("bb"))], batch_size=2)
    assert s[0].logprob == pytest.approx(math.log(0.5)) and s[0].greedy and s[0].n_tokens == 1
    assert s[1].logprob == pytest.approx(math.log(0.5 / 15), rel=1e-5) and not s[1].greedy
    assert s[2].logprob == pytest.approx(math.log(0.5) - math.log(V), rel=1e-5) and s[2].n_tokens == 2


def test_ties_count_as_wrong():
    assert not strictly_best([1.0, 1.0, 0.0], 0)
    assert strictly_best([1.1, 1.0, 0.0], 0)


def write_fixtures(d):
    (d / "lambada").mkdir()
    # target word 'bc' spans two tokens; the table makes a->' '? no: context ends with 'a', continuation ' bc'
    with open(d / "lambada" / "lambada_test.jsonl", "w") as f:
        f.write(json.dumps({"text": "ka bc"}) + "\n")   # greedy: ' ' after a? set below
        f.write(json.dumps({"text": "ka bd"}) + "\n")   # 'd' after 'b' is not the argmax -> wrong
    (d / "blimp").mkdir()
    with open(d / "blimp" / "p1.jsonl", "w") as f:
        f.write(json.dumps({"sentence_good": "ab", "sentence_bad": "ac", "field": "syntax"}) + "\n")
        f.write(json.dumps({"sentence_good": "ac", "sentence_bad": "ab", "field": "syntax"}) + "\n")
    # the real BLiMP spells one paradigm's field "syntax/semantics", the others "syntax_semantics"
    with open(d / "blimp" / "p2.jsonl", "w") as f:
        f.write(json.dumps({"sentence_good": "ab", "sentence_bad": "ac", "field": "syntax/semantics"}) + "\n")
    with open(d / "blimp" / "p3.jsonl", "w") as f:
        f.write(json.dumps({"sentence_good": "ac", "sentence_bad": "ab", "field": "syntax_semantics"}) + "\n")
    (d / "piqa").mkdir()
    with open(d / "piqa" / "valid.jsonl", "w") as f:
        f.write(json.dumps({"goal": "g", "sol1": "b", "sol2": "c"}) + "\n")
    (d / "piqa" / "valid-labels.lst").write_text("0\n")
    (d / "arc").mkdir()
    with open(d / "arc" / "arc_easy.jsonl", "w") as f:
        # per-token mean: ' bbbb' (good, long) vs ' c' (short): the sum would prefer ' c', the mean ' bbbb'
        f.write(json.dumps({"query": "a", "choices": [" c", " bbbb", " d", " e"], "gold": 1}) + "\n")
        # exact tie between ' d' and ' e' -> counted wrong even though gold is one of them
        f.write(json.dumps({"query": "a", "choices": [" d", " e", " f", " f"], "gold": 0}) + "\n")
        f.write(json.dumps({"query": "a", "choices": [" d", " e", " f"], "gold": 0}) + "\n")  # 3 options: skipped
    (d / "hellaswag").mkdir()
    with bz2.open(d / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("a\n1\nc\nb\nd\ne\n")


def fixture_table():
    return table(default=dist(space=0.4),
                 space=dist(b=0.5, c=0.2, d=0.1, e=0.1),
                 a=dist(space=0.4, b=0.3, c=0.2),
                 b=dist(c=0.45, b=0.35, space=0.1),   # after 'b', 'c' is the argmax: ' bc' is fully greedy
                 eot=dist(a=0.5))


def test_tasks_on_fixtures(tmp_path):
    write_fixtures(tmp_path)
    t = fixture_table()
    m, tok = TableModel(t), CharTokenizer()
    snapshots = []   # what an interrupted run would have kept: results after each finished task
    res = run_eval(m, tok, ["lambada", "blimp", "piqa", "arc_easy", "hellaswag"], str(tmp_path), [], None, 4,
                   printer=lambda *a: None, on_result=lambda r: snapshots.append(list(r)))
    assert snapshots == [["lambada"], ["lambada", "blimp"], ["lambada", "blimp", "piqa"],
                         ["lambada", "blimp", "piqa", "arc_easy"], ["lambada", "blimp", "piqa", "arc_easy", "hellaswag"]]
    assert res["lambada"]["accuracy"] == 0.5 and res["lambada"]["items"] == 2
    # last-word perplexity: exp(-mean of summed word log-probs)
    lp1 = t[1, 0] + t[0, 2] + t[2, 3]
    lp2 = t[1, 0] + t[0, 2] + t[2, 4]
    assert res["lambada"]["last_word_perplexity"] == pytest.approx(math.exp(-(lp1 + lp2) / 2), rel=1e-5)
    # BLiMP sums whole-sentence log-probs (eot-conditioned): 'ab' (0.3) beats 'ac' (0.2) -> p1 1 of 2
    # right, p2 right, p3 wrong; the mean is over paradigms, and both field spellings are one field
    assert res["blimp"]["accuracy"] == pytest.approx(0.5) and res["blimp"]["items"] == 3
    assert res["blimp"]["fields"] == {"syntax": 0.5, "syntax_semantics": 0.5}
    assert res["piqa"]["accuracy"] == 1.0
    assert res["arc_easy"]["items"] == 2 and res["arc_easy"]["accuracy"] == 0.5
    assert res["hellaswag"]["accuracy"] == 1.0  # ' b' is the best ending, gold index 1


def test_missing_file_names_it_and_its_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="lambada_test.jsonl.*cybertronai"):
        run_eval(TableModel(uniform_table()), CharTokenizer(), ["lambada"], str(tmp_path), [], None, 4)


def test_cbt_reads_the_official_format_and_averages_subsets(tmp_path):
    (tmp_path / "cbt").mkdir()
    context = "".join(f"{i} a a .\n" for i in range(1, 21))
    for kind in ("CN", "NE", "P", "V"):
        # question 1: gold 'b' (likelier after ' ') wins; question 2: gold 'c' loses to 'b'
        block1 = context + "21 a XXXXX\tb\t\tb|c|d\n\n"
        block2 = context + "21 a XXXXX\tc\t\tb|c|d\n\n"
        (tmp_path / "cbt" / f"cbtest_{kind}_test_2500ex.txt").write_text(block1 + block2)
    res = run_eval(TableModel(fixture_table()), CharTokenizer(), ["cbt"], str(tmp_path), [], None, 4,
                   printer=lambda *a: None)
    assert res["cbt"]["items"] == 8
    assert res["cbt"]["subsets"] == {"CN": 0.5, "NE": 0.5, "P": 0.5, "V": 0.5}
    assert res["cbt"]["accuracy"] == 0.5
