"""The architecture's rules, checked on the source: every import statement of the packages (module
level and inside functions alike) is parsed with ``ast``, so a lazy import cannot hide one.

- Dependencies run one way, service -> worker -> models.
- The API process (``service.serve`` and what it imports, transitively) reaches only the torch-free
  part of ``worker/`` (its top-level modules and ``worker.monitoring``) and of ``models/`` (its
  top-level modules). That it really runs without torch is checked in ``tests/test_deploy.py``.
- No import cycles, at module level or inside functions.
- No package holds more than 12 modules at its top: the subpackages say what each part is for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "worker", "service")
# package -> the first-party packages it must never import
FORBIDDEN = {"models": {"worker", "service"}, "worker": {"service"}}
# what the API process may import below the service: torch-free by construction
API_ALLOWED = ("models.errors", "models.defense_mode", "models.bundle_meta", "worker.monitoring")
API_ENTRY_POINTS = ("service.serve", "service.app")
MAX_TOP_MODULES = 12


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


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def first_party_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the first-party modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def reachable(graph: dict[str, set[str]], starts: tuple[str, ...]) -> set[str]:
    seen, todo = set(starts), list(starts)
    while todo:
        for child in graph[todo.pop()]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_run_one_way(package):
    assert violations(package) == []


def test_the_check_sees_lazy_imports(tmp_path):
    """The parser finds an import hidden in a function body, and a relative import is not one."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from service.settings import Settings\n    from . import x\n")
    assert imported_packages(module) == [(1, "os"), (4, "service")]


def test_no_import_cycles():
    assert cycles(import_graph(first_party_modules())) == []


def test_the_cycle_check_finds_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_api_process_reaches_only_the_torch_free_part():
    graph = import_graph(first_party_modules())
    below = sorted(m for m in reachable(graph, API_ENTRY_POINTS) if not m.startswith("service"))
    top_level = {m for m in graph if m.count(".") == 1 and m.startswith("worker.")}
    outside = [m for m in below if m not in top_level and not m.startswith(API_ALLOWED)]
    assert outside == [], "the API process must not import the torch side of worker/ or models/"


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_stay_small_at_their_top(package):
    modules = [p.name for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= MAX_TOP_MODULES, sorted(modules)
