"""The `moeut` command: `moeut train`, `moeut generate`, `moeut eval`, `moeut export`, `moeut models` and more.

Also `python -m moeut ...` and, for several processes, `torchrun --nproc_per_node=N -m moeut train ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from typing import Optional

from moeut import profiles
from moeut.train.config import default_text, recipe_text

EPILOG_TRAIN = """examples:
  moeut train                                   # tiny MoEUT on the Python standard library, CPU defaults
  moeut train --model moeut-244M --data corpus/ --steps 100000 --out runs/244m
  moeut train --model moeut-tiny --set d_model=256 --set ff_n_experts=64
  moeut train --resume runs/244m                # continue after a stop (SIGINT/SIGTERM save a checkpoint)
  torchrun --nproc_per_node=8 -m moeut train --model moeut-1B --data corpus/
"""


def _int_range(lo: int, hi: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"must be an integer from {lo} to {hi}, got {v}"
                if hi is not None
                else f"must be an integer >= {lo}, got {v}"
            )
        return v

    return parse


def _float_range(lo: float, hi: float = math.inf, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi):
            bound = f"> {lo}" if lo_open else f">= {lo}"
            raise argparse.ArgumentTypeError(
                f"must be a finite number {bound}" + (f" and <= {hi}" if hi < math.inf else "") + f", got {text}"
            )
        return v

    return parse


POSITIVE = _int_range(1)
NON_NEGATIVE = _int_range(0)

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


def _add_train(sub):
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
        type=_float_range(0, 0.5),
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
        "--context", type=_int_range(1, 1 << 20), default=None, help=f"tokens per sequence ({default_text('context')})"
    )
    p.add_argument(
        "--lr", type=_float_range(0, lo_open=True), default=None, help=f"peak learning rate ({default_text('lr')})"
    )
    p.add_argument("--warmup", type=NON_NEGATIVE, default=None, help=f"linear warmup steps ({default_text('warmup')})")
    p.add_argument(
        "--clip",
        type=_float_range(0),
        default=None,
        help=f"gradient-norm clipping ({default_text('clip')}; 0 disables)",
    )
    p.add_argument(
        "--weight-decay",
        type=_float_range(0),
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
        type=_int_range(2, 65535),
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
    _add_debug(p)
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


def _add_migrate(sub):
    p = sub.add_parser(
        "migrate",
        help="convert a run's checkpoints from the earlier pickle format, once",
        description="Convert the checkpoints/step_*.pt files of a run you trust to the current "
        "format (safetensors + JSON). The old files are read with PyTorch's restricted "
        "unpickler, which builds tensors and plain data only and refuses anything else, "
        "so a file carrying code is rejected without running it. The originals move "
        "to checkpoints/legacy/.",
    )
    p.add_argument("run", metavar="RUN", help="run directory")
    _add_debug(p)
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args) -> int:
    from pathlib import Path
    from moeut.train.legacy import migrate_run

    run = Path(args.run)
    migrate_run(run)
    print(f"{run}: converted; resume with: moeut train --resume {run}")
    return 0


def _add_convert_checkpoint(sub):
    p = sub.add_parser(
        "convert-checkpoint",
        help="rewrite a checkpoint in the single-file or the sharded layout",
        description="A checkpoint of an FSDP run is sharded (one safetensors file per process, "
        "written through PyTorch Distributed Checkpoint); other runs write one "
        "model.safetensors. Both resume under any --parallel mode and any number of "
        "processes, and evaluate and generate alike; convert to hand a run to a tool "
        "that reads model.safetensors, or to split a large one. The checkpoint is "
        "verified first and replaced atomically: the old files stay until the new ones "
        "are written and verified.",
    )
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--layout", required=True, choices=["single", "sharded"], help="the layout to write")
    p.add_argument(
        "--shards",
        type=_int_range(1, 4096),
        default=1,
        metavar="N",
        help="number of shard files for --layout sharded, 1 to 4096 (default 1)",
    )
    p.add_argument(
        "--step", type=NON_NEGATIVE, metavar="N", help="the checkpoint of this step (default: the newest usable)"
    )
    _add_debug(p)
    p.set_defaults(func=cmd_convert_checkpoint)


def cmd_convert_checkpoint(args) -> int:
    from pathlib import Path
    import torch
    from moeut.models import build_model, check_model_size, model_kwargs_of_run
    from moeut.train import checkpoint as ckpt_lib
    from moeut.train.run_dir import RunLock, check_existing_run_dir, read_run_json
    from moeut.train.loop import optimizer_parameter_names

    run = Path(args.run)
    check_existing_run_dir(run, writable=True)
    with RunLock(run):
        meta = read_run_json(run)
        if not isinstance(meta.get("vocab_size"), int):
            raise ckpt_lib.CheckpointError(f"{run / 'run.json'} records no vocab_size")
        kwargs = model_kwargs_of_run(meta)
        check_model_size(meta["model"], meta["vocab_size"], kwargs)
        with torch.device("meta"):
            model = build_model(meta["model"], meta["vocab_size"], kwargs)
        spec = ckpt_lib.ModelSpec.of(model, optimizer_parameter_names(model))
        if args.step is None:
            found = ckpt_lib.newest_usable_checkpoint(run, "verify", spec, warn=lambda m: print(m, file=sys.stderr))
            if found is None:
                raise ckpt_lib.CheckpointError(f"{run} has no checkpoint")
            path = found.path
        else:
            path = ckpt_lib.checkpoint_dir(run) / ckpt_lib.checkpoint_name(args.step)
        ckpt_lib.convert_checkpoint(run, path, args.layout, spec, args.shards)
    return 0


def _add_generate(sub):
    p = sub.add_parser(
        "generate",
        help="sample text from a trained run",
        description="Generate text with the KV cache. Greedy when --temperature is 0.",
    )
    _add_run_argument(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable: a batch of prompts)")
    g.add_argument("--prompt-file", help="UTF-8 file with one prompt per line")
    p.add_argument("--max-new-tokens", type=NON_NEGATIVE, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=_float_range(0), default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument(
        "--top-p",
        type=_float_range(0, 1, lo_open=True),
        default=1.0,
        help="nucleus sampling threshold in (0, 1] (default 1: off)",
    )
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="sampling seed: the same seed repeats its text")
    p.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|cuda:N",
        help="where to run (default auto: the GPU when there is one)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step (pays a one-time compile; for long outputs)",
    )
    _add_debug(p)
    p.set_defaults(func=cmd_generate)


def _add_run_argument(p) -> None:
    """The run a command reads: the first positional argument, as in every other command (`--checkpoint`
    is the same, for scripts written before)."""
    p.add_argument(
        "run",
        nargs="?",
        metavar="RUN",
        default=None,
        help="run directory (its newest usable checkpoint) or one checkpoint directory in it",
    )
    p.add_argument("--checkpoint", default=None, metavar="RUN", help="the same as RUN (kept for older scripts)")


def _run_of(args) -> str:
    if args.run and args.checkpoint and args.run != args.checkpoint:
        raise ValueError(f"RUN {args.run} and --checkpoint {args.checkpoint} name two runs: give one")
    run = args.run or args.checkpoint
    if not run:
        raise ValueError("give the run to read: moeut " + args.command + " RUN ...")
    return run


def _device(name: str) -> str:
    """--device: auto (cuda where there is a GPU), cpu, cuda or cuda:N; ValueError naming the flag."""
    import torch
    from moeut.train.trainer import check_device_name

    check_device_name(name)
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _read_prompts(path: str):
    from moeut.evaluate import read_text_file

    text = read_text_file(path)
    prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path} holds no prompt (one per non-empty line)")
    return prompts


def cmd_generate(args) -> int:
    from moeut.generate import generate, kv_cache_bytes
    from moeut.models import device_memory
    from moeut.runs import load_run

    prompts = _read_prompts(args.prompt_file) if args.prompt_file else [p.replace("\\n", "\n") for p in args.prompt]
    device = _device(args.device)
    model, tok, _ = load_run(_run_of(args), device)
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


def _add_eval(sub):
    from moeut.evaluate import TASKS

    p = sub.add_parser(
        "eval",
        help="perplexity and the paper's zero-shot tasks",
        description="Evaluate a trained run: perplexity on --text and the paper's zero-shot tasks "
        f"({', '.join(TASKS)}), scored as in the paper. See README for the data layout.",
    )
    _add_run_argument(p)
    p.add_argument("--tasks", default="", help=f"comma list of: {', '.join(TASKS)}, or 'all'")
    p.add_argument("--data-dir", default="", help="directory laid out like lambada/ blimp/ hellaswag/ piqa/ arc/ cbt/")
    p.add_argument("--text", action="append", default=[], help="UTF-8 text file(s) for perplexity (--context windows)")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0, help="at most N items per task (0: all)")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="sequences scored at once (default 32)")
    p.add_argument(
        "--context",
        type=_int_range(1, 1 << 20),
        default=None,
        help="window for --text perplexity (default: the context the run was trained with)",
    )
    p.add_argument(
        "--json",
        help="write the scores (with standard errors), item counts, the checkpoint and its "
        "step, --limit and the protocol here",
    )
    p.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|cuda:N",
        help="where to run (default auto: the GPU when there is one)",
    )
    _add_debug(p)
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

    model, tok, meta = load_run(_run_of(args), _device(args.device))
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


def _add_models(sub):
    p = sub.add_parser("models", help="list model names and their parameter counts")
    p.add_argument(
        "--vocab-size",
        type=_int_range(2, 65535),
        default=8000,
        help="the vocabulary the parameter counts assume (default 8000, the paper's)",
    )
    p.add_argument(
        "--context",
        type=_int_range(1, 1 << 20),
        default=1024,
        help="the context the FLOPs per token assume (default 1024, the paper's)",
    )
    _add_debug(p)
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


def _add_import_official(sub):
    p = sub.add_parser(
        "import-official",
        help="turn one of the paper authors' checkpoints into a run",
        description="Convert a checkpoint of the paper's training code (RobertCsordas/"
        "moeut_training_code; e.g. checkpoints/C4_44M.ckpt of the Hugging Face repository "
        "robertcsordas/moeut_training_checkpoints) and its SentencePiece tokenizer (that "
        "repository's cache/) into a run directory for `moeut eval` and `moeut generate`. "
        "The file is read with PyTorch's restricted unpickler (tensors and plain data "
        "only; nothing in it runs). A setting or weight moeut's models do not have is "
        "named and refused.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="the training code's checkpoint file")
    p.add_argument(
        "--tokenizer", required=True, metavar="MODEL", help="the SentencePiece .model the checkpoint was trained with"
    )
    p.add_argument("--out", required=True, metavar="RUN", help="new run directory to create")
    _add_debug(p)
    p.set_defaults(func=cmd_import_official)


def cmd_import_official(args) -> int:
    from moeut.train.official import import_official

    out = import_official(args.checkpoint, args.tokenizer, args.out)
    print(f"evaluate it with: moeut eval --checkpoint {out} --tasks all --data-dir DIR")
    return 0


def _add_analyze(sub):
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
    p.add_argument("--tokens", type=_int_range(2, 1 << 24), default=16384, help="tokens to analyze (default 16384)")
    p.add_argument(
        "--compare", default=None, metavar="RUN", help="a second run (e.g. the dense baseline) to draw beside"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where the figures and analysis.json go")
    p.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|cuda:N",
        help="where to run (default auto: the GPU when there is one)",
    )
    _add_debug(p)
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
    device = _device(args.device)
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


def _add_sweep(sub):
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
    _add_debug(p)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from moeut.train.sweep import read_sweep, run_sweep

    read_sweep(args.file)  # the whole file checked before any training
    run_sweep(args.file, args.out, main)
    return 0


def _add_export(sub):
    p = sub.add_parser(
        "export",
        help="a run as a Hugging Face transformers model directory",
        description="Write a run's newest intact checkpoint as a Hugging Face model directory "
        "(config.json, model.safetensors, the tokenizer, generation_config.json and a "
        "model card). It loads with AutoModelForCausalLM.from_pretrained(DIR) after "
        "`import moeut`, or with trust_remote_code=True where moeut is installed, and "
        "evaluates with `lm_eval --model hf`. Needs transformers (pip install moeut[hf]).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  moeut export runs/44m --out hf/44m --eval runs/44m-eval.json\n"
        "  lm_eval --model hf --model_args pretrained=hf/44m,trust_remote_code=True "
        "--tasks lambada_openai",
    )
    p.add_argument(
        "checkpoint",
        metavar="RUN",
        help="run directory (its newest intact checkpoint) or one checkpoint directory in it",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the model directory to create (new or empty)")
    p.add_argument("--eval", default=None, metavar="JSON", help="scores of `moeut eval --json` for the model card")
    _add_debug(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ValueError("export needs transformers: pip install 'moeut[hf]' (or pip install transformers)")
    from moeut.hf.export import export_run

    out = export_run(args.checkpoint, args.out, args.eval)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) after `import moeut`")
    return 0


def _add_plot(sub):
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
    _add_debug(p)
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from moeut.train.plot import plot_runs

    out = plot_runs(args.runs, args.out, [a for a in args.x.split(",") if a])
    print(f"wrote {out}")
    return 0


def _add_debug(p) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        default=None,
        help="show the full traceback of an error (default: one line naming the problem)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moeut",
        description="MoEUT: Mixture-of-Experts Universal Transformers. "
        "Train, sample from and evaluate MoEUT and dense language models.",
    )
    p.add_argument("--version", action="version", version=f"moeut {_version()}", help="print moeut's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_models(sub)
    _add_migrate(sub)
    _add_convert_checkpoint(sub)
    _add_import_official(sub)
    _add_analyze(sub)
    _add_sweep(sub)
    _add_export(sub)
    _add_plot(sub)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moeut")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv=None) -> int:
    """Errors a user can fix (a bad flag or file, a damaged or foreign checkpoint, a busy run, a full
    disk) print one line naming the problem and exit with status 2; --debug shows the traceback.
    Anything else is a bug and keeps its traceback."""
    from moeut.train.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"moeut {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moeut models | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, CheckpointError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in str(e):
            message = f"{e.filename}: {e.strerror or e}"
        else:
            message = str(e)
        print(f"moeut {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
