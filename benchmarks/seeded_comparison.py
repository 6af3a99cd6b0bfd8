"""MoEUT against the paper's dense baseline, several seeds each, the same tokens, the paper's tokenizer
and recipe: validation perplexity mean ± std per model, the zero-shot table per run, and a plot.

    python3 benchmarks/seeded_comparison.py --data data/english --tokenizer tok.model \
        --models moeut-44M,dense-44M --seeds 0,1,2 --steps 400 --eval-data ../shared/eval --json out.json
    python3 benchmarks/seeded_comparison.py --plot out.json --png out.png      # the figure from a JSON

Every run sees the same batches (the data order depends on the seed, the same for both models), and
the seed sets the initialisation. The JSON is rewritten after each run, so a time limit keeps what
finished, and `--continue` picks up from it (in a later call on the same machine or with the JSON).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_all(args) -> dict:
    from moeut.evaluate import TASKS, run_eval
    from moeut.runs import load_run
    from moeut.train.trainer import TrainConfig, train
    out = Path(args.out)
    rows = []
    if args.continue_ and args.json and Path(args.json).is_file():
        rows = json.loads(Path(args.json).read_text())["runs"]
        print(f"continuing: {len(rows)} finished runs in {args.json}", flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.models.split(","):
            run_dir = out / f"{name}-seed{seed}"
            if any(r["model"] == name and r["seed"] == seed for r in rows):
                continue
            if args.continue_ and run_dir.is_dir():   # this script's own run, cut off before it finished
                shutil.rmtree(run_dir)
            cfg = TrainConfig(model=name, out=str(run_dir), data=args.data.split(","), tokenizer=args.tokenizer,
                              steps=args.steps, batch_size=args.batch_size, context=args.context, seed=seed,
                              eval_interval=max(1, args.steps // args.budgets), ckpt_interval=10 ** 9,
                              eval_windows=args.eval_windows,
                              cache_dir=str(out / "cache"), tensorboard=False, progress=False)
            t0 = time.perf_counter()
            result = train(cfg)
            row = dict(model=name, seed=seed, steps=args.steps, tokens=args.steps * args.batch_size * args.context,
                       val_ppl=result.get("val_ppl"), train_s=round(time.perf_counter() - t0, 1),
                       val_ppl_by_step=_val_by_step(run_dir / "metrics.jsonl"))
            if args.eval_data:
                model, tok, _ = load_run(run_dir, "cuda" if _cuda() else "cpu")
                scores = run_eval(model, tok, list(TASKS), args.eval_data, [], args.eval_limit or None, 32,
                                  printer=lambda *a: None, skip_missing=True)
                row["zero_shot"] = {t: r.get("accuracy") for t, r in scores.items() if t in TASKS}
            rows.append(row)
            print(json.dumps(row), flush=True)
            summary = summarise(rows)
            if args.json:
                Path(args.json).write_text(json.dumps(dict(config=vars(args), runs=rows, summary=summary), indent=2))
    return summarise(rows)


def _val_by_step(metrics: Path) -> dict:
    out = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "val_ppl" in rec:
            out[str(rec["step"])] = rec["val_ppl"]
    return out


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def summarise(rows) -> dict:
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        ppl = [r["val_ppl"] for r in rows if r["model"] == name and r["val_ppl"] is not None]
        out[name] = dict(runs=len(ppl), val_ppl_mean=statistics.mean(ppl) if ppl else None,
                         val_ppl_std=statistics.stdev(ppl) if len(ppl) > 1 else None)
        by_step = {}
        for r in rows:
            if r["model"] == name:
                for step, v in r.get("val_ppl_by_step", {}).items():
                    by_step.setdefault(step, []).append(v)
        out[name]["by_step"] = {s: dict(runs=len(v), mean=statistics.mean(v),
                                        std=statistics.stdev(v) if len(v) > 1 else None)
                                for s, v in sorted(by_step.items(), key=lambda kv: int(kv[0]))}
    return out


def plot(json_path: Path, png: Path) -> None:
    """Left: validation perplexity against training tokens (mean ± std over seeds at each budget).
    Right: the final perplexity of every seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.loads(json_path.read_text())
    cfg = data["config"]
    tokens_per_step = cfg["batch_size"] * cfg["context"]
    models = list(data["summary"])
    fig, (curve, final) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    for i, name in enumerate(models):
        by_step = data["summary"][name].get("by_step") or {}
        steps = sorted(by_step, key=int)
        x = [int(s) * tokens_per_step / 1e6 for s in steps]
        curve.errorbar(x, [by_step[s]["mean"] for s in steps], yerr=[by_step[s]["std"] or 0 for s in steps],
                       marker="o", capsize=4, color=f"C{i}", label=name)
        ppl = [r["val_ppl"] for r in data["runs"] if r["model"] == name]
        final.scatter([i] * len(ppl), ppl, color="0.4", zorder=3, s=14, label="one seed" if i == 0 else None)
        s = data["summary"][name]
        final.errorbar([i], [s["val_ppl_mean"]], yerr=[s["val_ppl_std"] or 0], fmt="o", color=f"C{i}", capsize=6,
                       markersize=8)
    curve.set_yscale("log")
    curve.set_xlabel("training tokens (millions)")
    curve.set_ylabel("validation perplexity")
    curve.legend(frameon=False)
    final.set_xticks(range(len(models)), models)
    final.set_xlim(-0.6, len(models) - 0.4)
    final.set_title("final, each seed")
    final.legend(frameon=False)
    fig.suptitle(f"{cfg['steps']} steps × {cfg['batch_size']}×{cfg['context']} tokens, seeds {cfg['seeds']}")
    fig.tight_layout()
    fig.savefig(png, dpi=150)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="corpus (comma-separated sources, as moeut train --data)")
    ap.add_argument("--tokenizer", default="paper", help="paper (trained on the corpus) or a .model file")
    ap.add_argument("--models", default="moeut-44M,dense-44M")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--budgets", type=int, default=3, help="validate this many times, evenly spaced")
    ap.add_argument("--eval-data", help="zero-shot data directory (skipped when absent)")
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--out", default="runs/seeded")
    ap.add_argument("--json")
    ap.add_argument("--continue", dest="continue_", action="store_true",
                    help="keep the runs already in --json, redo any cut-off run under --out from its start")
    ap.add_argument("--plot", type=Path, help="only draw the figure of this JSON")
    ap.add_argument("--png", type=Path)
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.png or args.plot.with_suffix(".png"))
        return
    if not args.data:
        ap.error("--data is required")
    print(json.dumps(run_all(args), indent=2))


if __name__ == "__main__":
    main()
