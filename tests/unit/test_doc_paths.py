"""Every module path the docs and docstrings name in backticks exists: files (`train/checkpoint.py`,
`benchmarks/quality.sh`), dotted moeut names (`moeut.runs.load_run`), and `module.attribute` where the
module is one of the package's (`grouped_mm.grouped_mm_dot`). A rename that leaves a stale name fails
here."""

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "moeut"
MODULES = {
    p.stem: ".".join(("moeut",) + p.relative_to(PACKAGE).with_suffix("").parts)
    for p in PACKAGE.rglob("*.py")
    if p.stem != "__init__"
}
BASES = [ROOT, PACKAGE, PACKAGE / "train", ROOT / "benchmarks", ROOT / "docs", ROOT / "tests"]


def texts():
    """(where, text) of the READMEs, docs/ and every docstring of the package."""
    for md in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        yield str(md.relative_to(ROOT)), md.read_text()
    for py in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(py.read_text())
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    yield f"{py.relative_to(ROOT)}:{getattr(node, 'name', 'module')}", doc


OURS = {"moeut", "benchmarks", "tests", "docs", "scripts", "sweeps", "examples", "ops", "kernels", "train", "hf"}
FILES = {p.name for d in ("moeut", "benchmarks", "tests", "scripts") for p in (ROOT / d).rglob("*") if p.is_file()}
EXTENSIONS = {"py", "md", "json", "jsonl", "safetensors", "txt", "toml", "yaml", "png", "log", "pt", "bin"}
MODULE_OBJECTS = {}
for stem in MODULES:
    MODULE_OBJECTS.setdefault(stem, [])
for p in PACKAGE.rglob("*.py"):
    if p.stem != "__init__":
        MODULE_OBJECTS[p.stem].append(".".join(("moeut",) + p.relative_to(PACKAGE).with_suffix("").parts))


def _has(stem: str, attr: str) -> bool:
    for name in MODULE_OBJECTS[stem]:
        module = importlib.import_module(name)
        if hasattr(module, attr) or hasattr(getattr(module, stem, None), attr):  # `settings.autotune`
            return True
    return False


def broken(token: str, where: str = "") -> bool:
    """Whether a backticked token names one of our files or modules that does not exist. The paper's
    training code is cited by its own paths and argument names (official.py, evaluate.py): not ours."""
    token = token.strip().rstrip(".,:;")
    cites_training_code = "official.py" in where or "evaluate.py" in where or "nonorm" in token
    if re.fullmatch(r"[\w-]+(/[\w.-]+)+/?", token):
        if any(c in token for c in "<>*{}") or token.split("/")[0] not in OURS:
            return False
        return not any((base / token).exists() for base in BASES)
    if re.fullmatch(r"[\w-]+\.py", token):
        return not cites_training_code and token not in FILES
    m = re.fullmatch(r"(moeut(?:\.\w+)+)", token)
    if m:
        parts = m.group(1).split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
                return False
            except AttributeError:
                return True
        return True
    m = re.fullmatch(r"(\w+)\.(\w+)(?:\(\))?", token)
    if m and m.group(1) in MODULE_OBJECTS and not cites_training_code and m.group(2) not in EXTENSIONS:
        return not _has(m.group(1), m.group(2))
    return False


def test_every_named_path_exists():
    bad = [
        (where, token) for where, text in texts() for token in re.findall(r"`([^`\s]+)`", text) if broken(token, where)
    ]
    assert not bad, bad


def test_the_checker_catches_a_stale_name():
    assert broken("ops/expert_ops.py") and broken("moeut.triton_expert_mm") and broken("grouped_mm.nonesuch")
    assert broken("saved_activations.py")
    assert (
        not broken("model.safetensors")
        and not broken("train/checkpoint.py")
        and not broken("moeut.runs.load_run")
        and not broken("grouped_mm.grouped_mm")
    )
