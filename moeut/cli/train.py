"""`moeut train`, `moeut sweep` and `moeut plot`: starting, continuing, sweeping and plotting runs."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from moeut import profiles
from moeut.train.config import default_text, recipe_text
from moeut.cli.common import NON_NEGATIVE, POSITIVE, add_debug, float_range, int_range


EPILOG_TRAIN = """examples:
  moeut train                                   # tiny MoEUT on the Python standard library, CPU defaults
  moeut train --model moeut-244M --data corpus/ --steps 100000 --out runs/244m
  moeut train --model moeut-tiny --set d_model=256 --set ff_n_experts=64
  moeut train --resume runs/244m                # continue after a stop (SIGINT/SIGTERM save a checkpoint)
  torchrun --nproc_per_node=8 -m moeut train --model moeut-1B --data corpus/
"""


# Flags that may accompany --resume; every other training flag would change the run, and is refused.
RESUME_FLAGS = {
    "resume",
    "no_progress",
    "cuda_graph",
    "data",
    "valid_data",
    "cache_dir",
    "strict_data",
    "stop_after",
    "debug",
    "device",
    "text_field",
    "steps",
    "parallel",
    "print_interval",
    "wandb",
    "wandb_project",
}


def add_train(sub):
    p = sub.add_parser(
        "train",
        help="train a MoEUT or dense LM (the paper's recipe)",
        description=recipe_text() + " Every setting is checked before any work; the run directory "
        "is created only when training can start, and one trainer at a time may write it.",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Defaults are None, so that --resume can tell the flags given from those left alone.
    p.add_argument(
        "--model",
        default=None,
        choices=profiles.model_names(),
        metavar="NAME",
        help="moeut-{44M,126M,244M,318M,727M,1B,tiny} or dense-{44M,126M,244M,319M,728M,1B,tiny} (default: moeut-tiny)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="SOURCE",
        help="start a new run from trained weights: a run directory or one of its checkpoints (trained "
        "here or made by import-official) or a directory written by moeut export. The model and the "
        "tokenizer come from it; data, schedule, learning rate and a fresh optimizer are this run's",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="override a constructor argument of the model, e.g. --set att_n_experts=1 (repeatable)",
    )
    p.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="PATH",
        help="a text file (cut into ~8 KB documents at paragraph breaks), a directory of text/source "
        "and data files, JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, Arrow, or a Hugging Face "
        "datasets save_to_disk directory (repeatable); default: the Python standard library source "
        "of this interpreter. Files that are not UTF-8 text are skipped with a warning; an unknown "
        "format given by name is refused. With --resume: only to rebuild the run's tokenized data "
        "when they are no longer cached",
    )
    p.add_argument(
        "--text-field",
        default=None,
        metavar="NAME",
        help="the field (JSONL) or column (Parquet, Arrow, Hugging Face datasets) holding the text "
        f"({default_text('text_field')})",
    )
    p.add_argument("--strict-data", action="store_true", default=None, help="the same as --decode-errors strict")
    p.add_argument(
        "--decode-errors",
        choices=("replace", "strict", "skip"),
        default=None,
        help="bytes that are not UTF-8 in a text file: replace (default; replaced by U+FFFD and counted "
        "in the start summary), strict (the file is refused by name) or skip (the file is left out "
        "with a warning). Binary files (NUL bytes) are never read as text",
    )
    p.add_argument(
        "--valid-data",
        action="append",
        default=None,
        metavar="PATH",
        help="validation data, in any format --data takes (repeatable); then all of --data trains. "
        "Default: the validation split of a Hugging Face DatasetDict given as --data, else "
        "--valid-fraction of --data",
    )
    p.add_argument(
        "--valid-fraction",
        type=float_range(0, 0.5),
        default=None,
        metavar="F",
        help=f"share of --data's text held out for validation, by characters ({default_text('valid_fraction')}); large "
        "documents are held out in pieces, so a few big files lose only that share",
    )
    p.add_argument(
        "--steps", type=POSITIVE, default=None, help=f"optimizer steps = schedule length ({default_text('steps')})"
    )
    p.add_argument("--out", default=None, help="run directory: new or empty (default runs/<model>-<time>)")
    p.add_argument(
        "--seed",
        type=NON_NEGATIVE,
        default=None,
        help=f"sets the initialisation and the order of the batches ({default_text('seed')})",
    )
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its newest intact checkpoint, with the settings it was started with",
    )
    p.add_argument(
        "--batch-size", type=POSITIVE, default=None, help=f"global sequences per step ({default_text('batch_size')})"
    )
    p.add_argument(
        "--micro-batch-size",
        type=POSITIVE,
        default=None,
        help="sequences per forward pass per process; gradient accumulation keeps the global batch",
    )
    p.add_argument(
        "--context", type=int_range(1, 1 << 20), default=None, help=f"tokens per sequence ({default_text('context')})"
    )
    p.add_argument(
        "--lr", type=float_range(0, lo_open=True), default=None, help=f"peak learning rate ({default_text('lr')})"
    )
    p.add_argument("--warmup", type=NON_NEGATIVE, default=None, help=f"linear warmup steps ({default_text('warmup')})")
    p.add_argument(
        "--clip",
        type=float_range(0),
        default=None,
        help=f"gradient-norm clipping ({default_text('clip')}; 0 disables)",
    )
    p.add_argument(
        "--weight-decay",
        type=float_range(0),
        default=None,
        help=f"AdamW weight decay ({default_text('weight_decay')})",
    )
    p.add_argument(
        "--no-decay-vectors",
        dest="decay_vectors",
        action="store_false",
        default=None,
        help="exempt norms and biases from weight decay (the paper's training code decays every parameter)",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=["auto", "bf16", "fp32"],
        help="autocast precision (auto: bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument(
        "--vocab-size",
        type=int_range(2, 65535),
        default=None,
        help=f"SentencePiece pieces ({default_text('vocab_size')})",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="code|paper|PATH",
        help="code (default): train a lossless BPE tokenizer (whitespace kept, documents end with "
        "end-of-text); paper: train the paper's (SentencePiece defaults: NFKC, whitespace "
        "collapsed, dummy prefix; documents end with the text <STORY_SEP>); PATH: use this "
        "SentencePiece model (e.g. another run's tokenizer.model)",
    )
    p.add_argument(
        "--log-interval",
        type=POSITIVE,
        default=None,
        help=f"steps between metrics.jsonl records ({default_text('log_interval')})",
    )
    p.add_argument(
        "--eval-interval",
        type=POSITIVE,
        default=None,
        help=f"steps between validation runs ({default_text('eval_interval')})",
    )
    p.add_argument(
        "--eval-windows",
        type=NON_NEGATIVE,
        default=None,
        help=f"validation windows per evaluation ({default_text('eval_windows')}; 0: all)",
    )
    p.add_argument(
        "--ckpt-interval",
        type=POSITIVE,
        default=None,
        help=f"steps between checkpoints ({default_text('ckpt_interval')})",
    )
    p.add_argument(
        "--keep-checkpoints",
        type=POSITIVE,
        default=None,
        help=f"how many checkpoints to keep ({default_text('keep_checkpoints')})",
    )
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay each training step from CUDA graphs (default: whenever it applies, i.e. on a GPU "
        "without --compile or --activation-checkpointing; eager MoEUT steps wait on kernel "
        "launches). --cuda-graph insists (an error where it cannot apply); --no-cuda-graph runs "
        "eager. With --resume: switch it",
    )
    p.add_argument(
        "--activation-checkpointing", action="store_true", default=None, help="recompute activations in backward"
    )
    p.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        default=None,
        help="how several processes (torchrun) share the work: ddp (default; every process holds the "
        "whole model, its gradients and AdamW state) or fsdp (FSDP2: all three sharded over the "
        "processes, for models that do not fit one GPU that way; eager steps; checkpoints sharded, "
        "one file per process). Any checkpoint resumes in either mode. With --resume: switch it, or "
        "change the number of processes",
    )
    p.add_argument(
        "--fsdp-keep-gathered",
        action="store_true",
        default=None,
        help="with --parallel fsdp: the forward gathers each layer once and keeps it for its later "
        "applications (MoEUT applies a layer n_layers/group_size times) instead of gathering it at "
        "every application; the backward still gathers at each. About half the all-gathers; "
        "every layer's bf16 weights held from the forward into the backward",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="bitwise-reproducible GPU training (slower attention)",
    )
    p.add_argument("--cache-dir", default=None, help=f"tokenized data cache ({default_text('cache_dir')})")
    p.add_argument(
        "--no-tensorboard",
        action="store_true",
        default=None,
        help="write no TensorBoard events (metrics.jsonl is always written)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        default=None,
        help="no progress bar (the plain log lines of --print-interval still come)",
    )
    p.add_argument(
        "--print-interval",
        type=NON_NEGATIVE,
        default=None,
        metavar="N",
        help="print a plain line (step, loss, tokens/s, MFU on a known GPU, ETA) every N steps, with "
        "or without the bar (default 0: every 10 log intervals)",
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        default=None,
        help="also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works without network)",
    )
    p.add_argument(
        "--wandb-project", default=None, metavar="NAME", help=f"the W&B project ({default_text('wandb_project')})"
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="auto|cpu|cuda|cuda:N",
        help="where to train (default auto: the GPU when there is one)",
    )
    p.add_argument(
        "--sample-prompt",
        default=None,
        metavar="TEXT",
        help="prompt of the greedy sample printed when training ends (default: the first tokens of the "
        "validation data)",
    )
    p.add_argument(
        "--sample-tokens",
        type=NON_NEGATIVE,
        default=None,
        metavar="N",
        help="at every evaluation also print (and log) a greedy sample of N tokens from "
        "--sample-prompt (default 0: only the sample at the end)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="settings from a TOML, JSON or YAML file whose keys are this command's flags (e.g. "
        'steps = 2000, data = ["corpus/"], [set] att_n_experts = 1); flags on the command line win',
    )
    p.add_argument("--stop-after", type=NON_NEGATIVE, default=None, help=argparse.SUPPRESS)
    add_debug(p)
    p.set_defaults(func=cmd_train, parser=p)


def cmd_train(args) -> int:
    from moeut.models import parse_overrides
    from moeut.train.config import TrainConfig, default_cache_dir
    from moeut.train.distributed import end_distributed
    from moeut.train.loop import Diverged
    from moeut.train.trainer import config_of_run, train

    if args.config:
        merge_config(args, args.parser, args.config)
    given = {k for k, v in vars(args).items() if v is not None and k not in ("func", "command", "parser", "config")}
    if args.resume:
        refused = sorted(given - RESUME_FLAGS)
        if refused:
            names = ", ".join("--" + n.replace("_", "-").replace("overrides", "set") for n in refused)
            raise ValueError(
                f"--resume continues a run with the settings it was started with; these flags would "
                f"change it: {names}. Start a new run (--out) to change them"
            )
        cfg = config_of_run(args.resume)
        cfg.out = args.resume
        cfg.progress = not args.no_progress
        cfg.stop_after = args.stop_after or 0
        for name in ("print_interval", "wandb", "wandb_project"):  # how it reports, not what it trains
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        cfg.cache_dir = args.cache_dir or default_cache_dir()  # never a path read from the run
        cfg.strict_data = bool(args.strict_data)
        if args.steps is not None:  # a longer run: the trainer states how the schedule changes
            cfg.steps = args.steps
        if args.device is not None:
            cfg.device = args.device
        if args.cuda_graph is not None:
            cfg.cuda_graph = "on" if args.cuda_graph else "off"
        if args.parallel is not None:
            cfg.parallel = args.parallel
        run = lambda: train(cfg, resume=True, user_data=args.data, user_valid_data=args.valid_data)
    else:
        if args.tokenizer and args.tokenizer not in ("code", "paper") and args.vocab_size:
            raise ValueError("--vocab-size and --tokenizer PATH exclude each other: the tokenizer sets the vocabulary")
        if args.init_from and args.model:
            raise ValueError("--init-from takes the model from its source: leave out --model")
        names = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and k != "overrides" and v is not None})
        cfg.overrides = parse_overrides(args.overrides)
        cfg.data = args.data or []
        cfg.valid_data = args.valid_data or []
        cfg.cuda_graph = {None: "auto", True: "on", False: "off"}[args.cuda_graph]
        cfg.tensorboard = not args.no_tensorboard
        cfg.progress = not args.no_progress
        run = lambda: train(cfg)
    try:
        result = run()
    except Diverged as e:
        print(f"moeut train: {e}", file=sys.stderr)
        end_distributed()
        return 3
    end_distributed()  # the command owns the process group that `train` set up under torchrun
    if result.get("signal"):  # stopped by SIGINT / SIGTERM after its checkpoint: the shell's convention
        return 128 + result["signal"]
    if "val_ppl" in result:
        print(f"\nrun: {result['run_dir']}")
        print(
            f"validation perplexity: {result['val_ppl']:.2f}   (unigram model of the same data: {result['unigram_ppl']:.2f})"
        )
        if result.get("sample") is not None:
            print(f"greedy sample (KV cache):\n{result['sample']}")
    return 0


def read_config_file(path: str) -> dict:
    """A settings file as a table: TOML (.toml), JSON (.json) or YAML (.yaml, .yml; read with PyYAML's safe
    loader, which builds plain data only). ValueError naming the file and what is wrong."""
    import tomllib
    from pathlib import Path
    from moeut.files import FileProblem, parse_json, read_bytes

    suffix = Path(path).suffix.lower()
    if suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise ValueError(f"--config {path}: a settings file is .toml, .json, .yaml or .yml")
    try:
        data = read_bytes(path, 1 << 20)
        if suffix == ".json":
            table = parse_json(data, path, 1 << 20)
        elif suffix == ".toml":
            table = tomllib.loads(data.decode("utf-8"))
        else:
            try:
                import yaml
            except ImportError:
                raise ValueError(
                    f"--config {path}: YAML needs PyYAML (pip install pyyaml), or write TOML or JSON"
                ) from None
            table = yaml.safe_load(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, FileProblem) as e:
        raise ValueError(f"--config {path}: {e}") from None
    except Exception as e:  # yaml's parse errors (YAMLError) and its recursion on deep nesting
        if type(e).__module__.startswith("yaml") or isinstance(e, RecursionError):
            raise ValueError(f"--config {path}: not valid YAML ({str(e).splitlines()[0][:200]})") from None
        raise
    if not isinstance(table, dict):
        raise ValueError(f"--config {path}: the file must hold a table of settings, not a {type(table).__name__}")
    return table


def merge_config(args, parser: argparse.ArgumentParser, path: str) -> None:
    """Fill the flags not given on the command line from a settings file (`read_config_file`), parsed by
    the same parser (so every value gets the same checks); an unknown key is refused by name."""
    table = read_config_file(path)
    options = {a.dest: a for a in parser._actions if a.option_strings}
    argv = []
    for key, value in table.items():
        dest = key.replace("-", "_")
        dest = "overrides" if dest == "set" else dest
        if dest not in options or dest in ("config", "resume", "help", "stop_after"):
            raise ValueError(f"--config {path}: unknown setting {key!r} (its keys are the flags of moeut train)")
        flag, action = options[dest].option_strings[0], options[dest]
        if dest == "overrides":
            if not isinstance(value, dict):
                raise ValueError(f"--config {path}: 'set' must be a table of constructor arguments")
            argv += [a for k, v in value.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        elif isinstance(value, bool):
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else "--no-" + flag[2:])
            elif value:
                argv.append(flag)
        elif isinstance(value, list):
            argv += [a for v in value for a in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    try:
        from_file = parser.parse_args(argv)
    except SystemExit:
        raise ValueError(f"--config {path}: a value is not valid for its flag (see the message above)") from None
    for dest, value in vars(from_file).items():
        if getattr(args, dest, None) is None and value is not None:
            setattr(args, dest, value)


def add_sweep(sub):
    p = sub.add_parser(
        "sweep",
        help="train and evaluate a list of configurations into one table and plot",
        description="Run the [[runs]] of a sweep file (TOML: shared [train] flags, optional [eval] "
        "flags, and per-run flags and constructor arguments) through moeut train and moeut "
        "eval, one after the other, into OUT/<run name>; write OUT/sweep.json, sweep.md and "
        "sweep.png. Run it again after an interruption: finished runs are kept and an "
        "unfinished one is resumed. Examples: sweeps/*.toml (the paper's group-size and K "
        "sweeps, and tiny CPU twins).",
    )
    p.add_argument("file", metavar="SWEEP.toml", help="the sweep file (see sweeps/*.toml)")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where the runs (one directory each), sweep.json, sweep.md and sweep.png go",
    )
    add_debug(p)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from moeut.cli import main  # each run of the sweep is a `moeut train` command line
    from moeut.train.sweep import read_sweep, run_sweep

    read_sweep(args.file)  # the whole file checked before any training
    run_sweep(args.file, args.out, main)
    return 0


def add_plot(sub):
    p = sub.add_parser(
        "plot",
        help="draw runs' loss and validation perplexity into a PNG",
        description="Draw the training loss and the validation perplexity of one or several runs (from "
        "their metrics.jsonl) against training tokens and step time, into one PNG.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", default="runs.png", metavar="PNG", help="the image to write (default runs.png)")
    p.add_argument(
        "--x",
        default="tokens,time",
        metavar="AXES",
        help="x axes, one row each: tokens, time (step seconds), wall (seconds since launch), step "
        "(default tokens,time)",
    )
    add_debug(p)
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from moeut.train.plot import plot_runs

    out = plot_runs(args.runs, args.out, [a for a in args.x.split(",") if a])
    print(f"wrote {out}")
    return 0
