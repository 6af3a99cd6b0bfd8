"""The `moeut` command: `moeut train`, `moeut generate`, `moeut eval`, `moeut models`.

Also `python -m moeut ...` and, for several processes, `torchrun --nproc_per_node=N -m moeut train ...`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from . import profiles

EPILOG_TRAIN = """examples:
  moeut train                                   # tiny MoEUT on the Python standard library, CPU defaults
  moeut train --model moeut-244M --data corpus/ --steps 100000 --out runs/244m
  moeut train --model moeut-tiny --set d_model=256 --set ff_n_experts=64
  moeut train --resume runs/244m                # continue after a stop (SIGINT/SIGTERM save a checkpoint)
  torchrun --nproc_per_node=8 -m moeut train --model moeut-1B --data corpus/
"""


def _add_train(sub):
    p = sub.add_parser("train", help="train a MoEUT or dense LM (the paper's recipe)",
                       description="Train a language model with the paper's recipe: AdamW 2.5e-4, weight decay 0.01, "
                                   "cosine to 10%%, warmup, clipping, batch 64 x 1024, bf16 on GPU. On a CPU the "
                                   "defaults shrink (batch 16 x 256, 400 steps, lr 1e-3).",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="moeut-tiny", choices=profiles.model_names(), metavar="NAME",
                   help="moeut-{44M,126M,244M,318M,727M,1B,tiny} or dense-{44M,126M,244M,319M,728M,1B,tiny} "
                        "(default: moeut-tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a constructor argument of the model, e.g. --set att_n_experts=1 (repeatable)")
    p.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="text file, directory of text/source files, or JSONL with a 'text' field (repeatable); "
                        "default: the Python standard library source of this interpreter")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps = schedule length (GPU 100000, CPU 400)")
    p.add_argument("--out", default="", help="run directory (default runs/<model>-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    p.add_argument("--batch-size", type=int, default=0, help="global sequences per step (GPU 64, CPU 16)")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="sequences per forward pass per process; gradient accumulation keeps the global batch")
    p.add_argument("--context", type=int, default=0, help="tokens per sequence (GPU 1024, CPU 256)")
    p.add_argument("--lr", type=float, default=0.0, help="peak learning rate (GPU 2.5e-4, CPU 1e-3)")
    p.add_argument("--warmup", type=int, default=-1, help="linear warmup steps (0 for 44M/tiny, else 4000)")
    p.add_argument("--clip", type=float, default=-1.0, help="gradient-norm clipping (0.1 for 44M/tiny, else 0.25)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast precision (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece pieces (default 8000)")
    p.add_argument("--log-interval", type=int, default=10, help="steps between metrics.jsonl records")
    p.add_argument("--eval-interval", type=int, default=0, help="steps between validation runs (default steps/10)")
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows per run (0: all)")
    p.add_argument("--ckpt-interval", type=int, default=0, help="steps between checkpoints (default steps/10)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="how many checkpoints to keep")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each whole training step from a CUDA graph (one GPU; much faster for small and "
                        "mid-size models, whose eager steps wait on kernel launches). With --resume: switch it on/off")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--deterministic", action="store_true", help="bitwise-reproducible GPU training (slower attention)")
    p.add_argument("--cache-dir", default="", help="tokenized data cache (default ~/.cache/moeut)")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .runs import parse_overrides
    from .train import TrainConfig, config_of_run, end_distributed, train
    if args.resume:
        cfg = config_of_run(args.resume)
        cfg.out = args.resume
        cfg.progress = not args.no_progress
        cfg.stop_after = args.stop_after
        if args.cuda_graph is not None:
            cfg.cuda_graph = args.cuda_graph
        result = train(cfg, resume=True)
    else:
        names = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and k != "overrides"})
        cfg.overrides = parse_overrides(args.overrides)
        cfg.cuda_graph = bool(args.cuda_graph)
        cfg.tensorboard = not args.no_tensorboard
        cfg.progress = not args.no_progress
        result = train(cfg)
    end_distributed()   # the command owns the process group that `train` set up under torchrun
    if "val_ppl" in result:
        print(f"\nrun: {result['run_dir']}")
        print(f"validation perplexity: {result['val_ppl']:.2f}   (unigram model of the same data: {result['unigram_ppl']:.2f})")
        print(f"greedy sample (KV cache):\n{result['sample']}")
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample text from a trained run",
                       description="Generate text with the KV cache. Greedy when --temperature is 0.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory (or a checkpoint file in it)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable: a batch of prompts)")
    g.add_argument("--prompt-file", help="file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (pays a one-time compile; for long outputs)")
    p.set_defaults(func=cmd_generate)


def _device(name: str) -> str:
    import torch
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def cmd_generate(args) -> int:
    from .generate import generate
    from .runs import load_run
    model, tok, _ = load_run(args.checkpoint, _device(args.device))
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    else:
        prompts = [p.replace("\\n", "\n") for p in args.prompt]
    encoded = [tok.encode(p) for p in prompts]
    stream = len(prompts) == 1
    produced = []

    def on_token(row, t):
        if stream:  # decode the whole continuation so far: multi-byte pieces print correctly
            produced.append(t)
            text = tok.decode(produced)
            sys.stdout.write(text[on_token.shown:])
            sys.stdout.flush()
            on_token.shown = len(text)
    on_token.shown = 0
    if stream:
        sys.stdout.write(prompts[0])
    outs = generate(model, encoded, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                    tok.eot_id, on_token, compile=args.compile)
    if stream:
        sys.stdout.write("\n")
    else:
        for p, o in zip(prompts, outs):
            print(p + tok.decode(o))
            print("-" * 40)
    return 0


def _add_eval(sub):
    from .evaluate import TASKS
    p = sub.add_parser("eval", help="perplexity and the paper's zero-shot tasks",
                       description="Evaluate a trained run: perplexity on --text and the paper's zero-shot tasks "
                                   f"({', '.join(TASKS)}), scored as in the paper. See README for the data layout.")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--tasks", default="", help=f"comma list of: {', '.join(TASKS)}, or 'all'")
    p.add_argument("--data-dir", default="", help="directory laid out like lambada/ blimp/ hellaswag/ piqa/ arc/ cbt/")
    p.add_argument("--text", action="append", default=[], help="text file(s) for perplexity (1024-token windows)")
    p.add_argument("--limit", type=int, default=0, help="at most N items per task (0: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=1024, help="window for --text perplexity")
    p.add_argument("--json", help="write per-task scores and item counts here")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .evaluate import TASKS, run_eval
    from .runs import load_run, write_json_atomic
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks != "all" else list(TASKS)
    if not tasks and not args.text:
        print("nothing to evaluate: give --tasks and/or --text", file=sys.stderr)
        return 2
    model, tok, _ = load_run(args.checkpoint, _device(args.device))

    def write_json(results):  # after every task, atomically: an interrupted run keeps what it finished
        if args.json:
            write_json_atomic(args.json, results)

    run_eval(model, tok, tasks, args.data_dir, args.text, args.limit or None, args.batch_size, args.context,
             skip_missing=args.tasks == "all", on_result=write_json)
    return 0


def _add_models(sub):
    p = sub.add_parser("models", help="list model names and their parameter counts")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    import torch
    from .runs import build_model, model_kwargs
    for name in profiles.model_names():
        with torch.device("meta"):
            m = build_model(name, args.vocab_size, model_kwargs(name))
        print(f"{name:12s} {sum(p.numel() for p in m.parameters()) / 1e6:8.1f}M  {model_kwargs(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeut", description="MoEUT: Mixture-of-Experts Universal Transformers. "
                                "Train, sample from and evaluate MoEUT and dense language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_models(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from .checkpoint import CheckpointError
        if isinstance(e, RuntimeError) and not isinstance(e, CheckpointError):
            raise
        print(f"moeut {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
