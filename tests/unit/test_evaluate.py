"""Zero-shot scoring on hand-made fixtures with a model whose log-probabilities the test controls; each
rule of the official code (RobertCsordas/moeut_training_code) pinned on an item computed by hand."""

import bz2
import json
import math

import pytest
import torch

from moeut import evaluate
from moeut.evaluate import Request, cbt_detokenize, hellaswag_preprocess, run_eval, score_requests, strictly_best
from moeut.model import MoEUTOutput

V = 16


class CharTokenizer:
    """One token per character: ' ' -> 0, a..m -> 1..13, anything else -> 14; eot = 15."""

    eot_id = 15
    vocab_size = V

    def encode(self, text):
        return [0 if c == " " else ord(c) - ord("a") + 1 if "a" <= c <= "m" else 14 for c in text]

    def decode(self, ids):
        return "".join(" " if i == 0 else chr(ord("a") + i - 1) if i <= 13 else "?" for i in ids)


class RecordingTokenizer(CharTokenizer):
    """Remembers every text it was asked to encode: what each task builds, checked string by string."""

    def __init__(self):
        self.texts = []

    def encode(self, text):
        self.texts.append(text)
        return super().encode(text)


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


def lp(t, prev, nxt):
    tok = CharTokenizer()
    return t[tok.encode(prev)[0], tok.encode(nxt)[0]].item()


def test_scores_sum_and_greedy():
    m = TableModel(table(a=dist(b=0.5)))
    tok = CharTokenizer()
    s = score_requests(
        m,
        [
            Request(tok.encode("a"), tok.encode("b")),
            Request(tok.encode("a"), tok.encode("c")),
            Request(tok.encode("ka"), tok.encode("bb")),
        ],
        batch_size=2,
    )
    assert s[0].logprob == pytest.approx(math.log(0.5)) and s[0].greedy and s[0].n_tokens == 1
    assert s[1].logprob == pytest.approx(math.log(0.5 / 15), rel=1e-5) and not s[1].greedy
    assert s[2].logprob == pytest.approx(math.log(0.5) - math.log(V), rel=1e-5) and s[2].n_tokens == 2


def test_nothing_is_prepended_and_the_first_token_is_not_scored():
    """`get_lprobs`: with no context the sequence is scored from its second token (no end-of-text
    prefix); a sequence past max_len + 1 tokens loses its start, never its scored tokens' order."""
    t = table(a=dist(b=0.5), b=dist(c=0.25))
    tok = CharTokenizer()
    s = score_requests(TableModel(t), [Request([], tok.encode("abc"))])[0]
    assert s.n_tokens == 2 and s.logprob == pytest.approx(math.log(0.5) + math.log(0.25))
    cut = score_requests(TableModel(t), [Request(tok.encode("kkka"), tok.encode("bc"))], max_len=3)[0]
    assert cut.n_tokens == 2 and cut.logprob == pytest.approx(math.log(0.5) + math.log(0.25))
    with pytest.raises(ValueError, match="continuation"):
        score_requests(TableModel(t), [Request([], tok.encode("a"))])


def test_long_sequences_are_scored_whole_as_the_training_code_scores_them():
    """CBT's stories run past 1025 tokens; the training code never truncates, and neither do we."""
    t = table(a=dist(b=0.5), b=dist(c=0.25), k=dist(k=0.9, a=0.05))
    tok = CharTokenizer()
    long = Request(tok.encode("k" * 1500 + "a"), tok.encode("bc"))
    s = score_requests(TableModel(t), [long])[0]
    assert s.n_tokens == 2 and s.logprob == pytest.approx(math.log(0.5) + math.log(0.25))
    seen = []

    class Recording(TableModel):
        def forward(self, x, mask=None, kv_cache=None):
            seen.append(x.shape[1])
            return super().forward(x, mask, kv_cache)

    score_requests(Recording(t), [long])
    assert seen == [1502]  # all 1503 tokens but the last went through the model


def test_ties_count_as_wrong():
    assert not strictly_best([1.0, 1.0, 0.0], 0)
    assert strictly_best([1.1, 1.0, 0.0], 0)


def fixture_table():
    return table(
        default=dist(space=0.4),
        space=dist(b=0.5, c=0.2, d=0.1, e=0.1),
        a=dist(space=0.4, b=0.3, c=0.2),
        b=dist(c=0.45, b=0.35, space=0.1),  # after 'b', 'c' is the argmax: ' bc' is fully greedy
        eot=dist(a=0.5),
    )


def test_lambada_by_the_official_rules(tmp_path):
    """`LambadaTest.step` on two texts, by hand: the argmax at the last len(word) positions, detokenized,
    must end in the word; the word's perplexity is exp of the mean over texts of its per-token mean loss."""
    (tmp_path / "lambada").mkdir()
    with open(tmp_path / "lambada" / "lambada_test.jsonl", "w") as f:
        f.write(json.dumps({"text": "ka bc"}) + "\n" + json.dumps({"text": "ka bd"}) + "\n")
    t = fixture_table()
    r = run_eval(TableModel(t), CharTokenizer(), ["lambada"], str(tmp_path), [], None, 4, printer=lambda *a: None)
    r = r["lambada"]
    assert r["accuracy"] == 0.5 and r["items"] == 2 and r["last_token_accuracy"] == 0.5
    # " bc" is 3 tokens: the losses at the last 3 positions (after 'a', ' ', 'b'), averaged per text
    w1 = -(lp(t, "a", " ") + lp(t, " ", "b") + lp(t, "b", "c")) / 3
    w2 = -(lp(t, "a", " ") + lp(t, " ", "b") + lp(t, "b", "d")) / 3
    assert r["last_word_perplexity"] == pytest.approx(math.exp((w1 + w2) / 2), rel=1e-5)
    every = -(2 * (lp(t, "k", "a") + lp(t, "a", " ") + lp(t, " ", "b")) + lp(t, "b", "c") + lp(t, "b", "d"))
    assert r["lm_perplexity"] == pytest.approx(math.exp(every / 8), rel=1e-5)


def test_blimp_sums_each_sentence_alone_and_averages_paradigms(tmp_path):
    (tmp_path / "blimp").mkdir()
    rows = {
        "p1": [("ab", "ac", "syntax"), ("ac", "ab", "syntax")],
        "p2": [("ab", "ac", "syntax/semantics")],
        "p3": [("ac", "ab", "syntax_semantics")],
    }
    for name, pairs in rows.items():
        with open(tmp_path / "blimp" / f"{name}.jsonl", "w") as f:
            for good, bad, field in pairs:
                f.write(json.dumps({"sentence_good": good, "sentence_bad": bad, "field": field}) + "\n")
    tok = RecordingTokenizer()
    r = run_eval(TableModel(fixture_table()), tok, ["blimp"], str(tmp_path), [], None, 4, printer=lambda *a: None)
    # 'ab' (P(b|a) = 0.3) beats 'ac' (0.2): p1 1 of 2, p2 right, p3 wrong; the sentences are encoded bare
    assert sorted(set(tok.texts)) == ["ab", "ac"]
    assert r["blimp"]["paradigms"] == {"p1": 0.5, "p2": 1.0, "p3": 0.0}
    assert r["blimp"]["accuracy"] == pytest.approx(0.5) and r["blimp"]["item_accuracy"] == pytest.approx(0.5)
    assert r["blimp"]["fields"] == {"syntax": 0.5, "syntax_semantics": 0.5}


def test_piqa_and_arc_build_the_official_strings(tmp_path):
    (tmp_path / "piqa").mkdir()
    with open(tmp_path / "piqa" / "valid.jsonl", "w") as f:
        f.write(json.dumps({"goal": "  g \n", "sol1": "b", "sol2": "c "}) + "\n")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n")
    (tmp_path / "arc").mkdir()
    ai2 = lambda stem, texts, key: {
        "question": {"stem": stem, "choices": [{"label": lab, "text": x} for lab, x in zip("ABCDE", texts)]},
        "answerKey": key,
    }
    with open(tmp_path / "arc" / "ARC-Easy-Test.jsonl", "w") as f:
        # per-token mean: ' bbbb' (gold, long) vs ' c' (short): the sum would prefer ' c', the mean ' bbbb'
        f.write(json.dumps(ai2("a", ["c", "bbbb", "d", "e"], "B")) + "\n")
        f.write(json.dumps(ai2("a", ["d", "e", "f"], "A")) + "\n")  # 3 options: dropped
        f.write(json.dumps(ai2("a", ["d", "e", "f", "g", "h"], "A")) + "\n")  # 5 options: dropped
    with open(tmp_path / "arc" / "arc_challenge.jsonl", "w") as f:  # llm-foundry's copy, 3 options dropped too
        f.write(json.dumps({"query": "Question: a", "choices": ["d", "e", "f", "f"], "gold": 0}) + "\n")
        f.write(json.dumps({"query": "Question: a", "choices": ["b", "e", "f"], "gold": 0}) + "\n")
    tok = RecordingTokenizer()
    r = run_eval(
        TableModel(fixture_table()),
        tok,
        ["piqa", "arc_easy", "arc_challenge"],
        str(tmp_path),
        [],
        None,
        4,
        printer=lambda *a: None,
    )
    assert tok.texts[:3] == ["Question: g\nAnswer:", " b", " c "]
    assert "Question: a\nAnswer:" in tok.texts and " bbbb" in tok.texts and " h" not in tok.texts
    assert r["piqa"]["accuracy"] == 1.0
    assert r["arc_easy"]["items"] == 1 and r["arc_easy"]["accuracy"] == 1.0
    # ' d' (0.1 after ' ') ties ' e' (0.1): the gold one does not win, and ties are wrong
    assert r["arc_challenge"]["items"] == 1 and r["arc_challenge"]["accuracy"] == 0.0


def test_hellaswag_builds_the_official_context_and_keeps_its_regex(tmp_path):
    assert hellaswag_preprocess(" Roof: A man [header] sits.  [title] He ") == "Roof: A man [header] sits. . He"
    assert hellaswag_preprocess("a \\. b") == "a b"  # what the regex does remove: a backslash and a '.'

    (tmp_path / "hellaswag").mkdir()
    with open(tmp_path / "hellaswag" / "hellaswag_val.jsonl", "w") as f:
        f.write(
            json.dumps(
                {
                    "activity_label": "Roof",
                    "ctx_a": "A man [header] sits.",
                    "ctx_b": "he IS",
                    "endings": ["c", "b ", "d", "e"],
                    "label": 1,
                }
            )
            + "\n"
        )
    tok = RecordingTokenizer()
    r = run_eval(TableModel(fixture_table()), tok, ["hellaswag"], str(tmp_path), [], None, 4, printer=lambda *a: None)
    assert tok.texts == ["Roof: A man [header] sits. He is", " c", " b", " d", " e"]
    assert r["hellaswag"]["accuracy"] == 1.0  # ' b' is the likeliest ending, gold index 1
    # the preprocessed copy: the same steps on its joined context
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").unlink()
    with bz2.open(tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("a  [title] b\n1\nc\nb\nd\ne\n")
    tok = RecordingTokenizer()
    run_eval(TableModel(fixture_table()), tok, ["hellaswag"], str(tmp_path), [], None, 4, printer=lambda *a: None)
    assert tok.texts[0] == "a . b"


def test_missing_file_names_it_and_its_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="lambada_test.jsonl.*cybertronai"):
        run_eval(TableModel(uniform_table()), CharTokenizer(), ["lambada"], str(tmp_path), [], None, 4)


def cbt_story(answer: str, options: str) -> str:
    context = "".join(f"{i} a `` a '' , b .\n" for i in range(1, 21))
    return context + f"21 a XXXXX b .\t{answer}\t\t{options}\n\n"


def test_cbt_follows_the_official_reader(tmp_path):
    """`ChildrenBooksTest`: PTB detokenization, context = the 20 sentences + the query up to XXXXX,
    option = candidate + the rest of the query, only 10-option stories, per-token mean, a group per file."""
    assert cbt_detokenize("a `` b '' , c n't ; d .") == 'a "b", cn\'t; d.'
    (tmp_path / "cbt").mkdir()
    ten = "|".join("bcdefghijk")
    for kind in ("CN", "NE", "P", "V"):
        text = cbt_story("b", ten) + cbt_story("c", ten) + cbt_story("b", "b|c|d")  # the last: 3 options
        (tmp_path / "cbt" / f"cbtest_{kind}_test_2500ex.txt").write_text(text)
    (tmp_path / "cbt" / "cbtest_CN_train.txt").write_text(cbt_story("b", ten))  # not a test file
    tok = RecordingTokenizer()
    res = run_eval(TableModel(fixture_table()), tok, ["cbt"], str(tmp_path), [], None, 4, printer=lambda *a: None)
    sentence = 'a "a", b.'
    assert tok.texts[0] == " ".join([sentence] * 20) + " a "
    assert tok.texts[1:4] == ["b b.", "c b.", "d b."]
    assert res["cbt"]["items"] == 8 and res["cbt"]["subsets"] == {"CN": 0.5, "NE": 0.5, "P": 0.5, "V": 0.5}
    assert res["cbt"]["accuracy"] == 0.5


def test_paper_average_needs_all_six_columns(tmp_path, monkeypatch):
    fake = {
        name: (lambda acc: lambda *a: {"accuracy": acc, "items": 1})(acc)
        for name, acc in zip(evaluate.TASKS, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
    }
    monkeypatch.setattr(evaluate, "TASK_FNS", fake)
    r = run_eval(
        TableModel(uniform_table()),
        CharTokenizer(),
        list(evaluate.TASKS),
        str(tmp_path),
        [],
        None,
        4,
        printer=lambda *a: None,
    )
    acc = {name: v["accuracy"] for name, v in r.items() if name in evaluate.TASKS}
    want = (acc["lambada"] + acc["blimp"] + acc["cbt"] + acc["hellaswag"] + acc["piqa"] + acc["arc_easy"]) / 6
    assert r["paper_table"]["average"] == pytest.approx(want)
    r = run_eval(
        TableModel(uniform_table()),
        CharTokenizer(),
        ["lambada", "blimp"],
        str(tmp_path),
        [],
        None,
        4,
        printer=lambda *a: None,
    )
    assert "paper_table" not in r


def test_standard_errors_of_group_means():
    from moeut.evaluate import mean_of_groups_stderr

    # one group of n items: the usual sqrt(p (1 - p) / (n - 1))
    assert mean_of_groups_stderr({"a": [True, False, True, True]}) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    # G independent groups: sqrt(sum of their variances) / G
    two = {"a": [True, False], "b": [True, True, False, False]}
    want = math.sqrt(0.25 * 2 / 1 / 2 + 0.25 * 4 / 3 / 4) / 2
    assert mean_of_groups_stderr(two) == pytest.approx(want)
    assert mean_of_groups_stderr({"a": [True]}) == 0.0
