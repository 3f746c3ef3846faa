"""The library's structure stays readable (notes/design.md §4).

Walks every module of ``pallas_kernels``, ``lasp_jax`` and ``models`` with ``ast`` (nothing is
imported) and fails on an import cycle between them, on a private name (``_x``) taken from another
module, and on a module over 600 lines.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "lasp_jax", "models")
MAX_LINES = 600


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports included)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: pathlib.Path, modules: dict) -> list[tuple[str, str | None]]:
    """(imported library module, imported name or None) for every import anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, module, path.name == "__init__.py")
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub, None) if sub in modules else (source, alias.name))
    return found


def _graph(modules: dict) -> dict[str, set[str]]:
    return {m: {dep for dep, _ in _imports(m, p, modules) if dep in modules and dep != m} for m, p in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for start in graph:
        if state.get(start):
            continue
        path, stack = [], [(start, iter(sorted(graph[start])))]
        state[start] = 1
        path.append(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    cycle = _find_cycle(_graph(_library_modules()))
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_no_private_name_imported_across_modules():
    modules = _library_modules()
    offenders = [
        f"{m} imports {name} from {source}"
        for m, path in modules.items()
        for source, name in _imports(m, path, modules)
        if name and name.startswith("_") and not name.startswith("__") and source != m
    ]
    assert not offenders, "\n".join(offenders)


def test_no_private_attribute_of_an_imported_module():
    """``from pkg import mod`` then ``mod._helper`` is a private import too."""
    modules = _library_modules()
    offenders = []
    for m, path in modules.items():
        tree = ast.parse(path.read_text())
        imported = {
            (alias.asname or alias.name.split(".")[-1])
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
            if (
                isinstance(node, ast.Import)
                and alias.name in modules
                or isinstance(node, ast.ImportFrom)
                and f"{_resolve(node, m, path.name == '__init__.py')}.{alias.name}" in modules
            )
        }
        offenders += [
            f"{m}: {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in imported
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("module", sorted(_library_modules()))
def test_module_length(module):
    lines = len(_library_modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (limit {MAX_LINES}): split it by concern"
