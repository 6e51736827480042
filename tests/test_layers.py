"""The layers stay layers: each subpackage imports only its own floor and those below, no import cycle, and pure
modules never load Ray.

The import graph is read from the source (every ``import``/``from`` statement,
wherever it stands), so a cycle hidden inside a function counts too.
``python tests/test_layers.py`` prints the graph's cycles (none) as a command.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# simfl's floors, bottom first: a module may import its own floor and those below it, never one above.
# The top-level modules (the API and the thin command lines) stand above them all.
FLOORS = ["core", "data", "privacy", "engine", "results", "simulation", "studies"]
# Modules that drive Ray (the simulation, the study drivers, the command lines); every other simfl module is pure.
RAY_MODULES = {"simfl.run", "simfl.study", "simfl.calibrate", "simfl.studies.cell_pool", "simfl.studies.probes",
               "simfl.studies.study", "simfl.studies.calibrate"}


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.glob("simfl/**/*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's ``__init__`` counts when imported from outside)."""
    mods = modules()

    def resolve(target: str) -> str | None:
        parts = target.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in mods), None)

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            for target in targets:
                module = resolve(target)
                if module is None or module == name:
                    continue
                graph[name].add(module)
                parts = module.split(".")
                for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                    parent = ".".join(parts[:i])
                    if parent in mods and not name.startswith(parent + "."):
                        graph[name].add(parent)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_project_modules():
    assert cycles(import_graph()) == []


def floor(module: str) -> int:
    """The module's floor (index in FLOORS); top-level modules are above every floor."""
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else len(FLOORS)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if floor(t) > floor(m))


def test_every_module_sits_on_a_floor():
    assert sorted(m for m in modules() if m.count(".") == 1 and floor(m) == len(FLOORS)) == [
        "simfl.calibrate", "simfl.report", "simfl.run", "simfl.study"]


def test_no_floor_imports_one_above_it():
    assert upward_imports(import_graph()) == []


def test_the_floor_check_finds_an_upward_import():
    assert upward_imports({"simfl.core.x": {"simfl.engine.y"}, "simfl.engine.y": {"simfl.core.x"}}) == [
        "simfl.core.x -> simfl.engine.y"]


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


PURE = sorted(m for m in modules() if m not in RAY_MODULES and not m.startswith("simfl.simulation"))
# One fresh interpreter imports the pure modules one by one and names the first after which Ray or an actor is loaded.
PROBE = """
import importlib, json, sys
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] == "ray" or m.startswith("simfl.simulation"))
for module in json.loads(sys.argv[1]):
    importlib.import_module(module)
    if loaded():
        print(module, loaded()[:3])
        break
"""


def test_pure_modules_load_neither_ray_nor_the_actors():
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(PURE)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"importing this pure module loads Ray or the actors: {out.stdout.strip()}"
    assert {"simfl.engine.round", "simfl.studies.report", "simfl.engine.scenario",
            "simfl.engine.client_work"} <= set(PURE)


if __name__ == "__main__":
    found = cycles(import_graph())
    up = upward_imports(import_graph())
    print("\n".join(" -> ".join(c) for c in found) or "no import cycle among simfl's modules")
    print("\n".join(up) or "no import runs up a floor")
    sys.exit(1 if found or up else 0)
