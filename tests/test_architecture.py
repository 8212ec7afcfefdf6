"""The package's shape, held by tests: no private name crosses a module boundary (src, tests,
benchmarks), no import cycle among lorascope's modules, no module over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "lorascope"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py")])


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an `from ... import` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def private_crossings(path: Path) -> list[str]:
    """`from lorascope.x import _name`, and `alias._name` where alias is a lorascope module."""
    tree = ast.parse(path.read_text())
    aliases, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lorascope"):
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(path, node) if path.is_relative_to(PACKAGE) else node.module or ""
            if not module.startswith("lorascope"):
                continue
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: imports {module}.{alias.name}")
                elif f"{module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module_boundary():
    found = [line for path in SOURCES for line in private_crossings(path)]
    assert not found, "\n".join(found)


def _top_level_imports(path: Path) -> set[str]:
    """The lorascope modules `path` imports when it is imported (not inside functions, not
    under `if TYPE_CHECKING:`)."""
    imported = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(path, node)
            for alias in node.names:
                full = f"{module}.{alias.name}"
                imported.add(full if full in MODULES else module)
    return {m for m in imported if m in MODULES}


def test_no_import_cycle():
    graph = {name: _top_level_imports(path) - {name} for name, path in MODULES.items()}
    done, active, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in active:
            cycles.append(" -> ".join([*active[active.index(node) :], node]))
            return
        if node in done:
            return
        active.append(node)
        for child in sorted(graph[node]):
            # a package's __init__ importing its own submodules is how a package is assembled
            if not child.startswith(node + "."):
                visit(child)
        active.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_500_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines; split it by concern"
