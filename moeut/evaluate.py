"""Zero-shot evaluation by the rules of the paper's training code, plus perplexity on text.

Every task follows the official code (RobertCsordas/moeut_training_code, `framework/dataset/text/` and
`tasks/lm_eval_mixin.py`); each rule below names the function it follows. Shared rules
(`ProbabilityCompareTest.get_lprobs` and `.step`):
  * nothing is prepended: a sequence is context tokens + continuation tokens, each part tokenized on its
    own; the first token of a sequence is never scored (nothing predicts it);
  * a multiple-choice option scores the mean log-probability of its continuation tokens (BLiMP: the sum
    over the whole sentence); the gold option is right only if it beats every other option strictly;
  * a task with groups (BLiMP paradigms, CBT's CN/NE/P/V, ARC's two splits) reports each group and
    their plain mean (`accuracy`, the official "group_average") beside the mean over items.
The paper's table (its `main_result_table.py`) shows LAMBADA accuracy, the group averages of BLiMP, CBT,
HellaSwag and PIQA, ARC-Easy, and the mean of those six (`paper_average`).

Data directory layout (as the public releases ship the files):
    lambada/lambada_test.jsonl         {"text": ...} (OpenAI's file)
    blimp/<paradigm>.jsonl             sentence_good, sentence_bad (67 files)
    hellaswag/hellaswag_val.jsonl      the raw release (activity_label, ctx_a, ctx_b, endings, label), or
    hellaswag/hellaswag_val_full.txt.bz2   a preprocessed copy: 6 lines per item (context, gold, 4 endings)
    piqa/valid.jsonl + piqa/valid-labels.lst
    arc/ARC-Easy-Test.jsonl, arc/ARC-Challenge-Test.jsonl   AI2's release, or
    arc/arc_easy.jsonl, arc/arc_challenge.jsonl             llm-foundry's copy (query, choices, gold)
    cbt/cbtest_{CN,NE,P,V}_test_2500ex.txt                  the Children's Book Test
"""

from __future__ import annotations

import bz2
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

SOURCES = {
    "lambada": (("lambada/lambada_test.jsonl",), "the OpenAI LAMBADA test file (github cybertronai/bflm)"),
    "blimp": (("blimp",), "the BLiMP data/ folder (github alexwarstadt/blimp), one .jsonl per paradigm"),
    "hellaswag": (
        ("hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_val_full.txt.bz2"),
        "github rowanz/hellaswag data/hellaswag_val.jsonl (or klosax/hellaswag_text_data)",
    ),
    "piqa": (("piqa/valid.jsonl",), "PIQA validation (github ybisk/ybisk.github.io piqa/data), with valid-labels.lst"),
    "arc_easy": (
        ("arc/ARC-Easy-Test.jsonl", "arc/arc_easy.jsonl"),
        "AI2's ARC-V1-Feb2018 release (or mosaicml/llm-foundry's local_data/world_knowledge copy)",
    ),
    "arc_challenge": (
        ("arc/ARC-Challenge-Test.jsonl", "arc/arc_challenge.jsonl"),
        "AI2's ARC-V1-Feb2018 release (or mosaicml/llm-foundry's local_data/world_knowledge copy)",
    ),
    "cbt": (("cbt",), "the Children's Book Test (fb.ai babi CBTest): cbtest_{CN,NE,P,V}_test_2500ex.txt"),
}
TASKS = tuple(SOURCES)
PROTOCOL = "moeut-eval 2: the rules of the paper's training code (see this module's docstring)"
PAPER_TABLE = (
    ("lambada", "accuracy"),
    ("blimp", "accuracy"),
    ("cbt", "accuracy"),
    ("hellaswag", "accuracy"),
    ("piqa", "accuracy"),
    ("arc_easy", "accuracy"),
)


@dataclass
class Request:
    context: List[int]  # conditioned on, never scored
    continuation: List[int]  # scored (with no context, from its second token on)


@dataclass
class Score:
    logprob: float  # summed log-probability of the scored tokens
    n_tokens: int  # tokens scored
    greedy: bool  # every scored token is the argmax given what precedes it


class MissingData(FileNotFoundError):
    pass


def _need(data_dir: Path, task: str) -> Path:
    rels, origin = SOURCES[task]
    for rel in rels:
        if (Path(data_dir) / rel).exists():
            return Path(data_dir) / rel
    raise MissingData(f"{task}: {Path(data_dir) / rels[0]} not found. It comes from {origin}; see README 'Evaluation'.")


def _read_jsonl(path: Path) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _batches(
    model, seqs: Sequence[List[int]], batch_size: int, progress: Optional[str]
) -> Iterator[Tuple[List[int], torch.Tensor, torch.Tensor]]:
    """(indices into seqs, logits [b, L, V] fp32, tokens [b, L + 1]) per batch: right-padded, longest
    first. Causal attention: the padding never reaches a real position."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for b0 in tqdm(
        range(0, len(order), batch_size),
        desc=progress or "scoring",
        disable=progress is None,
        unit="batch",
        leave=False,
    ):
        idx = order[b0 : b0 + batch_size]
        x = torch.zeros(len(idx), len(seqs[idx[0]]), dtype=torch.long)
        for j, i in enumerate(idx):
            x[j, : len(seqs[i])] = torch.tensor(seqs[i])
        x = x.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1]).outputs.float()
        yield idx, logits, x


@torch.no_grad()
def score_requests(
    model,
    requests: Sequence[Request],
    batch_size: int = 32,
    max_len: Optional[int] = None,
    progress: Optional[str] = None,
) -> List[Score]:
    """The log-probability of each request's scored tokens (`get_lprobs`), each sequence whole as the
    training code scores it (it never truncates; RoPE positions run past the training context).
    `max_len`: cut a sequence longer than max_len + 1 tokens from its start instead."""
    seqs, firsts = [], []
    for r in requests:
        full = r.context + r.continuation
        if len(full) < 2 or not r.continuation:
            raise ValueError("a request needs a continuation and at least two tokens in all")
        cut = max(0, len(full) - (max_len + 1)) if max_len is not None else 0
        seqs.append(full[cut:])
        firsts.append(max(len(r.context) - cut, 1))
    results: List[Optional[Score]] = [None] * len(seqs)
    for idx, logits, x in _batches(model, seqs, batch_size, progress):
        target = x[:, 1:]
        positions = torch.arange(target.shape[1], device=x.device)
        lo = torch.tensor([firsts[i] - 1 for i in idx], device=x.device)[:, None]
        hi = torch.tensor([len(seqs[i]) - 1 for i in idx], device=x.device)[:, None]
        scored = (positions >= lo) & (positions < hi)
        tok_logp = -F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        logprob = (tok_logp.double() * scored).sum(1).tolist()
        greedy = ((logits.argmax(-1) == target) | ~scored).all(1).tolist()
        for j, i in enumerate(idx):
            results[i] = Score(logprob[j], len(seqs[i]) - firsts[i], greedy[j])
    return results  # type: ignore[return-value]


def strictly_best(scores: Sequence[float], gold: int) -> bool:
    """`ProbabilityCompareTest.step`: right only when the gold option beats every other (ties are wrong)."""
    return all(scores[gold] > s for i, s in enumerate(scores) if i != gold)


def _compare(model, tok, items, batch_size: int, per_token: bool, name: str) -> Dict[str, object]:
    """items: [(context, [continuations], gold, group)] -> accuracy per group, their mean, the item mean."""
    reqs, spans = [], []
    for ctx, conts, gold, group in items:
        c = tok.encode(ctx) if ctx else []
        spans.append((len(reqs), len(conts), gold, group))
        reqs += [Request(c, tok.encode(k)) for k in conts]
    scores = score_requests(model, reqs, batch_size, progress=name)
    right: Dict[str, List[bool]] = {}
    for start, n, gold, group in spans:
        s = [scores[start + i].logprob / (scores[start + i].n_tokens if per_token else 1) for i in range(n)]
        right.setdefault(group, []).append(strictly_best(s, gold))
    groups = {g: sum(v) / len(v) for g, v in right.items()}
    n_items = sum(len(v) for v in right.values())
    return {
        "accuracy": sum(groups.values()) / max(len(groups), 1),
        "accuracy_stderr": mean_of_groups_stderr(right),
        "items": n_items,
        "item_accuracy": sum(sum(v) for v in right.values()) / max(n_items, 1),
        "groups": groups,
    }


def mean_of_groups_stderr(right: Dict[str, List[bool]]) -> float:
    """Standard error of the plain mean of the groups' accuracies: each group's mean of right/wrong items
    has variance p(1 - p) / (n - 1) (the sample variance over its n items, over n), and the groups are
    independent."""
    var = sum(_item_variance(v) / len(v) for v in right.values() if v)
    return math.sqrt(var) / max(len(right), 1)


def _item_variance(v: Sequence[bool]) -> float:
    n = len(v)
    if n < 2:
        return 0.0
    p = sum(v) / n
    return p * (1 - p) * n / (n - 1)


@torch.no_grad()
def eval_lambada(model, tok, data_dir, limit, batch_size, max_len: Optional[int] = None):
    """`LambadaTest.step`. The whole text is one sequence (the target word included). Accuracy: the
    argmax predictions at the last len(word) positions -- len in characters, as the official code has
    it -- are detokenized, and the text after their last space must equal the word (the text's last
    space-separated piece). Perplexity: exp of the mean over items of the mean cross-entropy of the
    word's tokens (" " + word, tokenized alone) at the last positions. Also the last-token accuracy and
    the perplexity of every token of the texts (`lm_perplexity`)."""
    texts = [d["text"] for d in _read_jsonl(_need(data_dir, "lambada"))]
    texts = texts[:limit] if limit else texts
    seqs = [tok.encode(t)[-(max_len + 1) :] if max_len is not None else tok.encode(t) for t in texts]
    words = [t.split(" ")[-1] for t in texts]
    right, last_token_right = [], 0
    word_losses, nll, n_tok = [], 0.0, 0
    for idx, logits, x in _batches(model, seqs, batch_size, "lambada"):
        pred = logits.argmax(-1)
        for j, i in enumerate(idx):
            n, word = len(seqs[i]), words[i]
            out_seq = pred[j, max(n - 1 - len(word), 0) : n - 1].tolist()
            right.append(tok.decode(out_seq).split(" ")[-1] == word)
            word_ids = tok.encode(" " + word)
            last_token_right += int(pred[j, n - 2]) == word_ids[-1]
            at = logits[j, max(n - 1 - len(word_ids), 0) : n - 1]
            word_losses.append(F.cross_entropy(at, torch.tensor(word_ids[-len(at) :], device=at.device)).item())
            nll += F.cross_entropy(logits[j, : n - 1], x[j, 1:n], reduction="sum").item()
            n_tok += n - 1
    count = max(len(seqs), 1)
    return {
        "accuracy": sum(right) / count,
        "accuracy_stderr": mean_of_groups_stderr({"all": right}),
        "last_word_perplexity": math.exp(sum(word_losses) / count),
        "last_token_accuracy": last_token_right / count,
        "lm_perplexity": math.exp(nll / max(n_tok, 1)),
        "items": len(seqs),
    }


def eval_blimp(model, tok, data_dir, limit, batch_size):
    """`BLiMP`: each sentence alone (no separator, `sep = ""`), scored by its summed log-probability from
    its second token on; the groups are the paradigm files."""
    folder = _need(data_dir, "blimp")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise MissingData(f"blimp: no .jsonl files in {folder}")
    items, fields = [], {}
    for fpath in files:
        rows = _read_jsonl(fpath)
        rows = rows[:limit] if limit else rows
        # one paradigm file spells its field "syntax/semantics", the rest "syntax_semantics"
        fields[fpath.stem] = rows[0].get("field", "unknown").replace("/", "_") if rows else "unknown"
        items += [("", [r["sentence_good"], r["sentence_bad"]], 0, fpath.stem) for r in rows]
    r = _compare(model, tok, items, batch_size, per_token=False, name="blimp")
    by_field: Dict[str, List[float]] = {}
    for paradigm, acc in r["groups"].items():
        by_field.setdefault(fields[paradigm], []).append(acc)
    return {**r, "paradigms": r.pop("groups"), "fields": {k: sum(v) / len(v) for k, v in by_field.items()}}


HELLASWAG_CLEANUP = re.compile(r"\\[.*?\\]")  # as `HellaSwag.CLEANUP_REGEX` is written (see below)


def hellaswag_preprocess(text: str) -> str:
    """`HellaSwag.preprocess`. Its regex, written r"\\[.*?\\]", matches a backslash and one of . * ? \\,
    not the bracketed WikiHow tags its comment means: "[header]"-style tags stay, as in the paper."""
    text = text.strip().replace(" [title]", ". ")
    return HELLASWAG_CLEANUP.sub("", text).replace("  ", " ")


def eval_hellaswag(model, tok, data_dir, limit, batch_size):
    """`HellaSwag.load_dataset`: context activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), endings
    " " + ending, both preprocessed; mean log-probability per ending token. The bz2 copy has its tags
    removed and ctx_a, ctx_b already joined (ctx_b not capitalised): the other steps apply to it."""
    path = _need(data_dir, "hellaswag")
    items = []
    if path.suffix == ".jsonl":
        for d in _read_jsonl(path):
            ctx = d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()
            items.append(
                (
                    hellaswag_preprocess(ctx),
                    [" " + hellaswag_preprocess(e) for e in d["endings"]],
                    int(d["label"]),
                    "val",
                )
            )
    else:
        with bz2.open(path, "rt", encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        for i in range(0, len(lines) - 5, 6):
            items.append(
                (
                    hellaswag_preprocess(lines[i]),
                    [" " + hellaswag_preprocess(e) for e in lines[i + 2 : i + 6]],
                    int(lines[i + 1]),
                    "val",
                )
            )
    items = items[:limit] if limit else items
    return _compare(model, tok, items, batch_size, per_token=True, name="hellaswag")


def eval_piqa(model, tok, data_dir, limit, batch_size):
    """`PIQA.load_dataset`: "Question: " + goal.strip() + "\nAnswer:", endings " " + solution."""
    path = _need(data_dir, "piqa")
    labels_path = path.parent / "valid-labels.lst"
    if not labels_path.exists():
        raise MissingData(f"piqa: {labels_path} not found (it comes with valid.jsonl)")
    labels = [int(line) for line in open(labels_path) if line.strip()]
    items = [
        (f"Question: {q['goal'].strip()}\nAnswer:", [" " + q["sol1"], " " + q["sol2"]], g, "val")
        for q, g in zip(_read_jsonl(path), labels)
    ]
    items = items[:limit] if limit else items
    return _compare(model, tok, items, batch_size, per_token=True, name="piqa")


def _eval_arc(task):
    def run(model, tok, data_dir, limit, batch_size):
        """`AI2ARC.load_dataset`: "Question: " + stem + "\nAnswer:", endings " " + choice; items that do not
        have exactly four options are dropped (both splits)."""
        path = _need(data_dir, task)
        items = []
        for q in _read_jsonl(path):
            if "question" in q:  # AI2's release
                labels = [c["label"] for c in q["question"]["choices"]]
                ctx = "Question: " + q["question"]["stem"] + "\nAnswer:"
                conts, gold = [" " + c["text"] for c in q["question"]["choices"]], labels.index(q["answerKey"])
            else:  # llm-foundry's copy: its query is "Question: " + stem
                ctx, conts, gold = q["query"] + "\nAnswer:", [" " + c for c in q["choices"]], int(q["gold"])
            if len(conts) == 4:
                items.append((ctx, conts, gold, task))
        items = items[:limit] if limit else items
        return _compare(model, tok, items, batch_size, per_token=True, name=task)

    return run


def cbt_detokenize(text: str) -> str:
    """`ChildrenBooksTest.detokenize`: the PTB-style spacing of the CBT files undone."""
    for a, b in (
        (" '", "'"),
        (" \n", "\n"),
        ("\n ", "\n"),
        (" n't", "n't"),
        ("`` ", '"'),
        ("''", '"'),
        (" :", ":"),
        (" ;", ";"),
        (" !", "!"),
        (" ?", "?"),
        (" ,", ","),
        (" .", "."),
    ):
        text = text.replace(a, b)
    return text


def cbt_item(lines: List[str]) -> Optional[Tuple[str, List[str], int]]:
    """`ChildrenBooksTest.process_lines` for one story (line numbers removed): the 20 context sentences
    and the query up to XXXXX are the context; each option is candidate + the rest of the query line.
    None unless there are exactly 10 options (`add_last_lines`)."""
    question = " ".join(cbt_detokenize(line) for line in lines[:-1])
    answer = [a for a in lines[-1].split("\t") if a]
    query = cbt_detokenize(answer[0]).split("XXXXX")
    good, options = answer[1], [a for a in answer[2].split("|") if a]
    conts = [good + query[1]] + [a + query[1] for a in options if a != good]
    return (question + " " + query[0], conts, 0) if len(conts) == 10 else None


def read_cbt(path: Path) -> List[Tuple[str, List[str], int]]:
    """The stories of one CBT file (blank-line separated; each line starts with its number)."""
    items, lines = [], []
    for raw in list(open(path, encoding="utf-8")) + [""]:
        line = raw.strip()
        if line:
            lines.append(line[line.index(" ") + 1 :])
        elif lines:
            item = cbt_item(lines)
            if item is not None:
                items.append(item)
            lines = []
    return items


def eval_cbt(model, tok, data_dir, limit, batch_size):
    """`ChildrenBooksTest`: every *_test_* file is a group (CN, NE, P, V); mean log-probability per token."""
    folder = _need(data_dir, "cbt")
    files = sorted(f for f in folder.iterdir() if "_test_" in f.name)
    if not files:
        raise MissingData(f"cbt: no *_test_* files in {folder} ({SOURCES['cbt'][1]})")
    items = []
    for f in files:
        rows = read_cbt(f)
        items += [(*row, f.name.split("_")[1]) for row in (rows[:limit] if limit else rows)]
    r = _compare(model, tok, items, batch_size, per_token=True, name="cbt")
    return {**r, "subsets": r.pop("groups")}


TASK_FNS: Dict[str, Callable] = {
    "lambada": eval_lambada,
    "blimp": eval_blimp,
    "hellaswag": eval_hellaswag,
    "piqa": eval_piqa,
    "arc_easy": _eval_arc("arc_easy"),
    "arc_challenge": _eval_arc("arc_challenge"),
    "cbt": eval_cbt,
}


def paper_average(results: Dict[str, dict]) -> Optional[float]:
    """The mean of the paper table's six zero-shot columns, when all six were evaluated."""
    if not all(task in results for task, _ in PAPER_TABLE):
        return None
    return sum(results[task][key] for task, key in PAPER_TABLE) / len(PAPER_TABLE)


@torch.no_grad()
def eval_windows(tokens: np.ndarray, context: int, max_windows: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Non-overlapping `context + 1` windows of held-out text (the last partial one included)."""
    n = len(tokens)
    starts = list(range(0, max(n - 1, 0), context))
    if max_windows is not None:
        starts = starts[:max_windows]
    for s in starts:
        w = np.asarray(tokens[s : s + context + 1], dtype=np.int64)
        if len(w) >= 2:
            yield torch.from_numpy(w)


def windows_perplexity(model, windows: Iterable[torch.Tensor], bf16: Optional[bool] = None) -> Tuple[float, int]:
    """(exp(mean token NLL), tokens scored) over 1-D token windows, each scored on its own.
    `bf16`: autocast (default: on CUDA only)."""
    device = next(model.parameters()).device
    amp = device.type == "cuda" if bf16 is None else bf16
    nll, count = 0.0, 0
    for w in windows:
        w = w.to(device)[None]
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(w[:, :-1]).outputs
        nll += F.cross_entropy(logits.float()[0], w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
    return math.exp(nll / max(count, 1)), count


MAX_TEXT_BYTES = 1 << 30  # an evaluation text or prompt file
TEXT_BLOCK = 4 << 20


def read_text_file(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A UTF-8 text file's content, read in blocks: ValueError naming the file if it is larger than
    `max_bytes`, holds a NUL byte (binary; found in the first block that has one) or is not UTF-8."""
    import codecs
    from moeut.files import FileProblem, open_file

    try:
        fd = open_file(path, max_bytes=max_bytes)
    except FileProblem as e:
        raise ValueError(str(e)) from None
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts, offset = [], 0
    try:
        with os.fdopen(fd, "rb") as f:
            while block := f.read(TEXT_BLOCK):
                nul = block.find(b"\0")
                if nul >= 0:
                    raise ValueError(f"{path} is a binary file (a NUL byte at {offset + nul}), not text")
                try:
                    parts.append(decoder.decode(block))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path} is not valid UTF-8 text (byte {offset + e.start})") from None
                offset += len(block)
            parts.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8 text (it ends inside a character, byte {offset + e.start})"
        ) from None
    return "".join(parts)


def text_perplexity(model, tok, paths: Sequence[str], context: int = 1024) -> Dict[str, float]:
    """Perplexity over non-overlapping `context`-token windows of the given files."""
    texts = [read_text_file(p) for p in paths]  # every file checked before any scoring

    def windows():
        for text in texts:
            ids = np.asarray(tok.encode_documents([text])[0])
            yield from eval_windows(ids, context)

    ppl, count = windows_perplexity(model, windows())
    return {"perplexity": ppl, "tokens": count}


def _result_line(name: str, r: dict) -> str:
    score = r.get("accuracy", r.get("perplexity"))
    label = "ppl" if "perplexity" in r and "accuracy" not in r else "acc"
    line = f"{name:16s} {score:10.4f} {r.get('items', r.get('tokens', 0)):7d} {r['seconds']:8.1f}  ({label})"
    if name == "lambada" and "lm_perplexity" in r:
        line += (
            f"\n{'':16s} last-word perplexity {r['last_word_perplexity']:.2f}, last-token accuracy "
            f"{r['last_token_accuracy']:.4f}, perplexity of all tokens {r['lm_perplexity']:.2f}"
        )
    return line


def run_eval(
    model,
    tok,
    tasks: Sequence[str],
    data_dir: str,
    texts: Sequence[str],
    limit: Optional[int],
    batch_size: int,
    context: int = 1024,
    printer=print,
    skip_missing: bool = False,
    on_result: Optional[Callable[[Dict[str, dict]], None]] = None,
) -> Dict[str, dict]:
    """Evaluate; with skip_missing (used for `--tasks all`) a task whose data is absent is reported and
    skipped. Each task's line is printed as soon as it finishes and `on_result(results so far)` is
    called, so an interrupted run keeps what it finished."""
    unknown = [t for t in tasks if t not in TASK_FNS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if tasks and not data_dir:
        raise ValueError("--data-dir is required for the zero-shot tasks")
    model.eval()
    results: Dict[str, dict] = {}

    def done(name: str, r: dict, t0: float) -> None:
        results[name] = {**r, "seconds": round(time.time() - t0, 2)}
        printer(_result_line(name, results[name]))
        if on_result is not None:
            on_result(results)

    printer(f"{'task':16s} {'score':>10s} {'items':>7s} {'seconds':>8s}")
    if texts:
        t0 = time.time()
        done("text", text_perplexity(model, tok, texts, context), t0)
    for t in tasks:
        t0 = time.time()
        try:
            r = TASK_FNS[t](model, tok, Path(data_dir), limit, batch_size)
        except MissingData as e:
            if not skip_missing:
                raise
            printer(f"skipped {e}")
            continue
        done(t, r, t0)
    average = paper_average(results)
    if average is not None:
        results["paper_table"] = {**{task: results[task][key] for task, key in PAPER_TABLE}, "average": average}
        printer(f"{'paper average':16s} {average:10.4f}  (LAMBADA, BLiMP, CBT, HellaSwag, PIQA, ARC-Easy)")
        if on_result is not None:
            on_result(results)
    return results
