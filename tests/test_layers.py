"""The layers stay layers: no import cycle among simfl/actors modules, and pure modules never load Ray.

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
# Modules that drive Ray (the CLI drivers and the actors); every other simfl module is pure.
RAY_MODULES = {"simfl.run", "simfl.study", "simfl.cell_pool", "simfl.study_search", "simfl.calibrate"}


def modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.glob("simfl/**/*.py"), *ROOT.glob("actors/**/*.py")]:
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


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


PURE = sorted(m for m in modules() if m.startswith("simfl") and m not in RAY_MODULES)
# One fresh interpreter imports the pure modules one by one and names the first after which Ray or actors is loaded.
PROBE = """
import importlib, json, sys
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "actors"))
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
    assert {"simfl.round", "simfl.report", "simfl.scenario", "simfl.client_worker"} <= set(PURE)


if __name__ == "__main__":
    found = cycles(import_graph())
    print("\n".join(" -> ".join(c) for c in found) or "no import cycle among simfl/ and actors/ modules")
    sys.exit(1 if found else 0)
