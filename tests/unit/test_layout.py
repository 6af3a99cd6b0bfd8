"""The package's dependency rules, checked on its source: layers import downwards only (app -> train ->
evaluation -> model -> ops -> kernels), no import cycles, no private names taken across modules, about a dozen files at the top,
and the settings are the only MOEUT_* environment variables the library reads."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "moeut"
MODULES = {
    ".".join(("moeut",) + p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
    for p in PACKAGE.rglob("*.py")
}

# The layers, lowest first; a module may import from its own layer or a lower one. The leaves
# (`moeut.settings`, `moeut.files`) import nothing from the package and every layer may read them.
LEAVES = {"moeut.settings", "moeut.files"}
LAYERS = [
    ("kernels", lambda m: m.startswith("moeut.kernels")),
    ("ops", lambda m: m.startswith("moeut.ops")),
    (
        "model",
        lambda m: (
            m
            in {
                "moeut.profiles",
                "moeut.model",
                "moeut.moe",
                "moeut.dense",
                "moeut.generate",
                "moeut.models",
                "moeut.router",
            }
            or m.startswith("moeut.attention")
        ),
    ),
    ("evaluation", lambda m: m in {"moeut.evaluate", "moeut.analyze"}),
    ("train", lambda m: m.startswith("moeut.train")),
    ("app", lambda m: True),  # runs, cli, hf: the commands and the exports
]


def layer(module: str) -> int:
    return next(i for i, (_, test) in enumerate(LAYERS) if test(module))


def imports_of(path: Path, module: str):
    """[(package module imported from, names taken)] of one file, lazy imports included."""
    out = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("moeut"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            out += [(m, []) for m in submodules]
            if len(submodules) < len(names):
                out.append((base, [n for n in names if f"{base}.{n}" not in MODULES]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("moeut")]
    return [(m, names) for m, names in out if m in MODULES and m != module]


GRAPH = {name: {m for m, _ in imports_of(path, name)} for name, path in MODULES.items()}


def test_the_walk_down_finds_every_module():
    """The graph is over real files: the layers' members exist and imports resolve to them."""
    assert {
        "moeut.model",
        "moeut.ops.expert_mm",
        "moeut.kernels.expert_mm",
        "moeut.train.trainer",
        "moeut.ops.reference",
    } <= set(MODULES)
    assert "moeut.ops.grouped_mm" in GRAPH["moeut.ops.expert_mm"]
    assert "moeut.ops.expert_mm" in GRAPH["moeut.moe"]


def test_no_import_cycles():
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in GRAPH[node]:
            if dep == node.rpartition(".")[0]:
                continue  # a module's own package __init__ (docstring only)
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep) :] + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for name in GRAPH:
        if name not in state:
            visit(name, [])


def test_layers_import_downwards_only():
    upward = {(m, dep) for m, deps in GRAPH.items() for dep in deps if dep not in LEAVES and layer(dep) > layer(m)}
    assert not upward, sorted(upward)


def test_the_leaves_import_nothing_from_the_package():
    assert all(GRAPH[leaf] == set() for leaf in LEAVES)


def test_kernels_import_only_kernels_and_settings():
    offending = {
        m: deps
        for m, deps in GRAPH.items()
        if m.startswith("moeut.kernels")
        and any(not d.startswith("moeut.kernels") and d != "moeut.settings" for d in deps)
    }
    assert not offending, offending


def test_no_private_names_taken_across_modules():
    taken = [
        (name, m, n)
        for name, path in MODULES.items()
        for m, names in imports_of(path, name)
        for n in names
        if n.startswith("_")
    ]
    assert not taken, taken


def test_about_a_dozen_files_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 16, top


def test_only_the_settings_read_moeut_variables():
    readers = {name: sorted(set(re.findall(r"\"(MOEUT_\w+)\"", path.read_text()))) for name, path in MODULES.items()}
    readers = {k: v for k, v in readers.items() if v}
    assert set(readers) == {"moeut.settings"}, readers
    assert "os.environ" not in "".join(
        p.read_text()
        for m, p in MODULES.items()
        if m.startswith(("moeut.ops", "moeut.model", "moeut.moe", "moeut.attention"))
    )


def test_pyproject_packages_every_subpackage():
    """A non-editable `pip install .` needs every package listed."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("moeut",) + p.parent.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("__init__.py")}
    assert listed == found
