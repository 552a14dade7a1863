"""The folders tell the architecture: forbidden imports and package cycles fail here.

Every module under ``agentworker/`` is parsed with :mod:`ast` (nothing is imported), and every import
statement in it counts — at module level and inside functions, since a lazy import is still a
dependency. Imports under ``if TYPE_CHECKING:`` are left out: they never run, and they are how a module
names a type of a layer above it without depending on it. Imports by string (``importlib``) are not
seen; :func:`test_the_supervisor_process_loads_no_job_side_module` catches those for the supervisor.

Nodes: each subpackage ``agentworker/X/`` is one node (``X/``), each top-level module
``agentworker/x.py`` is one (``x``), and the package's own ``__init__`` is ``agentworker``. Rules:

* ``supervisor/`` imports none of ``graphs/``, ``tasks/``, ``tools/`` (the job side) nor ``pools/`` (the
  worker process): workers are separate processes it talks to through exit codes and files;
* ``graphs/`` imports neither ``supervisor/`` nor ``pools/``: only ``pools/`` wires tasks, graphs and tools;
* no cycle between nodes: the failure names the cycle and, for each step, the file and line importing.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "agentworker"

#: node -> the nodes it must not import (directly)
FORBIDDEN: dict[str, frozenset[str]] = {
    "supervisor/": frozenset({"graphs/", "tasks/", "tools/", "pools/"}),
    "graphs/": frozenset({"supervisor/", "pools/"}),
}


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # node
    target: str  # node
    path: Path
    line: int
    module: str  # the imported module's dotted name

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root.parent)}:{self.line} imports {self.module}"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _node(module: str, root: Path) -> str | None:
    """The node of a dotted module name inside the package, or None for anything outside it."""
    parts = module.split(".")
    if parts[0] != root.name:
        return None
    if len(parts) == 1:
        return root.name
    if (root / parts[1]).is_dir():
        return parts[1] + "/"
    if (root / f"{parts[1]}.py").is_file():
        return parts[1]
    return root.name  # a name defined in the package's __init__ (``from agentworker import __version__``)


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_statements(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import in ``tree``, at any depth, except those under ``if TYPE_CHECKING:`` (its ``else:``
    branch does run, so it counts)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imported_modules(statement: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(statement, ast.Import):
        return [alias.name for alias in statement.names]
    if statement.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - statement.level + 1])
        prefix = f"{base}.{statement.module}" if statement.module else base
    else:
        prefix = statement.module or ""
    # ``from a import b`` imports ``a`` and, if it is a module, ``a.b``: both are candidates; the node of
    # ``a.b`` is the finer one when ``a`` is the package itself.
    return [prefix, *(f"{prefix}.{alias.name}" for alias in statement.names if alias.name != "*")]


def package_imports(root: Path) -> list[Import]:
    """Every import between two different nodes of the package at ``root``."""
    found: list[Import] = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        source = _node(module, root)
        assert source is not None
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for statement in _import_statements(tree):
            candidates = _imported_modules(statement, module, path.name == "__init__.py")
            targets = {}
            for name in candidates:
                target = _node(name, root)
                if target is not None:
                    targets.setdefault(target, name)
            if root.name in targets and len(targets) > 1:
                del targets[root.name]  # ``from agentworker import jobs`` imports jobs, not the __init__
            for target, name in targets.items():
                if target != source:
                    found.append(Import(source, target, path, statement.lineno, name))
    return found


def forbidden_imports(imports: list[Import]) -> list[Import]:
    return [i for i in imports if i.target in FORBIDDEN.get(i.source, frozenset())]


def find_cycles(imports: list[Import]) -> list[list[Import]]:
    """One cycle (as the imports along it) per strongly connected component of more than one node."""
    edges: dict[str, dict[str, Import]] = {}
    for i in imports:
        edges.setdefault(i.source, {}).setdefault(i.target, i)
        edges.setdefault(i.target, {})
    cycles = []
    for component in _strongly_connected(edges):
        if len(component) > 1:
            cycles.append(_cycle_in(sorted(component)[0], component, edges))
    return cycles


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's algorithm (iterative: no recursion limit to think about)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _cycle_in(start: str, component: set[str], edges: dict[str, dict[str, Import]]) -> list[Import]:
    """The shortest cycle through ``start`` inside its component (breadth-first)."""
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target, edge in sorted(edges[node].items()):
                if target not in component:
                    continue
                if target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_from[path[0].source])
                    return path
                if target not in came_from:
                    came_from[target] = edge
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def describe_cycle(cycle: list[Import], root: Path) -> str:
    nodes = " -> ".join([cycle[0].source, *(i.target for i in cycle)])
    return f"package cycle {nodes}:\n" + "\n".join(f"    {i.where(root)}" for i in cycle)


# -- the package ------------------------------------------------------------------------------------------


def test_no_forbidden_import() -> None:
    imports = package_imports(PACKAGE)
    bad = forbidden_imports(imports)
    assert not bad, "forbidden imports (see tests/test_architecture.py):\n" + "\n".join(
        f"    {i.source} must not import {i.target}: {i.where(PACKAGE)}" for i in bad)


def test_no_package_cycle() -> None:
    cycles = find_cycles(package_imports(PACKAGE))
    assert not cycles, "\n".join(describe_cycle(cycle, PACKAGE) for cycle in cycles)


def test_the_analysis_sees_the_package() -> None:
    # A parser that saw nothing would pass the two tests above: check it sees imports known to exist.
    edges = {(i.source, i.target) for i in package_imports(PACKAGE)}
    assert {("pools/", "tasks/"), ("cli", "supervisor/"), ("client", "submit"), ("tasks/", "graphs/")} <= edges


def test_the_supervisor_process_loads_no_job_side_module() -> None:
    # What ast cannot see (imports by name, in a library's code): import every supervisor module for real.
    code = ("import pkgutil, importlib, sys, agentworker.supervisor as s\n"
            "for m in pkgutil.iter_modules(s.__path__):\n"
            "    importlib.import_module('agentworker.supervisor.' + m.name)\n"
            "import agentworker.supervisor.runner\n"
            "print('\\n'.join(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          check=True)
    loaded = done.stdout.split()
    assert "agentworker.supervisor.zygote" in loaded
    job_side = [m for m in loaded if m.split(".")[:2] in (["agentworker", part] for part in
                                                         ("graphs", "tasks", "tools", "pools"))]
    assert not job_side, f"the supervisor process loads {job_side}"
    assert not [m for m in loaded if m.split(".")[0] in ("langgraph", "langchain", "langchain_core")]


def test_the_supervisor_and_the_zygote_agree_on_what_they_share() -> None:
    # The supervisor keeps its own copies (it never imports pools/): they must be the zygote's values.
    from agentworker.pools import zygote_process
    from agentworker.supervisor import process, zygote

    assert zygote_process.__name__ == zygote.ZYGOTE_MODULE
    assert process.WORKER_MODULE == zygote_process.WORKER_MODULE == "agentworker.pools.worker"
    assert zygote.ZYGOTE_EXIT_UNSAFE == zygote_process.EXIT_UNSAFE


# -- the analysis itself, on a package planted in tmp_path --------------------------------------------------


def _plant(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_a_planted_cycle_is_reported_with_its_path(tmp_path: Path) -> None:
    package = _plant(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import thing\n",
        "b/__init__.py": "",
        "b/thing.py": "def f():\n    from pkg import c  # lazy: still a dependency\n",
        "c.py": "from . import a\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
        "e.py": "import pkg.d\n",
    })
    (cycle,) = find_cycles(package_imports(package))
    message = describe_cycle(cycle, package)
    assert message.splitlines()[0] == "package cycle a -> b/ -> c -> a:"
    assert "pkg/b/thing.py:2 imports pkg.c" in message and "pkg/c.py:1 imports pkg.a" in message
    assert ("d", "a") not in {(i.source, i.target) for i in package_imports(package)}, "TYPE_CHECKING is left out"


def test_a_planted_forbidden_import_is_reported(tmp_path: Path) -> None:
    package = _plant(tmp_path, {
        "__init__.py": "",
        "supervisor/__init__.py": "",
        "supervisor/run.py": "import os\n\ndef start():\n    import pkg.tasks.registry\n",
        "tasks/__init__.py": "",
        "tasks/registry.py": "",
        "graphs/__init__.py": "from ..supervisor import run\n",
    })
    bad = {(i.source, i.target, i.line) for i in forbidden_imports(package_imports(package))}
    assert bad == {("supervisor/", "tasks/", 4), ("graphs/", "supervisor/", 1)}
