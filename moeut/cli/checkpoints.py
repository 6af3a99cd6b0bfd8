"""`moeut migrate`, `moeut convert-checkpoint`, `moeut import-official` and `moeut export`: checkpoints
in, between layouts and out."""

from __future__ import annotations

import argparse
import sys

from moeut.cli.common import NON_NEGATIVE, add_debug, int_range


def add_migrate(sub):
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
    add_debug(p)
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args) -> int:
    from pathlib import Path
    from moeut.train.legacy import migrate_run

    run = Path(args.run)
    migrate_run(run)
    print(f"{run}: converted; resume with: moeut train --resume {run}")
    return 0


def add_convert_checkpoint(sub):
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
        type=int_range(1, 4096),
        default=1,
        metavar="N",
        help="number of shard files for --layout sharded, 1 to 4096 (default 1)",
    )
    p.add_argument(
        "--step", type=NON_NEGATIVE, metavar="N", help="the checkpoint of this step (default: the newest usable)"
    )
    add_debug(p)
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


def add_import_official(sub):
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
    add_debug(p)
    p.set_defaults(func=cmd_import_official)


def cmd_import_official(args) -> int:
    from moeut.train.official import import_official

    out = import_official(args.checkpoint, args.tokenizer, args.out)
    print(f"evaluate it with: moeut eval --checkpoint {out} --tasks all --data-dir DIR")
    return 0


def add_export(sub):
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
    add_debug(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ValueError("export needs transformers: pip install 'moeut[hf]' (or pip install transformers)")
    from moeut.hf.export import export_run

    out = export_run(args.checkpoint, args.out, args.eval)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) after `import moeut`")
    return 0
