"""The packages meet only through public API: nothing outside storage reaches into its private modules."""

from __future__ import annotations

import ast
from pathlib import Path

_USERS = ("loaders", "checkpoint", "tools")


def _modules(repo_root: Path) -> list[Path]:
    return sorted(p for package in _USERS for p in (repo_root / package).rglob("*.py"))


def test_no_module_outside_storage_imports_a_private_storage_module(repo_root: Path) -> None:
    offenders = []
    for path in _modules(repo_root):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(repo_root)}:{node.lineno}: {name}" for name in names
                          if name.startswith("trainio.storage._")]
    assert not offenders, "private storage modules imported:\n" + "\n".join(offenders)


def test_no_module_outside_storage_asks_whether_a_store_is_local(repo_root: Path) -> None:
    """Local files show through Store's own methods (local_path, open_local, durable), not isinstance."""
    name = "LocalStore"
    offenders = []
    for path in _modules(repo_root):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                    and name in ast.unparse(node.args[1])):
                offenders.append(f"{path.relative_to(repo_root)}:{node.lineno}")
    assert not offenders, f"isinstance(..., {name}) outside storage:\n" + "\n".join(offenders)


_PACKAGES = ("storage", "loaders", "checkpoint", "tools")


def _module_name(repo_root: Path, path: Path) -> str:
    parts = list(path.relative_to(repo_root).with_suffix("").parts)
    return ".".join(["trainio", *(parts[:-1] if parts[-1] == "__init__" else parts)])


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import that runs (at module level or in a function), leaving out ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return found


def _import_graph(repo_root: Path) -> dict[str, set[str]]:
    paths = {_module_name(repo_root, p): p for package in _PACKAGES for p in (repo_root / package).rglob("*.py")}
    packages = {name for name, p in paths.items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        base = name.split(".") if name in packages else name.split(".")[:-1]
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = ".".join(base[:len(base) - node.level + 1] + (node.module or "").split(".")).strip(".") \
                    if node.level else node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in paths else source
                           for alias in node.names]
            graph[name].update(t for t in targets if t in paths and t != name)
    return graph


def test_no_two_modules_import_each_other(repo_root: Path) -> None:
    """No import cycle among the library's modules (imports in functions count; type-checking ones do not)."""
    graph = _import_graph(repo_root)
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_stay_small_and_the_manager_thin(repo_root: Path) -> None:
    """A module holds one job: at most 400 lines; CheckpointManager is a front under 300 (its work is elsewhere)."""
    sizes = {p.relative_to(repo_root).as_posix(): len(p.read_text().splitlines())
             for package in _PACKAGES for p in (repo_root / package).rglob("*.py")}
    assert not {path: n for path, n in sizes.items() if n > 400}
    assert sizes["checkpoint/_manager.py"] < 300
