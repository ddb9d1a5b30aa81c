"""The package's shape: imports run one way through the layers, without circles or other modules' private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import liverus

ROOT = Path(liverus.__file__).resolve().parent

# Lower layers never import higher ones (docs/architecture.md draws the same picture).
LAYERS = [
    ("liverus", "liverus.utils"),
    ("liverus.data",),
    ("liverus.models",),
    ("liverus.engine",),
    ("liverus.evaluation",),
    ("liverus.training",),
    ("liverus.predict", "liverus.explain", "liverus.export", "liverus.serve", "liverus.demo"),
    ("liverus.cli",),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = ["liverus", *f.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(target module, imported names, line)`` for every liverus import that runs, at any depth (functions
    included; ``if TYPE_CHECKING:`` blocks, which never run, excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "liverus"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "liverus":
            names = [a.name for a in node.names]
            # "from liverus.cli import data_commands" imports a submodule, not a name of the package.
            subs = [n for n in names if f"{node.module}.{n}" in MODULES]
            out += [(f"{node.module}.{n}", [], node.lineno) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest:
                out.append((node.module, rest, node.lineno))
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> tuple[int, str]:
    """(layer index, the unit the module belongs to: its package or, for applications, itself)."""
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, module
    return best


def test_every_module_belongs_to_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_import_circles():
    # Tarjan's strongly connected components over the module graph.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in GRAPH[v]:
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or any(t == v for t, _, _ in GRAPH[v]):
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_imports_point_down_the_layers():
    wrong = []
    for src, imports in GRAPH.items():
        s_layer, s_unit = _layer(src)
        for target, _, line in imports:
            if target not in MODULES:
                continue
            t_layer, t_unit = _layer(target)
            if t_layer > s_layer or (t_layer == s_layer and t_unit != s_unit and s_layer != 0):
                wrong.append(f"{src}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{src}:{line} imports {target}.{n}"
        for src, imports in GRAPH.items()
        for target, names, line in imports
        for n in names
        if n.startswith("_") and n != "__version__" and target != src
    ]
    assert not private, "\n".join(private)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    # The graph walk must find what it claims to check: a module of the data layer importing training.
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from liverus.training import train\n    from liverus.data.io import _private\n")
    imports = _imports("liverus.data.bad", fake)
    assert ("liverus.training", ["train"], 2) in imports and ("liverus.data.io", ["_private"], 3) in imports
    assert _layer("liverus.training")[0] > _layer("liverus.data.bad")[0]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(module):
    import importlib

    importlib.import_module(module)
