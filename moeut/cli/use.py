"""`moeut generate`, `moeut eval`, `moeut analyze` and `moeut models`: using trained models."""

from __future__ import annotations

import sys

from moeut import profiles
from moeut.cli.common import (
    NON_NEGATIVE,
    POSITIVE,
    add_debug,
    add_device_argument,
    add_run_argument,
    device_argument,
    float_range,
    int_range,
    read_prompts,
    run_of,
)


def add_generate(sub):
    p = sub.add_parser(
        "generate",
        help="sample text from a trained run",
        description="Generate text with the KV cache. Greedy when --temperature is 0.",
    )
    add_run_argument(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable: a batch of prompts)")
    g.add_argument("--prompt-file", help="UTF-8 file with one prompt per line")
    p.add_argument("--max-new-tokens", type=NON_NEGATIVE, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float_range(0), default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument(
        "--top-p",
        type=float_range(0, 1, lo_open=True),
        default=1.0,
        help="nucleus sampling threshold in (0, 1] (default 1: off)",
    )
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="sampling seed: the same seed repeats its text")
    add_device_argument(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step (pays a one-time compile; for long outputs)",
    )
    add_debug(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from moeut.generate import generate, kv_cache_bytes
    from moeut.models import device_memory
    from moeut.runs import load_run

    prompts = read_prompts(args.prompt_file) if args.prompt_file else [p.replace("\\n", "\n") for p in args.prompt]
    device = device_argument(args.device)
    model, tok, _ = load_run(run_of(args), device)
    encoded = [tok.encode(p) for p in prompts]
    positions = max(max(len(e), 1) for e in encoded) + args.max_new_tokens
    need = kv_cache_bytes(model, len(encoded), positions)
    if need > device_memory(device):
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens}: the KV cache would need {need / 2**30:,.1f} GiB, "
            f"more than {device} has"
        )
    stream = len(prompts) == 1
    produced = []

    def on_token(row, t):
        if stream:  # decode the whole continuation so far: multi-byte pieces print correctly
            produced.append(t)
            text = tok.decode(produced)
            ready = len(text.rstrip("\ufffd"))  # a character still missing its last bytes waits for them
            if ready > on_token.shown:
                sys.stdout.write(text[on_token.shown : ready])
                sys.stdout.flush()
                on_token.shown = ready

    on_token.shown = 0
    if stream:
        sys.stdout.write(prompts[0])
    outs = generate(
        model,
        encoded,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        tok.eot_id,
        on_token,
        compile=args.compile,
    )
    if stream:
        sys.stdout.write(tok.decode(outs[0])[on_token.shown :] + "\n")  # what was held back, if it never completed
    else:
        for p, o in zip(prompts, outs):
            print(p + tok.decode(o))
            print("-" * 40)
    return 0


def add_eval(sub):
    from moeut.evaluate import TASKS

    p = sub.add_parser(
        "eval",
        help="perplexity and the paper's zero-shot tasks",
        description="Evaluate a trained run: perplexity on --text and the paper's zero-shot tasks "
        f"({', '.join(TASKS)}), scored as in the paper. See README for the data layout.",
    )
    add_run_argument(p)
    p.add_argument("--tasks", default="", help=f"comma list of: {', '.join(TASKS)}, or 'all'")
    p.add_argument("--data-dir", default="", help="directory laid out like lambada/ blimp/ hellaswag/ piqa/ arc/ cbt/")
    p.add_argument("--text", action="append", default=[], help="UTF-8 text file(s) for perplexity (--context windows)")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0, help="at most N items per task (0: all)")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="sequences scored at once (default 32)")
    p.add_argument(
        "--context",
        type=int_range(1, 1 << 20),
        default=None,
        help="window for --text perplexity (default: the context the run was trained with)",
    )
    p.add_argument(
        "--json",
        help="write the scores (with standard errors), item counts, the checkpoint and its "
        "step, --limit and the protocol here",
    )
    add_device_argument(p)
    add_debug(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import os
    from pathlib import Path
    from moeut.evaluate import TASKS, read_text_file, run_eval
    from moeut.files import write_json_atomic
    from moeut.runs import load_run

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks != "all" else list(TASKS)
    if not tasks and not args.text:
        raise ValueError("nothing to evaluate: give --tasks and/or --text")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if tasks and not Path(args.data_dir or "").is_dir():
        raise ValueError(f"--data-dir {args.data_dir!r} is not a directory (the zero-shot tasks read their data there)")
    for t in args.text:
        if not Path(t).is_file():
            raise ValueError(f"--text {t}: no such file")
        read_text_file(t)
    if args.json:
        target = Path(args.json)
        if target.is_dir():
            raise ValueError(f"--json {target} is a directory")
        if not os.access(target.parent if str(target.parent) else ".", os.W_OK):
            raise ValueError(f"--json {target}: its directory is not writable")
    from moeut.evaluate import PROTOCOL

    model, tok, meta = load_run(run_of(args), device_argument(args.device))
    context = args.context or int(meta.get("config", {}).get("context") or 1024)
    if args.text and not args.context:
        print(f"--text: {context}-token windows (the run's training context; --context to change)")
    header = {
        "checkpoint": meta["loaded_checkpoint"]["path"],
        "step": meta["loaded_checkpoint"]["step"],
        "model": meta.get("model"),
        "limit": args.limit or None,
        "context": context,
        "protocol": PROTOCOL,
    }

    def write_json(results):  # after every task, atomically: an interrupted run keeps what it finished
        if args.json:
            write_json_atomic(args.json, {**header, "results": results})

    run_eval(
        model,
        tok,
        tasks,
        args.data_dir,
        args.text,
        args.limit or None,
        args.batch_size,
        context,
        skip_missing=args.tasks == "all",
        on_result=write_json,
    )
    return 0


def add_models(sub):
    p = sub.add_parser("models", help="list model names and their parameter counts")
    p.add_argument(
        "--vocab-size",
        type=int_range(2, 65535),
        default=8000,
        help="the vocabulary the parameter counts assume (default 8000, the paper's)",
    )
    p.add_argument(
        "--context",
        type=int_range(1, 1 << 20),
        default=1024,
        help="the context the FLOPs per token assume (default 1024, the paper's)",
    )
    add_debug(p)
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    import torch
    from moeut.models import build_model, model_kwargs, training_flops_per_token

    print(
        f"{'model':12s} {'parameters':>10s} {'GFLOP/token':>12s}  arguments   (GFLOP/token: training matrix FLOPs "
        f"at context {args.context})"
    )
    for name in profiles.model_names():
        with torch.device("meta"):
            m = build_model(name, args.vocab_size, model_kwargs(name))
        flops = training_flops_per_token(name, args.vocab_size, model_kwargs(name), args.context)
        print(
            f"{name:12s} {sum(p.numel() for p in m.parameters()) / 1e6:9.1f}M {flops / 1e9:12.2f}  {model_kwargs(name)}"
        )
    return 0


def add_analyze(sub):
    p = sub.add_parser(
        "analyze",
        help="figures of what the experts do: usage, overlap across depth, residual norms",
        description="Run a trained model over text and write PNG figures and analysis.json to --out: "
        "expert usage per layer application (σ-MoE FFN, SwitchHead value and output "
        "experts), the overlap of a token's experts between applications of the same "
        "layer, distinct experts per token type, and the residual stream's norm and "
        "update size per application (dense runs too; --compare draws two runs together). "
        "A summary is printed.",
    )
    p.add_argument("run", metavar="RUN", help="run directory (or one of its checkpoint directories)")
    p.add_argument("--text", default=None, metavar="FILE", help="a UTF-8 text file to run the model on")
    p.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="PATH",
        help="data as moeut train takes it (default: the Python standard library sources)",
    )
    p.add_argument("--tokens", type=int_range(2, 1 << 24), default=16384, help="tokens to analyze (default 16384)")
    p.add_argument(
        "--compare", default=None, metavar="RUN", help="a second run (e.g. the dense baseline) to draw beside"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where the figures and analysis.json go")
    add_device_argument(p)
    add_debug(p)
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from pathlib import Path
    import torch
    from moeut.analyze import analyze, summary, write_report
    from moeut.evaluate import read_text_file
    from moeut.runs import load_run
    from moeut.train.data import collect_documents

    if args.text and args.data:
        raise ValueError("give --text or --data, not both")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file")
    texts = [read_text_file(args.text)] if args.text else [t for _, t in collect_documents(args.data)]
    device = device_argument(args.device)
    results, names = [], []
    for run in [args.run] + ([args.compare] if args.compare else []):
        model, tok, meta = load_run(run, device)
        context = int(meta.get("config", {}).get("context") or 1024)
        ids = []
        for ids_doc in tok.encode_documents(texts):
            ids += ids_doc
            if len(ids) >= args.tokens:
                break
        T = min(context, len(ids))
        B = max(min(len(ids), args.tokens) // T, 1)
        if len(ids) < 2:
            raise ValueError("not enough text to analyze")
        tokens = torch.tensor(ids[: B * T], device=device).view(B, T)
        results.append(analyze(model, tokens))
        names.append(Path(run).name)
    other = results[1] if len(results) > 1 else None
    files = write_report(results[0], out, other, names + ["compare"])
    print(summary(results[0], other))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
