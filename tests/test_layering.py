"""Dependencies run one way, service -> worker -> models: every import statement of the packages
(module level and inside functions alike) is parsed with ``ast``, so a lazy import cannot hide one.
That the API process imports no torch is checked in ``tests/test_deploy.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the first-party packages it must never import
FORBIDDEN = {"models": {"worker", "service"}, "worker": {"service"}}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in imported_packages(path)
        if name in FORBIDDEN[package]
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_run_one_way(package):
    assert violations(package) == []


def test_the_check_sees_lazy_imports(tmp_path):
    """The parser finds an import hidden in a function body, and a relative import is not one."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from service.settings import Settings\n    from . import x\n")
    assert imported_packages(module) == [(1, "os"), (4, "service")]
