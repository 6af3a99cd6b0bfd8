"""The package's dependency rules, checked on its source: no import cycles, no private names taken
across modules, the kernels import nothing above them, and the settings are the only MOEUT_*
environment variables the library reads (besides the pinned-config hook of the kernels)."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "moeut"
MODULES = {p.stem: p for p in PACKAGE.glob("*.py")}


def imports_of(path: Path):
    """[(module imported from the package, names taken)] of one file, lazy imports included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:   # from .x import a, b
                out.append((node.module, [a.name for a in node.names]))
            else:             # from . import x, y
                out += [(a.name, []) for a in node.names]
    return [(m, names) for m, names in out if m in MODULES]


GRAPH = {name: {m for m, _ in imports_of(path)} for name, path in MODULES.items()}


def test_no_import_cycles():
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in GRAPH[node]:
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"
    for name in GRAPH:
        if name not in state:
            visit(name, [])


def test_no_private_names_taken_across_modules():
    taken = [(name, m, n) for name, path in MODULES.items() for m, names in imports_of(path)
             for n in names if n.startswith("_")]
    assert not taken, taken


def test_kernels_import_nothing_above_them():
    allowed = {"settings"} | {m for m in MODULES if m.startswith("triton_")}
    offending = {k: GRAPH[k] - allowed for k in MODULES if k.startswith("triton_") and GRAPH[k] - allowed}
    assert not offending, offending


def test_only_the_settings_read_moeut_variables():
    readers = {name: sorted(set(re.findall(r"environ\.get\(\"(MOEUT_\w+)", path.read_text())))
               for name, path in MODULES.items()}
    readers = {k: v for k, v in readers.items() if v}
    assert readers == {"triton_expert_mm": ["MOEUT_PIN_CONFIG"]}, readers
