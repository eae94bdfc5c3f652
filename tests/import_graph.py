"""The project's import graph, read from the source (ast), for the layout tests.

Every ``import`` and ``from ... import`` of the packages model/, stages/, flows/ counts, at
module level or inside a function (a lazy import is still a dependency). ``from pkg import
name`` depends on ``pkg.name`` when that is a module, else on ``pkg``.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "stages", "flows")


@cache
def modules() -> dict[str, Path]:
    """Every project module by dotted name (packages by their ``__init__``)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _resolve(name: str) -> str | None:
    """The project module ``name`` is, or lies in (None outside the project)."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(module: str) -> frozenset[str]:
    """The project modules ``module`` imports (itself and its own packages excluded)."""
    path = modules()[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {m for a in node.names if (m := _resolve(a.name))}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                m = _resolve(f"{node.module}.{a.name}")
                if m:
                    found.add(m)
    packages = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
    return frozenset(found - {module} - packages)


def closure(start: str) -> set[str]:
    """``start`` and every project module it imports, directly or not."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports(m)
    return seen


def path_of(module: str) -> str:
    return modules()[module].relative_to(ROOT).as_posix()


def cycles() -> list[list[str]]:
    """Import cycles among the project's modules (each as a list of modules), by DFS."""
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(imports(m)):
            if state.get(n) == "open":
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(modules()):
        if m not in state:
            visit(m)
    return found
