"""The package's floor plan (README "Layout"): each module is one stage of the pipeline and imports only
stages below it, there is no import circle (function-local imports included, so none can hide one), and no
module uses another module's underscore-private name."""

from __future__ import annotations

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flashpack")

#: module (or package prefix) -> stage; a module imports only lower stages, or its own package at its stage.
STAGES = {
    "flashpack.errors": 0,
    "flashpack.settings": 1,
    "flashpack._uring": 1,
    "flashpack.format": 2,
    "flashpack.atomic": 2,
    "flashpack.progress": 2,
    "flashpack.source": 3,
    "flashpack.plan": 3,
    "flashpack.io": 4,
    "flashpack.remote": 4,
    "flashpack.staging": 5,
    "flashpack.loading.memory": 6,
    "flashpack.loading.common": 6,
    "flashpack.loading.host": 7,
    "flashpack.loading.staged": 7,
    "flashpack.loading.distributed": 8,
    "flashpack.loading": 8,
    "flashpack.serialization": 9,
    "flashpack.deserialization": 9,
    "flashpack.lazy": 9,
    "flashpack.mixin": 10,
    "flashpack.testing": 11,
    "flashpack.tools": 12,
    "flashpack.commands": 13,  # fal's module: wraps tools.convert and tools.revert, so one stage above tools
    "flashpack.integrations": 12,
    "flashpack.__main__": 13,
    "flashpack": 14,
}


def modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def stage(mod: str) -> int:
    best = max((p for p in STAGES if mod == p or mod.startswith(p + ".")), key=len)
    return STAGES[best]


def package_of(mod: str, path: str) -> str:
    return mod if path.endswith("__init__.py") else mod.rpartition(".")[0]


def imports(mod: str, path: str, known: set[str]):
    """(line, imported flashpack module, names imported from it) for every import in the file."""
    tree = ast.parse(open(path).read(), path)
    pkg = package_of(mod, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "flashpack":
                    yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "flashpack":
                continue
            rest = []
            for a in node.names:  # "from . import host": a name may be a submodule
                if f"{target}.{a.name}" in known:
                    yield node.lineno, f"{target}.{a.name}", []
                else:
                    rest.append(a.name)
            if rest:
                yield node.lineno, target, rest


MODS = modules()
KNOWN = set(MODS) | {"flashpack._uring"}  # the compiled io_uring shim (native/)
EDGES = {m: list(imports(m, p, KNOWN)) for m, p in MODS.items()}


def test_the_map_covers_every_module():
    assert "flashpack.loading.common" in KNOWN and "flashpack.io.uring" in KNOWN
    for m in KNOWN:
        stage(m)  # raises ValueError (max of nothing) for a module missing from STAGES


def test_no_import_from_a_higher_stage():
    bad = []
    for m, edges in EDGES.items():
        for line, target, names in edges:
            if target == m or (target == "flashpack" and names and all(n.startswith("__") for n in names)):
                continue  # the package's own metadata (__version__): always imported first, holds no stage
            if stage(target) > stage(m) or (stage(target) == stage(m)
                                            and target.rpartition(".")[0] != m.rpartition(".")[0]
                                            and not target.startswith(m + ".") and not m.startswith(target + ".")):
                bad.append(f"{MODS[m]}:{line}: {m} (stage {stage(m)}) imports {target} (stage {stage(target)})")
    assert bad == []


def test_no_import_circle():
    graph = {m: sorted({t for _, t, names in edges if t in MODS and t != m
                        and not (t == "flashpack" and names and all(n.startswith("__") for n in names))})
             for m, edges in EDGES.items()}
    # a package's __init__ importing its own submodules is the usual re-export, not a circle back into it
    for m in graph:
        graph[m] = [t for t in graph[m] if not (t.startswith(m + ".") and MODS[m].endswith("__init__.py"))]
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_private_name_used_across_modules():
    bad = []
    for m, edges in EDGES.items():
        for line, target, names in edges:
            if target == m:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in KNOWN:
                    bad.append(f"{MODS[m]}:{line}: from {target} import {n}")
    assert bad == []


@pytest.mark.parametrize("text, expect", [
    ("from .loading.common import prepare", "flashpack.loading.common"),
    ("from ..io import open_reader", "flashpack.io"),
    ("from . import host", "flashpack.loading.host"),
])
def test_the_import_parser_resolves_relative_imports(tmp_path, text, expect):
    # the checks above are only as good as this resolution; a module in flashpack/loading/ is the example
    p = tmp_path / "x.py"
    p.write_text(text + "\n")
    mod = "flashpack.loading.x" if text.startswith(("from ..", "from . ")) else "flashpack.x"
    got = [t for _, t, _ in imports(mod, str(p), KNOWN)]
    assert got == [expect]
