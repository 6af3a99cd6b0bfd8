"""`moeut train`: the paper's training recipe on one CPU, one GPU or many (DDP, or FSDP2: `fsdp`).

AdamW (lr 2.5e-4, betas 0.9/0.999, weight decay 0.01), linear warmup then cosine decay to 10% of
the peak, gradient clipping, batch 64 x 1024, bf16 autocast on GPU, reg_loss added to the loss.
Everything a run needs to continue lives in its checkpoints; batches depend only on (seed, step).

What a start does, in order, so that a mistake costs nothing and leaves nothing behind:
  1. every setting is checked (`validate_config`) and the model is built on the meta device, which
     checks its arguments and its size against the memory there is, allocating nothing;
  2. the data are read, the tokenizer trained in memory and the data tokenized into the shared,
     content-addressed cache, which is checked to hold at least one batch;
  3. only then is the run directory created, locked (`run_dir.RunLock`) and written.
A resume locks the run first, removes what interrupted writers left, takes the newest checkpoint
that verifies (reporting and setting aside damaged ones), and cuts metrics.jsonl back to its step.
Training stops, without saving, at the first non-finite loss or gradient norm: the checkpoints on
disk all hold finite states, and none of them is rotated out by a diverged run.

This module starts and reopens runs; the settings and their defaults are `config.py`, the process group
`distributed.py`, the loop itself (set up, resume, steps, saves) `loop.py`, and what a run measures
and logs `monitor.py`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from moeut.files import write_json_atomic
from moeut.models import build_model, check_memory, check_model_size, model_kwargs, model_kwargs_of_run
from moeut.train import checkpoint as ckpt_lib
from moeut.train.checkpoint import ModelSpec
from moeut.train.config import MAX_VOCAB, TrainConfig, check_types, lr_lambda, resolve_defaults, validate_config
from moeut.train.data import CACHE_FORMAT, Batches, Corpus, tokenize_corpus
from moeut.train.distributed import barrier, on_rank0, setup_distributed
from moeut.train.loop import optimizer_parameter_names, set_up, step_graph_blockers, train_steps
from moeut.train.monitor import import_wandb, startup_summary
from moeut.train.run_dir import (
    RunLock,
    check_existing_run_dir,
    check_new_run_dir,
    read_json_record,
    read_run_json,
    truncate_metrics,
)
from moeut.train.tokenizer import (
    KINDS,
    Tokenizer,
    load_tokenizer,
    run_tokenizer,
    save_tokenizer,
    train_paper_tokenizer,
    train_tokenizer,
)

# ------------------------------------------------------------------------------------------------
# Data: a new run's (built before its directory exists) and a resumed run's (from the cache).
# ------------------------------------------------------------------------------------------------

_KEY = re.compile(r"^[0-9a-f]{24}$")


def build_data(cfg: TrainConfig, tok: Optional[Tokenizer], say: Callable[[str], None] = print):
    """(tokenizer, cache key, train docs count, valid docs count) for --data; the tokenizer is trained
    in memory when `tok` is None. The tokenized data land in the shared cache under their key. The
    corpus streams through (see `data`): memory does not grow with its size."""
    corpus = Corpus(
        cfg.data,
        strict=cfg.strict_data,
        text_field=cfg.text_field,
        valid_sources=cfg.valid_data,
        valid_fraction=cfg.valid_fraction,
        decode_errors=cfg.decode_errors,
    )
    scan = corpus.scan(warn=say)
    say(scan.describe())
    if tok is None:
        kind = cfg.tokenizer or "code"
        say(f"training a {cfg.vocab_size}-piece {kind} tokenizer on {scan.n_train} documents")
        if kind == "paper":
            long = [0]

            def counted(texts):
                for t in texts:
                    long[0] += len(t.encode("utf-8")) + len("<STORY_SEP>") > 4192
                    yield t

            tok = train_paper_tokenizer(counted(corpus.train_texts(scan)), cfg.vocab_size)
            if long[0]:
                say(
                    f"the paper tokenizer learns from documents of at most 4192 bytes (SentencePiece's default, "
                    f"as in the training code): {long[0]} of {scan.n_train} are longer and are only tokenized"
                )
        else:
            tok = train_tokenizer(corpus.train_texts(scan), cfg.vocab_size, seed=cfg.seed)
    key = scan.cache_key(tok.model_bytes())
    tokenize_corpus(corpus, scan, tok, Path(cfg.cache_dir) / key, cfg.progress)
    return tok, key, scan.n_train, scan.n_valid


def open_tokens(cache_dir: str, key: str):
    cache = Path(cache_dir) / key
    train = np.memmap(cache / "train.bin", dtype=np.uint16, mode="r")
    valid = np.memmap(cache / "valid.bin", dtype=np.uint16, mode="r")
    return train, valid


def check_tokens(cfg: TrainConfig, train_tokens, valid_tokens, vocab: int) -> None:
    Batches(train_tokens, cfg.context, cfg.batch_size, cfg.seed)  # raises if not one window fits
    if len(valid_tokens) < 2:
        raise ValueError("the validation split has fewer than 2 tokens: add data")
    if len(train_tokens) and int(np.max(train_tokens)) >= vocab:
        raise ValueError(f"the cached tokens do not fit the tokenizer's {vocab} pieces (a damaged cache?)")


def resume_data(
    cfg: TrainConfig,
    run_dir: Path,
    user_data: Optional[List[str]],
    say: Callable[[str], None],
    user_valid_data: Optional[List[str]] = None,
):
    """A resumed run's tokens: from the cache (the user's --cache-dir or the default, never a path
    read from the run) under the key the run recorded; else rebuilt from the user's --data, or from
    the default corpus if the run used it. Paths recorded in the run are not followed."""
    record = run_dir / "data.json"
    try:
        recorded = read_json_record(record)
        key, recorded_format = recorded.get("key"), recorded.get("format")
    except (OSError, ckpt_lib.CheckpointError, AttributeError):
        key = recorded_format = None
    tok = run_tokenizer(run_dir)
    if (
        isinstance(key, str)
        and _KEY.match(key)
        and all((Path(cfg.cache_dir) / key / f).is_file() for f in ("train.bin", "valid.bin"))
    ):
        return tok, key
    if user_data is None and cfg.data:
        raise ValueError(
            f"the tokenized data of {run_dir} are not in the cache {cfg.cache_dir}; pass --cache-dir "
            f"where they are, or --data with the run's sources (it recorded {cfg.data}) to rebuild them"
        )
    if cfg.valid_data and not user_valid_data:
        raise ValueError(
            f"the tokenized data of {run_dir} are not in the cache {cfg.cache_dir}; to rebuild them pass "
            f"--valid-data with the run's validation sources too (it recorded {cfg.valid_data})"
        )
    if user_data is not None:
        cfg.data = list(user_data)
    if user_valid_data:
        cfg.valid_data = list(user_valid_data)
    _, new_key, n_train, n_valid = build_data(cfg, tok, say)
    if key is not None and new_key != key:
        if recorded_format == CACHE_FORMAT:
            say(
                "warning: the data under --data are not those this run started on (their cache is gone): "
                "resuming on the new data"
            )
        else:
            say(
                "the token cache was rebuilt in the current format (the run's cache predates it); if --data "
                "changed too, the run continues on the new data"
            )
    write_json_atomic(
        record, {"key": new_key, "format": CACHE_FORMAT, "train_documents": n_train, "valid_documents": n_valid}
    )
    return tok, new_key


# ------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------


def config_of_run(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was started with (what `--resume` continues). Read as data: unknown keys
    are ignored, the values are checked by `validate_config` before use, and the paths it records
    are not followed: `cache_dir` is reset to the default (set your own), and `data` is only shown
    to the user unless they pass the sources again (`train(..., user_data=...)`)."""
    check_existing_run_dir(Path(run_dir), writable=False)
    meta = read_run_json(Path(run_dir))
    if "imported_from" in meta:
        raise ValueError(
            f"{run_dir} was imported from {meta['imported_from'].get('checkpoint')}: it has no optimizer "
            f"state or training data to resume from; use it with `moeut eval` and `moeut generate`"
        )
    saved = meta.get("config", {})
    known = {f.name for f in fields(TrainConfig)}
    saved = dict(saved)
    if isinstance(saved.get("cuda_graph"), bool):  # runs written before the setting had an "auto"
        saved["cuda_graph"] = "on" if saved["cuda_graph"] else "auto"
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    cfg.overrides = {**model_kwargs_of_run(meta), **(cfg.overrides or {})}
    cfg.out = str(run_dir)
    cfg.cache_dir = ""
    return cfg


def _start_new_run(cfg: TrainConfig, run_dir: Path, kwargs: Dict[str, Any], device, say, source=None) -> RunLock:
    """Checks, data and tokenizer first; then the directory, locked, with run.json, tokenizer.model
    and data.json. On failure, exactly what this start created is removed: never a file another
    process wrote (two starts racing for one --out: the loser leaves the winner's run as it was).
    `source`: --init-from's (its tokenizer unless --tokenizer; its weights' shapes checked here)."""
    check_new_run_dir(run_dir)
    given = None
    if cfg.tokenizer and cfg.tokenizer not in KINDS:
        given = load_tokenizer(cfg.tokenizer)
        cfg.vocab_size = given.vocab_size
    elif source is not None:
        if cfg.tokenizer:
            raise ValueError(
                f"--init-from: --tokenizer {cfg.tokenizer} would train a new tokenizer, whose pieces "
                "the weights do not know; give a tokenizer file of the same vocabulary, or none"
            )
        given = source.tokenizer
        cfg.vocab_size = given.vocab_size
    check_model_size(cfg.model, cfg.vocab_size, kwargs)
    with torch.device("meta"):
        meta_model = build_model(cfg.model, cfg.vocab_size, kwargs)
    if source is not None:
        try:
            ckpt_lib.check_compatible(ModelSpec.of(meta_model).tensors, source.shapes, str(source.path))
        except ckpt_lib.CheckpointError as e:
            raise ValueError(f"--init-from: {e} (the tokenizer and --set must keep every weight's shape)") from None
    check_memory(meta_model, device, "train")
    tok, key, n_train, n_valid = build_data(cfg, given, say)
    check_tokens(cfg, *open_tokens(cfg.cache_dir, key), tok.vocab_size)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
        created_dir = True
    except FileExistsError:
        created_dir = False
    lock, written = None, []
    try:
        lock = RunLock(run_dir, record=False)
        check_new_run_dir(run_dir)  # again, under the lock: another start may have won the race
        lock.record_holder()
        meta = {
            "model": cfg.model,
            "model_kwargs": kwargs,
            "vocab_size": tok.vocab_size,
            "config": asdict(cfg),
            "moeut_version": _version(),
            **({"init_from": source.describe()} if source is not None else {}),
        }
        written += [
            run_dir / "run.json",
            run_dir / "tokenizer.model",
            run_dir / "tokenizer.json",
            run_dir / "tokenizer_config.json",
            run_dir / "data.json",
        ]
        write_json_atomic(run_dir / "run.json", meta)
        save_tokenizer(tok, run_dir)
        write_json_atomic(
            run_dir / "data.json",
            {"key": key, "format": CACHE_FORMAT, "train_documents": n_train, "valid_documents": n_valid},
        )
        return lock
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if lock is not None:
            lock.remove_and_release()
        if created_dir:
            try:
                run_dir.rmdir()  # only if nothing else is in it
            except OSError:
                pass
        raise


def _version() -> str:
    """The installed moeut's version (recorded in run.json)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moeut")
    except PackageNotFoundError:
        return "unknown"


def _open_run_for_resume(
    cfg: TrainConfig, run_dir: Path, kwargs: Dict[str, Any], user_data, device, say, user_valid_data=None
):
    """(lock, checkpoint or None, run.json to write once the checkpoint loaded or None): the run locked,
    leftovers removed, the newest usable checkpoint read (`checkpoint_reader`: every newer one named
    with its fault and set aside), the data found, metrics cut back to its step. Nothing the run holds
    is rewritten before the checkpoint was found usable."""
    check_existing_run_dir(run_dir, writable=True)
    lock = RunLock(run_dir)
    try:
        for p in ckpt_lib.remove_stale_temporaries(run_dir):
            say(f"removed {p.name}, left by an interrupted write")
        meta = read_run_json(run_dir)
        vocab = meta.get("vocab_size")
        if isinstance(vocab, bool) or not isinstance(vocab, int) or not 2 <= vocab <= MAX_VOCAB:
            raise ckpt_lib.CheckpointError(f"{run_dir / 'run.json'}: vocab_size {vocab!r} is out of range")
        check_model_size(cfg.model, vocab, kwargs)
        with torch.device("meta"):
            meta_model = build_model(cfg.model, vocab, kwargs)
        check_memory(meta_model, device, "train")
        spec = ModelSpec.of(meta_model, optimizer_parameter_names(meta_model))
        tok, _ = resume_data(cfg, run_dir, user_data, say, user_valid_data)
        if tok.vocab_size != vocab:
            raise ckpt_lib.CheckpointError(
                f"{run_dir}: its tokenizer has {tok.vocab_size} pieces, run.json says {vocab}"
            )
        part = "training" if cfg.parallel == "fsdp" else "all"
        found = ckpt_lib.newest_usable_checkpoint(run_dir, part, spec, warn=say)
        step = found.step if found is not None else 0
        for newer in [p for p in ckpt_lib.list_checkpoints(run_dir) if ckpt_lib.checkpoint_step(p) > step]:
            say(f"moved the unusable checkpoint {newer.name} aside to {ckpt_lib.quarantine(newer).name}")
        new_meta = _extended_schedule(cfg, meta, step, say)
        dropped = truncate_metrics(run_dir, step)
        if dropped:
            say(f"metrics.jsonl: dropped {dropped} records after step {step} (they are logged again)")
        if found is None and meta.get("init_from"):
            raise ValueError(
                f"{run_dir} started from {meta['init_from'].get('path')} and has no checkpoint yet: "
                "start it again (--init-from) rather than resume it from random weights"
            )
        if found is None:
            say(f"{run_dir} has no checkpoint yet: starting it from step 0")
        return lock, found, new_meta
    except BaseException:
        lock.release()
        raise


def _extended_schedule(cfg: TrainConfig, meta: Dict[str, Any], step: int, say) -> Optional[Dict[str, Any]]:
    """`--resume --steps N` with N other than the run's length: a longer run, stated; returns the run.json
    to record it in (written once the checkpoint has loaded), or None. The cosine schedule is recomputed
    over the new length, so the learning rate at the checkpoint's step moves to where the longer cosine
    has it."""
    started = meta.get("config", {}).get("steps")
    if not isinstance(started, int) or cfg.steps == started:
        return None
    if cfg.steps <= step:
        raise ValueError(f"--steps {cfg.steps}: the run is already at step {step}; give more steps to extend it")
    before = lr_lambda(replace(cfg, steps=started))(step) * cfg.lr
    after = lr_lambda(cfg)(step) * cfg.lr
    say(
        f"extending the run from {started} to {cfg.steps} steps: the cosine schedule now spans {cfg.steps} steps, "
        f"so the learning rate at step {step} goes from {before:.3g} to {after:.3g}"
    )
    return {**meta, "config": {**meta["config"], "steps": cfg.steps}}


def train(
    cfg: TrainConfig,
    resume: bool = False,
    user_data: Optional[List[str]] = None,
    user_valid_data: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Train (or, with resume=True, continue the run in cfg.out). Returns final metrics for rank 0.
    `user_data`, `user_valid_data`: --data and --valid-data given with --resume (used only if the run's
    tokenized data are not cached)."""
    launched = time.perf_counter()
    check_device_name(cfg.device)
    rank, world, device = setup_distributed(cfg.device, group_of_one=cfg.parallel == "fsdp")
    say = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    check_types(cfg)
    source = None
    if cfg.init_from and not resume:  # the model, its arguments and the tokenizer come from the source
        from moeut.train.init_from import open_source

        source = open_source(cfg.init_from, say)
        cfg.model, cfg.overrides = source.model, {**source.kwargs, **(cfg.overrides or {})}
    cfg = resolve_defaults(cfg, device.type == "cuda")
    validate_config(cfg, world)
    if cfg.wandb and rank == 0:  # before anything is read or written, not when the loop starts
        import_wandb()
    kwargs = model_kwargs(cfg.model, cfg.overrides)
    run_dir = Path(cfg.out)
    per_rank = cfg.batch_size // world
    accum = per_rank // (cfg.micro_batch_size or per_rank)
    graph_blockers = step_graph_blockers(cfg, device)
    if cfg.cuda_graph == "on" and graph_blockers:
        raise ValueError("--cuda-graph needs " + "; ".join(graph_blockers))
    if cfg.cuda_graph != "off" and not graph_blockers:
        mode = "CUDA graphs (each step replayed whole; --no-cuda-graph runs it eagerly)"
    else:
        mode = (
            "eager ("
            + ("--no-cuda-graph" if cfg.cuda_graph == "off" else "CUDA graphs need " + "; ".join(graph_blockers))
            + ")"
        )
    if cfg.parallel == "fsdp":
        mode += (
            f", FSDP2 over {world} process{'es' if world > 1 else ''} (parameters, gradients and AdamW state "
            f"sharded; checkpoints one file per process{', layers kept gathered in the forward' if cfg.fsdp_keep_gathered else ''})"
        )
    elif world > 1:
        mode += f", {world} processes averaging one flat gradient buffer per step"
    say(f"step mode: {mode}")

    check_model_size(cfg.model, cfg.vocab_size, kwargs)
    new_meta = None
    if resume:
        lock, resume_from, new_meta = on_rank0(
            lambda: _open_run_for_resume(cfg, run_dir, kwargs, user_data, device, say, user_valid_data),
            rank,
            world,
            device,
        ) or (None, None, None)
    else:
        lock, resume_from = (
            on_rank0(lambda: _start_new_run(cfg, run_dir, kwargs, device, say, source), rank, world, device),
            None,
        )
    barrier(world)
    if resume and rank != 0:  # rank 0 found it usable and set aside every newer one; each rank reads it
        resume_from = (ckpt_lib.list_checkpoints(run_dir) or [None])[-1]
    try:
        return _train_locked(
            cfg, run_dir, kwargs, rank, world, device, accum, resume_from, new_meta, say, launched, source
        )
    finally:
        if lock is not None:
            lock.release()


def check_device_name(name: str) -> None:
    """auto, cpu, cuda or cuda:N, and a CUDA device only where there is one; ValueError naming --device."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", name):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available (use --device cpu)")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _train_locked(
    cfg: TrainConfig,
    run_dir: Path,
    kwargs,
    rank: int,
    world: int,
    device,
    accum: int,
    resume_from,
    new_meta: Optional[Dict[str, Any]],
    say,
    launched: float,
    source=None,
) -> Dict[str, Any]:
    """The run, its directory locked: the data, the trainee set up (and resumed), then the loop.
    `resume_from`: the checkpoint rank 0 read (`Checkpoint`), its path on the other ranks, or None.
    `new_meta`: a run.json to write once the checkpoint has loaded (a resume that extends the run)."""
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    key = read_json_record(run_dir / "data.json").get("key")
    tok = run_tokenizer(run_dir)
    train_tokens, valid_tokens = open_tokens(cfg.cache_dir, key)
    trainee = set_up(cfg, tok.vocab_size, kwargs, rank, device, resume_from, source, say)
    say(startup_summary(cfg, trainee.model, len(train_tokens), len(valid_tokens), device, world))
    if trainee.resumed_from is not None:
        if new_meta is not None and rank == 0:  # the extended length, recorded only now that the run goes on
            write_json_atomic(run_dir / "run.json", new_meta)
        say(f"resumed {run_dir} from {trainee.resumed_from.name} at step {trainee.start_step}")
        if trainee.start_step >= cfg.steps:
            say(f"the run is complete ({trainee.start_step} of {cfg.steps} steps): nothing to train")
    return train_steps(
        cfg, trainee, run_dir, train_tokens, valid_tokens, tok, kwargs, rank, world, device, accum, launched, say
    )
