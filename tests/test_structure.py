"""The code's shape: no import circles in the packages (a lazy import inside a function
counts too: it is a circle waiting for someone to hoist it); compact env states stay inside
the env stack."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("mjxsac", "envs", "launch")


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ``PACKAGES`` it imports anywhere in its file."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_circles():
    graph = import_graph()
    assert graph.get("mjxsac.sac"), "the graph was read"
    for start in graph:
        seen, stack = set(), [start]
        while stack:
            for module in graph[stack.pop()]:
                assert module != start, f"{start} imports itself through {sorted(seen)}"
                if module not in seen:
                    seen.add(module)
                    stack.append(module)


def test_only_the_env_stack_compacts_env_states():
    """The trainer, checkpoints and tools see a ``State``: ``Env.compact`` and
    ``Env.expand`` are called in ``envs`` alone (``VmapEnv(compact=True)``)."""
    callers = [
        path.relative_to(ROOT)
        for package in ("mjxsac", "launch")
        for path in (ROOT / package).glob("*.py")
        if ".compact(" in path.read_text() or ".expand(" in path.read_text()
    ]
    assert callers == []
