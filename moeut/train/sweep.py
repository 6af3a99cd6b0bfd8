"""`moeut sweep FILE.toml`: a list of runs that differ in a few settings, trained and evaluated one after
the other, collected into one table (sweep.json, sweep.md) and a plot (sweep.png).

The file (see sweeps/*.toml):
    name = "group_size"
    [train]                    flags of `moeut train` shared by every run (keys as in --config)
    model = "moeut-244M"
    steps = 100000
    [eval]                     optional: flags of `moeut eval` run after each training (tasks, data-dir, limit)
    tasks = "blimp,lambada"
    [compare]                  optional: the time-to-quality baseline (a group; default: the one group of
    baseline = "dense"         dense runs) and target (default: that group's final perplexity)
    target_ppl = 30.0
    [[runs]]                   one table per run: its name (also its directory), and its own flags;
    name = "G1"                "set" holds constructor arguments, as --set does; "group" gathers runs
    group = "G1"               that differ only in their seed (default: the name)
    set = { group_size = 1, ff_n_experts = 779, att_n_experts = 20 }

Runs go to OUT/<name>. For each, sweep.json keeps its validation curve against tokens, step-time
seconds and wall-clock seconds (`quality.py`), and the table says per group how soon it reached the
target against the baseline. Interrupted, the sweep continues where it stopped: a finished run is not
trained again, an unfinished one is resumed (`moeut train --resume`).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Callable, Dict, List

from moeut.files import write_json_atomic
from moeut.train.quality import markdown as quality_markdown
from moeut.train.quality import plot as quality_plot
from moeut.train.quality import read_curve, summarize


def read_sweep(path: str | Path) -> Dict[str, Any]:
    """The sweep file, checked: a [train] table, [[runs]] with unique names; unknown top-level keys refused."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    unknown = sorted(set(spec) - {"name", "train", "eval", "compare", "runs"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (a sweep has name, [train], [eval], [compare] and [[runs]])")
    runs = spec.get("runs")
    if (
        not isinstance(runs, list)
        or not runs
        or not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in runs)
    ):
        raise ValueError(f"{path}: needs [[runs]] tables, each with a name")
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names) or any(not n or "/" in n or n.startswith(".") for n in names):
        raise ValueError(f"{path}: run names must be unique plain directory names, got {names}")
    for key in ("train", "eval", "compare"):
        if not isinstance(spec.get(key, {}), dict):
            raise ValueError(f"{path}: [{key}] must be a table")
    compare = spec.get("compare", {})
    extra = sorted(set(compare) - {"baseline", "target_ppl"})
    if extra:
        raise ValueError(f"{path}: [compare] takes baseline and target_ppl, not {extra}")
    target = compare.get("target_ppl")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 1):
        raise ValueError(f"{path}: [compare] target_ppl must be a perplexity above 1, got {target!r}")
    groups = {r.get("group", r["name"]) for r in runs}
    if not all(isinstance(r.get("group", ""), str) for r in runs):
        raise ValueError(f"{path}: a run's group must be a string")
    if "baseline" in compare and compare["baseline"] not in groups:
        raise ValueError(f"{path}: [compare] baseline {compare['baseline']!r} is no run's group ({sorted(groups)})")
    return spec


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def _config_file(settings: Dict[str, Any], path: Path) -> None:
    """A `moeut train --config` file of these flags ("set" becomes its [set] table)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in settings.items() if k != "set"]
    if settings.get("set"):
        lines += ["[set]"] + [f"{k} = {_toml_value(v)}" for k, v in settings["set"].items()]
    path.write_text("\n".join(lines) + "\n")


def _last_val_ppl(run_dir: Path) -> float | None:
    from moeut.train.run_dir import metric_records

    vals = [r["val_ppl"] for r in metric_records(run_dir) if _positive_number(r.get("val_ppl"))]
    return vals[-1] if vals else None


def _positive_number(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def run_sweep(path: str | Path, out: str | Path, main: Callable[[List[str]], int], say=print) -> Dict[str, Any]:
    """Train (and evaluate) every run of the sweep file into `out`; returns and writes out/sweep.json."""
    spec = read_sweep(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "sweep.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"name": spec.get("name"), "runs": {}}
    for run in spec["runs"]:
        name = run["name"]
        if name in record["runs"]:
            say(f"{name}: done before, kept")
            continue
        run_dir = out / name
        settings = {**spec.get("train", {}), **{k: v for k, v in run.items() if k not in ("name", "group")}}
        settings["set"] = {**spec.get("train", {}).get("set", {}), **run.get("set", {})}
        config = out / f"{name}.toml"
        _config_file(settings, config)
        if (run_dir / "run.json").is_file():
            say(f"{name}: resuming")
            extra = [a for d in settings.get("data", []) for a in ("--data", str(d))]
            if settings.get("cache-dir") or settings.get("cache_dir"):  # a resume follows no recorded path
                extra += ["--cache-dir", str(settings.get("cache-dir") or settings.get("cache_dir"))]
            code = main(["train", "--resume", str(run_dir), "--no-progress", *extra])
        else:
            say(f"{name}: training")
            code = main(["train", "--config", str(config), "--out", str(run_dir)])
        if code in (130, 143):  # the run was stopped by a signal, after its checkpoint
            say(f"sweep {spec.get('name')}: stopped during {name}; run the sweep again to continue it")
            raise KeyboardInterrupt
        if code != 0:
            raise ValueError(
                f"sweep {spec.get('name')}: run {name} failed (exit status {code}); "
                f"fix it and run the sweep again: finished runs are kept"
            )
        result = {
            "settings": settings,
            "val_ppl": _last_val_ppl(run_dir),
            "group": run.get("group", name),
            "model": settings.get("model", "moeut-tiny"),
            "seed": settings.get("seed", 0),
            "curve": read_curve(run_dir),
        }
        if spec.get("eval"):
            ev = spec["eval"]
            args = ["eval", "--checkpoint", str(run_dir), "--json", str(run_dir / "eval.json")]
            for k, v in ev.items():
                args += [f"--{k}", str(v)]
            if main(args) != 0:
                raise ValueError(f"sweep {spec.get('name')}: evaluating {name} failed")
            scores = json.loads((run_dir / "eval.json").read_text())["results"]
            result["eval"] = {
                t: r.get("accuracy", r.get("perplexity"))
                for t, r in scores.items()
                if isinstance(r, dict) and ("accuracy" in r or "perplexity" in r)
            }
        record["runs"][name] = result
        write_json_atomic(record_path, record)
    compare = spec.get("compare", {})
    record["time_to_quality"] = summarize(record["runs"], compare.get("baseline"), compare.get("target_ppl"))
    write_json_atomic(record_path, record)
    table = "\n\n".join(
        t for t in (markdown_table(record), group_eval_table(record), quality_markdown(record["time_to_quality"])) if t
    )
    (out / "sweep.md").write_text(table + "\n")
    say(table)
    if not quality_plot(record["runs"], record["time_to_quality"], out / "sweep.png"):
        say("(no sweep.png: plotting needs matplotlib, pip install 'moeut[train]')")
    return record


def markdown_table(record: Dict[str, Any]) -> str:
    tasks = sorted({t for r in record["runs"].values() for t in r.get("eval", {})})
    head = "| run | validation perplexity |" + "".join(f" {t} |" for t in tasks)
    rows = [head, "|---|---|" + "---|" * len(tasks)]
    for name, r in record["runs"].items():
        ppl = f"{r['val_ppl']:.2f}" if r.get("val_ppl") is not None else "-"
        rows.append(f"| {name} | {ppl} |" + "".join(f" {r.get('eval', {}).get(t, float('nan')):.4f} |" for t in tasks))
    return "\n".join(rows)


def group_eval_table(record: Dict[str, Any]) -> str:
    """The zero-shot scores per group of runs (mean ± std over its seeds), when groups have several runs."""
    import statistics

    groups: Dict[str, List[Dict[str, float]]] = {}
    for name, r in record["runs"].items():
        groups.setdefault(r.get("group", name), []).append(r.get("eval", {}))
    tasks = sorted({t for evals in groups.values() for e in evals for t in e})
    if not tasks or all(len(v) < 2 for v in groups.values()):
        return ""
    rows = ["| group (mean ± std over runs) |" + "".join(f" {t} |" for t in tasks), "|---|" + "---|" * len(tasks)]
    for g, evals in groups.items():
        cells = []
        for t in tasks:
            v = [e[t] for e in evals if isinstance(e.get(t), (int, float))]
            cells.append(
                f"{statistics.mean(v):.4f}" + (f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else "") if v else "-"
            )
        rows.append(f"| {g} ({len(evals)}) |" + "".join(f" {c} |" for c in cells))
    return "\n".join(rows)
