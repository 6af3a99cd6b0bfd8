"""Argument types and arguments shared by the subcommands."""

from __future__ import annotations

import argparse
import math
from typing import Optional


def int_range(lo: int, hi: Optional[int] = None):
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


def float_range(lo: float, hi: float = math.inf, lo_open: bool = False):
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


POSITIVE = int_range(1)


NON_NEGATIVE = int_range(0)


def add_debug(p) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        default=None,
        help="show the full traceback of an error (default: one line naming the problem)",
    )


def add_run_argument(p) -> None:
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


def run_of(args) -> str:
    if args.run and args.checkpoint and args.run != args.checkpoint:
        raise ValueError(f"RUN {args.run} and --checkpoint {args.checkpoint} name two runs: give one")
    run = args.run or args.checkpoint
    if not run:
        raise ValueError("give the run to read: moeut " + args.command + " RUN ...")
    return run


def device_argument(name: str) -> str:
    """--device: auto (cuda where there is a GPU), cpu, cuda or cuda:N; ValueError naming the flag."""
    import torch
    from moeut.train.trainer import check_device_name

    check_device_name(name)
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def read_prompts(path: str):
    from moeut.evaluate import read_text_file

    text = read_text_file(path)
    prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path} holds no prompt (one per non-empty line)")
    return prompts


def add_device_argument(p) -> None:
    p.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|cuda:N",
        help="where to run (default auto: the GPU when there is one)",
    )
