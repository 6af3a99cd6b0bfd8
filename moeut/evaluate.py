"""Zero-shot evaluation as the paper did it, plus perplexity on text.

No BOS token: context and continuation are tokenized separately and concatenated (an empty context
becomes the end-of-text token, the document separator the model saw in training). A choice counts
as correct only if its score is strictly greater than every other choice's: ties are wrong.

Data directory layout (like ../shared/eval):
    lambada/lambada_test.jsonl         {"text": ...}; target = last space-separated word (OpenAI file)
    blimp/<paradigm>.jsonl             sentence_good, sentence_bad, field, UID (67 files)
    hellaswag/hellaswag_val_full.txt.bz2   6 lines per item: context, gold 0-3, 4 endings
    piqa/valid.jsonl + piqa/valid-labels.lst
    arc/arc_easy.jsonl, arc/arc_challenge.jsonl    query, choices, gold
    cbt/cbtest_{CN,NE,P,V}_test_2500ex.txt         the Children's Book Test files (supply them yourself)
"""
from __future__ import annotations

import bz2
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from moeut.train.data import eval_windows

SOURCES = {
    "lambada": ("lambada/lambada_test.jsonl", "the OpenAI LAMBADA test file (github cybertronai/bflm)"),
    "blimp": ("blimp", "the BLiMP data/ folder (github alexwarstadt/blimp), one .jsonl per paradigm"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2", "github klosax/hellaswag_text_data (HellaSwag validation)"),
    "piqa": ("piqa/valid.jsonl", "PIQA validation (github ybisk/ybisk.github.io piqa/data), with valid-labels.lst"),
    "arc_easy": ("arc/arc_easy.jsonl", "mosaicml/llm-foundry scripts/eval/local_data/world_knowledge (AI2 ARC test)"),
    "arc_challenge": ("arc/arc_challenge.jsonl", "mosaicml/llm-foundry scripts/eval/local_data/world_knowledge (AI2 ARC test)"),
    "cbt": ("cbt", "the Children's Book Test (fb.ai babi CBTest): cbtest_{CN,NE,P,V}_test_2500ex.txt"),
}
TASKS = tuple(SOURCES)


@dataclass
class Request:
    context: List[int]
    continuation: List[int]


@dataclass
class Score:
    logprob: float        # summed log-probability of the continuation
    n_tokens: int
    greedy: bool          # every continuation token is the argmax given what precedes it


class MissingData(FileNotFoundError):
    pass


def _need(data_dir: Path, task: str) -> Path:
    rel, origin = SOURCES[task]
    p = Path(data_dir) / rel
    if not p.exists():
        raise MissingData(f"{task}: {p} not found. It comes from {origin}; see README 'Evaluation data'.")
    return p


@torch.no_grad()
def score_requests(model, requests: Sequence[Request], batch_size: int = 32, max_len: int = 1024,
                   progress: Optional[str] = None) -> List[Score]:
    """Log-probabilities of continuations given contexts: batched, right-padded, longest first."""
    device = next(model.parameters()).device
    seqs = []
    for r in requests:
        if not r.continuation:
            raise ValueError("a continuation must have at least one token")
        full = (r.context + r.continuation)[-(max_len + 1):]
        seqs.append((full, min(len(r.continuation), len(full) - 1)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    results: List[Optional[Score]] = [None] * len(seqs)
    from tqdm import tqdm
    amp = device.type == "cuda"
    for b0 in tqdm(range(0, len(order), batch_size), desc=progress or "scoring", disable=progress is None,
                   unit="batch", leave=False):
        idx = order[b0:b0 + batch_size]
        L = len(seqs[idx[0]][0]) - 1
        x = torch.zeros(len(idx), L + 1, dtype=torch.long)
        scored = torch.zeros(len(idx), L, dtype=torch.bool)   # positions whose next token is continuation
        for j, i in enumerate(idx):
            s, n = seqs[i]
            x[j, :len(s)] = torch.tensor(s)
            scored[j, len(s) - 1 - n:len(s) - 1] = True
        x, scored = x.to(device), scored.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(x[:, :-1]).outputs.float()  # causal: right padding never leaks into real positions
        target = x[:, 1:]
        # Reduce on the device: only two numbers per item cross to the host.
        tok_logp = -F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        logprob = (tok_logp * scored).sum(1).tolist()
        greedy = ((logits.argmax(-1) == target) | ~scored).all(1).tolist()
        for j, i in enumerate(idx):
            results[i] = Score(logprob[j], seqs[i][1], greedy[j])
    return results  # type: ignore[return-value]


def strictly_best(scores: Sequence[float], gold: int) -> bool:
    """Correct only when the gold choice beats every other choice (ties are wrong)."""
    return all(scores[gold] > s for i, s in enumerate(scores) if i != gold)


def _encode_ctx(tok, text: str) -> List[int]:
    return tok.encode(text) if text else [tok.eot_id]


def _multiple_choice(model, tok, items, batch_size, per_token: bool, name: str) -> Dict[str, float]:
    """items: [(context, [continuations], gold)]."""
    reqs, spans = [], []
    for ctx, conts, gold in items:
        c = _encode_ctx(tok, ctx)
        spans.append((len(reqs), len(conts), gold))
        reqs += [Request(c, tok.encode(k)) for k in conts]
    scores = score_requests(model, reqs, batch_size, progress=name)
    correct = 0
    for start, n, gold in spans:
        s = [scores[start + i].logprob / (scores[start + i].n_tokens if per_token else 1) for i in range(n)]
        correct += strictly_best(s, gold)
    return {"accuracy": correct / max(len(spans), 1), "items": len(spans)}


def eval_lambada(model, tok, data_dir, limit, batch_size):
    path = _need(data_dir, "lambada")
    reqs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                text = json.loads(line)["text"]
                ctx, word = text.rsplit(" ", 1)
                reqs.append(Request(_encode_ctx(tok, ctx), tok.encode(" " + word)))
    reqs = reqs[:limit] if limit else reqs
    scores = score_requests(model, reqs, batch_size, progress="lambada")
    acc = sum(s.greedy for s in scores) / max(len(scores), 1)
    ppl = math.exp(-sum(s.logprob for s in scores) / max(len(scores), 1))
    return {"accuracy": acc, "last_word_perplexity": ppl, "items": len(scores)}


def eval_blimp(model, tok, data_dir, limit, batch_size):
    folder = _need(data_dir, "blimp")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise MissingData(f"blimp: no .jsonl files in {folder}")
    reqs, spans = [], []   # all paradigms in one scoring pass: better batches than 67 small ones
    for fpath in files:
        items = [json.loads(l) for l in open(fpath, encoding="utf-8") if l.strip()]
        items = items[:limit] if limit else items
        # one paradigm file of the BLiMP release spells its field "syntax/semantics"; the rest "syntax_semantics"
        field = items[0].get("field", "unknown").replace("/", "_") if items else "unknown"
        spans.append((fpath.stem, field, len(reqs), len(items)))
        for it in items:  # summed log-probability of each whole sentence, no length normalisation
            reqs += [Request([tok.eot_id], tok.encode(it["sentence_good"])),
                     Request([tok.eot_id], tok.encode(it["sentence_bad"]))]
    sc = score_requests(model, reqs, batch_size, progress="blimp")
    per_paradigm, fields = {}, {}
    for name, field, start, n in spans:
        acc = sum(sc[start + 2 * i].logprob > sc[start + 2 * i + 1].logprob for i in range(n)) / max(n, 1)
        per_paradigm[name] = acc
        fields.setdefault(field, []).append(acc)
    return {"accuracy": sum(per_paradigm.values()) / len(per_paradigm), "items": len(per_paradigm),
            "pairs": len(reqs) // 2, "paradigms": per_paradigm,
            "fields": {k: sum(v) / len(v) for k, v in fields.items()}}


def eval_hellaswag(model, tok, data_dir, limit, batch_size):
    path = _need(data_dir, "hellaswag")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = [l.rstrip("\n") for l in f]
    items = []
    for i in range(0, len(lines) - 5, 6):
        items.append((lines[i], [" " + e for e in lines[i + 2:i + 6]], int(lines[i + 1])))
    items = items[:limit] if limit else items
    return _multiple_choice(model, tok, items, batch_size, per_token=True, name="hellaswag")


def eval_piqa(model, tok, data_dir, limit, batch_size):
    path = _need(data_dir, "piqa")
    labels_path = path.parent / "valid-labels.lst"
    if not labels_path.exists():
        raise MissingData(f"piqa: {labels_path} not found (it comes with valid.jsonl)")
    qs = [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]
    labels = [int(l) for l in open(labels_path) if l.strip()]
    items = [(f"Question: {q['goal']}\nAnswer:", [" " + q["sol1"], " " + q["sol2"]], g) for q, g in zip(qs, labels)]
    items = items[:limit] if limit else items
    return _multiple_choice(model, tok, items, batch_size, per_token=True, name="piqa")


def _eval_arc(task):
    def run(model, tok, data_dir, limit, batch_size):
        path = _need(data_dir, task)
        items = []
        for l in open(path, encoding="utf-8"):
            if l.strip():
                q = json.loads(l)
                if len(q["choices"]) == 4 or task == "arc_challenge":  # the paper kept 4-option ARC-Easy items
                    items.append((q["query"] + "\nAnswer:", [" " + c for c in q["choices"]], int(q["gold"])))
        items = items[:limit] if limit else items
        return _multiple_choice(model, tok, items, batch_size, per_token=True, name=task)
    return run


def _read_cbt(path: Path):
    """Yield (context, question-with-XXXXX, candidates, answer) from a CBT test file."""
    block = []
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line:
            continue
        num, _, text = line.partition(" ")
        block.append(text)
        if num == "21":
            q, answer, _, cands = (text.split("\t") + ["", "", "", ""])[:4]
            yield " ".join(block[:20]), q, [c for c in cands.split("|") if c], answer
            block = []


def eval_cbt(model, tok, data_dir, limit, batch_size):
    folder = _need(data_dir, "cbt")
    out = {}
    for kind in ("CN", "NE", "P", "V"):
        path = folder / f"cbtest_{kind}_test_2500ex.txt"
        if not path.exists():
            raise MissingData(f"cbt: {path} not found ({SOURCES['cbt'][1]})")
        items = []
        for ctx, q, cands, ans in _read_cbt(path):
            if ans in cands:
                items.append((ctx, [" " + q.replace("XXXXX", c) for c in cands], cands.index(ans)))
        items = items[:limit] if limit else items
        out[kind] = _multiple_choice(model, tok, items, batch_size, per_token=False, name=f"cbt/{kind}")
    return {"accuracy": sum(v["accuracy"] for v in out.values()) / 4, "items": sum(v["items"] for v in out.values()),
            "subsets": {k: v["accuracy"] for k, v in out.items()}}


TASK_FNS: Dict[str, Callable] = {"lambada": eval_lambada, "blimp": eval_blimp, "hellaswag": eval_hellaswag,
                                 "piqa": eval_piqa, "arc_easy": _eval_arc("arc_easy"),
                                 "arc_challenge": _eval_arc("arc_challenge"), "cbt": eval_cbt}


@torch.no_grad()
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


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content; ValueError naming the file if it is not UTF-8 text."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 text (byte {e.start})") from None


def text_perplexity(model, tok, paths: Sequence[str], context: int = 1024) -> Dict[str, float]:
    """Perplexity over non-overlapping `context`-token windows of the given files."""
    texts = [read_text_file(p) for p in paths]   # every file checked before any scoring

    def windows():
        for text in texts:
            ids = np.asarray(tok.encode(text) + [tok.eot_id])
            yield from eval_windows(ids, context)
    ppl, count = windows_perplexity(model, windows())
    return {"perplexity": ppl, "tokens": count}


def _result_line(name: str, r: dict) -> str:
    score = r.get("accuracy", r.get("perplexity"))
    label = "ppl" if "perplexity" in r and "accuracy" not in r else "acc"
    line = f"{name:16s} {score:10.4f} {r.get('items', r.get('tokens', 0)):7d} {r['seconds']:8.1f}  ({label})"
    if name == "lambada":
        line += f"\n{'':16s} last-word perplexity {r['last_word_perplexity']:.2f}"
    return line


def run_eval(model, tok, tasks: Sequence[str], data_dir: str, texts: Sequence[str], limit: Optional[int],
             batch_size: int, context: int = 1024, printer=print, skip_missing: bool = False,
             on_result: Optional[Callable[[Dict[str, dict]], None]] = None) -> Dict[str, dict]:
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
    return results
