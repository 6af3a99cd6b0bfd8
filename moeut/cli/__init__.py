"""The `moeut` command: `moeut train`, `moeut generate`, `moeut eval`, `moeut export`, `moeut models` and more.

Also `python -m moeut ...` and, for several processes, `torchrun --nproc_per_node=N -m moeut train ...`.
"""

from __future__ import annotations

import argparse
import sys

from moeut.cli.checkpoints import add_convert_checkpoint, add_export, add_import_official, add_migrate
from moeut.cli.train import add_plot, add_sweep, add_train
from moeut.cli.use import add_analyze, add_eval, add_generate, add_models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moeut",
        description="MoEUT: Mixture-of-Experts Universal Transformers. "
        "Train, sample from and evaluate MoEUT and dense language models.",
    )
    p.add_argument("--version", action="version", version=f"moeut {_version()}", help="print moeut's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train(sub)
    add_generate(sub)
    add_eval(sub)
    add_models(sub)
    add_migrate(sub)
    add_convert_checkpoint(sub)
    add_import_official(sub)
    add_analyze(sub)
    add_sweep(sub)
    add_export(sub)
    add_plot(sub)
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
