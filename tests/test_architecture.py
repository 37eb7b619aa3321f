"""The architecture as a test: the import graph of ``steerplug/`` read from the source (AST).

Every import statement counts, wherever it sits: module level, function bodies (lazy imports),
``try`` blocks, ``TYPE_CHECKING`` blocks; relative and absolute; ``from pkg import name`` counts as
importing the submodule ``pkg.name`` when it is one (and ``pkg`` itself when ``name`` is not), and
``importlib.import_module("steerplug.x")`` with a literal name counts too. ``steerplug.x`` stands
for ``steerplug/x/__init__.py``: importing a module also runs the ``__init__`` of every package
above it that is not already running (those holding the importer), so that is an edge as well.

Checked: no import cycle; no module over :data:`MAX_LINES` lines; the floors of README.md's
"Architecture" section, each module importing only its own floor and those below; the maths
knowing no model, hook, server or CLI; the server and the engine knowing no CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "steerplug"
MAX_LINES = 450
NOT_YET_SPLIT: dict[str, int] = {}
"""Modules over :data:`MAX_LINES` allowed for a while (each with a cap it may not grow past; it must
leave this list once within the limit). Empty: nothing may be over the limit."""

# Bottom to top: a module may import modules of its own floor and of the floors below, never above.
# A module is placed by its longest listed prefix (``steerplug.pipeline`` covers its submodules);
# ``steerplug`` itself is the package's public API (its ``__init__``), not a prefix.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("files and plain data", ("steerplug._version", "steerplug._config", "steerplug.hub", "steerplug.sae_config",
                              "steerplug.cards", "steerplug.data")),
    ("maths", ("steerplug.sae_formats", "steerplug.sae", "steerplug.vector", "steerplug.steering",
               "steerplug.gate")),
    ("models and hooks", ("steerplug.layers", "steerplug.models", "steerplug.hooks")),
    ("the model wrapper", ("steerplug.sites", "steerplug.bundles", "steerplug.steered_model", "steerplug")),
    ("pipeline, evaluation, serving", (
        "steerplug.pipeline", "steerplug.distributed", "steerplug.interventions", "steerplug.judge",
        "steerplug.fluency", "steerplug.report", "steerplug.lm_eval_plugin", "steerplug.batching", "steerplug.serve_schema",
        "steerplug.serve_api", "steerplug.serve", "steerplug.model_args", "steerplug.compare", "steerplug.push")),
    ("CLI and demo", ("steerplug.cli", "steerplug.demo_utils", "steerplug.pipeline.artifacts")),
]
MATHS = ("steerplug.sae_config", "steerplug.sae_formats", "steerplug.sae", "steerplug.vector",
         "steerplug.steering", "steerplug.gate")
"""Pure maths and its config: tensors and plain data in, tensors out."""
NOT_FOR_MATHS = ("steerplug.models", "steerplug.layers", "steerplug.hooks", "steerplug.sites",
                 "steerplug.bundles", "steerplug.steered_model", "steerplug.serve", "steerplug.serve_api", "steerplug.serve_schema",
                 "steerplug.batching", "steerplug.cli", "steerplug.model_args", "steerplug.compare",
                 "steerplug.demo_utils", "steerplug.pipeline", "steerplug.report", "steerplug.interventions",
                 "steerplug.lm_eval_plugin", "steerplug.judge", "steerplug.push")
"""What the maths must not import, directly or through another module: a model, hooks, the
wrapper, the server and its engine, the CLI, the demo, the pipeline, reports, evaluation."""
SERVING = ("steerplug.serve", "steerplug.serve_api", "steerplug.serve_schema", "steerplug.batching")
"""The server and its engine: usable without the CLI."""


# --- the graph -------------------------------------------------------------------------------------
def module_files(package_dir: Path) -> dict[str, Path]:
    """``{"steerplug.x.y": path}`` for every ``.py`` file of the package (``__init__`` as the package)."""
    root = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _targets(module: str, is_package: bool, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The package modules that one import node needs, as written (parent packages not added)."""

    def longest_known(name: str) -> str | None:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return None

    found: list[str | None] = []
    if isinstance(node, ast.Import):
        found = [longest_known(a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
        if len(subs) < len(node.names):  # a name defined in the module itself: it must have run
            found.append(longest_known(target))
        found += subs
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"):
        found = [longest_known(node.args[0].value)]
    return [t for t in found if t is not None]


def import_graph(package_dir: Path) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """``({importer: {imported: line}}, files)``, with the parent packages each import runs."""
    modules = module_files(package_dir)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(module, is_package, node, modules):
                if target != module:
                    edges.setdefault(target, node.lineno)
                # the packages above the target whose __init__ is not already running for the importer
                parts = target.split(".")
                for parent in (".".join(parts[:n]) for n in range(1, len(parts))):
                    if parent in modules and not _within(module, parent):
                        edges.setdefault(parent, node.lineno)
        graph[module] = edges
    return graph, modules


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reach(graph: dict[str, dict[str, int]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` imports, directly or not, with one import path to it."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(graph.get(node, {})):
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                todo.append(nxt)
    del paths[start]
    return paths


def floor_of(module: str) -> int | None:
    """The floor of ``module``: that of its longest listed prefix (the root package only by name)."""
    best = None
    for i, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            hit = module == prefix if prefix == "steerplug" else _within(module, prefix)
            if hit and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    return None if best is None else best[0]


def _describe(graph: dict[str, dict[str, int]], modules: dict[str, Path], chain: list[str]) -> str:
    root = PACKAGE_DIR.parent
    return "\n  ".join(f"{modules[a].relative_to(root)}:{graph[a][b]} imports {b}"
                       for a, b in zip(chain, chain[1:]))


GRAPH, MODULES = import_graph(PACKAGE_DIR)


# --- the checks ----------------------------------------------------------------------------------
def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, ("Import cycle " + " -> ".join(cycle) + ":\n  "
                           + _describe(GRAPH, MODULES, cycle))


def test_no_module_over_the_line_limit():
    lines = {str(p.relative_to(PACKAGE_DIR.parent)): len(p.read_text().splitlines()) for p in MODULES.values()}
    long = {m: n for m, n in lines.items() if n > MAX_LINES and m not in NOT_YET_SPLIT}
    assert not long, f"Modules over {MAX_LINES} lines: {long}. Split them by concept."
    grown = {m: (lines.get(m), cap) for m, cap in NOT_YET_SPLIT.items() if lines.get(m, 0) > cap}
    assert not grown, f"Modules waiting to be split have grown (lines, cap): {grown}. Split them."
    done = sorted(m for m in NOT_YET_SPLIT if lines.get(m, 0) <= MAX_LINES)
    assert not done, f"{done} are within {MAX_LINES} lines now: take them off NOT_YET_SPLIT."


def test_every_module_has_a_floor_and_imports_no_floor_above_its_own():
    unplaced = sorted(m for m in MODULES if floor_of(m) is None)
    assert not unplaced, (f"{unplaced} have no floor: add them to FLOORS in tests/test_architecture.py "
                          "and to README.md's Architecture section.")
    upward = [f"{m} ({FLOORS[floor_of(m)][0]}) imports {t} ({FLOORS[floor_of(t)][0]}), "
              f"line {line}" for m, edges in sorted(GRAPH.items()) for t, line in sorted(edges.items())
              if floor_of(t) > floor_of(m)]
    assert not upward, "Imports running back up:\n  " + "\n  ".join(upward)


@pytest.mark.parametrize("module", MATHS)
def test_the_maths_imports_no_model_hooks_server_or_cli(module):
    assert module in MODULES, f"{module} is gone: update MATHS"
    bad = {t: p for t, p in reach(GRAPH, module).items() if any(_within(t, x) for x in NOT_FOR_MATHS)}
    assert not bad, "\n".join(f"{module} reaches {t}:\n  " + _describe(GRAPH, MODULES, p) for t, p in bad.items())


@pytest.mark.parametrize("module", sorted(m for m in MODULES if any(_within(m, s) for s in SERVING)))
def test_the_server_and_the_engine_import_nothing_of_the_cli(module):
    bad = {t: p for t, p in reach(GRAPH, module).items() if _within(t, "steerplug.cli")}
    assert not bad, "\n".join(f"{module} reaches {t}:\n  " + _describe(GRAPH, MODULES, p) for t, p in bad.items())


# --- the checker itself, on a made-up package ------------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "pkg"


def test_the_checker_sees_lazy_relative_and_package_imports(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg import b  # lazy, and b is a submodule\n",
        "b.py": "from . import c\nfrom .c import thing\n",
        "c.py": "import importlib\n\ndef g():\n    return importlib.import_module('pkg.sub.d')\n",
        "sub/__init__.py": "from pkg.sub.d import x\n",
        "sub/d.py": "from ..a import f\nx = 1\n",
        "sub/e.py": "from pkg.sub import d\n",  # inside pkg.sub: its __init__ is already running
        "f.py": "from pkg import name_in_init\n",  # needs pkg/__init__.py to have run
    })
    graph, _ = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b": 2}
    assert set(graph["pkg.b"]) == {"pkg.c"}
    assert set(graph["pkg.c"]) == {"pkg.sub", "pkg.sub.d"}  # importing pkg.sub.d runs pkg.sub first
    assert set(graph["pkg.sub.d"]) == {"pkg.a"}
    assert set(graph["pkg.sub.e"]) == {"pkg.sub.d"}
    assert set(graph["pkg.f"]) == {"pkg"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.sub", "pkg.sub.d", "pkg.a"]
    assert "pkg.sub.d" in reach(graph, "pkg.a")


def test_every_module_is_placed_by_name():
    assert floor_of("steerplug") == 3 and floor_of("steerplug.pipeline.artifacts") == 5
    assert floor_of("steerplug.batching.cache") == 4 and floor_of("steerplug.new_module") is None


def test_the_checker_passes_an_acyclic_package(tmp_path):
    pkg = _package(tmp_path, {"__init__.py": "from pkg.b import y\n", "a.py": "x = 1\n",
                              "b.py": "from pkg.a import x\n\ndef f():\n    from . import a\n"})
    graph, _ = import_graph(pkg)
    assert find_cycle(graph) is None and set(graph["pkg.b"]) == {"pkg.a"}
