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
