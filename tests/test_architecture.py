"""The package's shape: finetune-internal imports form no cycle, and no module outgrows one screenful of jobs.

The import graph is read from the source with ``ast`` (nothing is imported), so a cycle hidden in a
function body (``def f(): from finetune.train import train``) counts as much as one at the top of a file:
both are a layering that only works by luck of import order.
"""

from __future__ import annotations

import ast
import importlib.util
from collections import deque
from pathlib import Path
from typing import Iterable, Mapping

PACKAGE = "finetune"
# Located, not imported: the graph is read from source, and a module that fails to import is another test's failure.
ROOT = Path(importlib.util.find_spec(PACKAGE).origin).resolve().parent  # type: ignore[arg-type,union-attr]
MAX_LINES = 320

Graph = Mapping[str, Iterable[str]]


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name; a package is named by its ``__init__.py``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package, *parts))] = path
    return out


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def imports_of(name: str, path: Path, modules: Iterable[str]) -> set[str]:
    """The package-internal modules that ``name`` (at ``path``) imports, anywhere in the file.

    ``from a import b`` depends on ``a`` and, where ``b`` is a module, on ``a.b``. ``import a.b`` depends
    on ``a.b`` and also on ``a`` when ``a`` is a package that does not contain the importer (Python runs
    ``a/__init__.py`` first); a package the importer lives in is already being imported, so that implicit
    step is no edge, while an explicit ``from a import x`` from inside ``a`` is one (registry cycles).
    ``importlib.import_module("a.b")`` with a literal name counts as ``import a.b``.
    """
    known = set(modules)
    is_package = path.name == "__init__.py"
    current_package = name if is_package else name.rpartition(".")[0]
    inside = _ancestors(name)
    deps: set[str] = set()

    def add_implicit(target: str) -> None:
        deps.update(a for a in _ancestors(target) if a not in inside)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                deps.add(alias.name)
                add_implicit(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = current_package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            deps.add(base)
            add_implicit(base)
            deps.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            deps.add(node.args[0].value)
            add_implicit(node.args[0].value)
    # A package's __init__ importing its own submodules (``from . import x``) is no edge to itself.
    return {d for d in deps if d in known and d != name}


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    files = module_files(root, package)
    return {name: imports_of(name, path, files) for name, path in files.items()}


def _strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative: no recursion limit on big graphs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                components.append(sorted(component))
    return components


def _shortest_cycle_through(graph: Graph, start: str, within: set[str]) -> list[str]:
    # Breadth-first from start back to start, inside one component: the shortest cycle it is on.
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, ())):
            if child not in within:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return []


def find_cycles(graph: Graph) -> list[list[str]]:
    """The shortest cycle through each module that is on one, each cycle listed once.

    A cycle starts and ends with its alphabetically first module, so the same cycle found from two of
    its modules reads the same; a module importing itself is a cycle of one.
    """
    cycles: set[tuple[str, ...]] = set()
    for component in _strongly_connected(graph):
        if len(component) == 1 and component[0] not in graph.get(component[0], ()):
            continue
        for start in component:
            ring = _shortest_cycle_through(graph, start, set(component))[:-1]
            first = ring.index(min(ring))
            ring = ring[first:] + ring[:first]
            cycles.add((*ring, ring[0]))
    return sorted(list(c) for c in cycles)


def format_cycles(cycles: Iterable[list[str]]) -> str:
    return "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_detector_on_a_synthetic_graph() -> None:
    graph = {
        "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a", "p.d"},  # a -> b -> c -> a
        "p.d": {"p.e"}, "p.e": set(),  # a chain hanging off the cycle
        "p.x": {"p.y"}, "p.y": {"p.x"},  # a second, separate cycle
        "p.self": {"p.self"},
    }
    assert find_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"], ["p.self", "p.self"], ["p.x", "p.y", "p.x"]]
    assert format_cycles(find_cycles(graph)).splitlines()[0] == "p.a -> p.b -> p.c -> p.a"
    assert find_cycles({"p.a": {"p.b", "p.c"}, "p.b": {"p.c"}, "p.c": set()}) == []  # a diamond is no cycle
    # Two cycles through a: the shortest is shown for a, the longer one for c and d, which are on no other.
    assert find_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"a"}}) == [
        ["a", "b", "a"], ["a", "c", "d", "a"]]


def test_import_graph_reads_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import top\n")
    (pkg / "top.py").write_text("def f():\n    import pkg.sub.leaf\n")
    (pkg / "other.py").write_text("class C:\n    def m(self):\n        from .sub import leaf as _\n")
    (pkg / "sub" / "__init__.py").write_text("from . import reg, leaf\n")
    (pkg / "sub" / "reg.py").write_text("import json\n")
    (pkg / "sub" / "leaf.py").write_text("from pkg.sub import reg\nfrom ..top import f\n"
                                         "import importlib\nimportlib.import_module('pkg.other')\n")
    graph = import_graph(pkg, "pkg")
    assert graph == {
        "pkg": {"pkg.top"},
        "pkg.top": {"pkg.sub", "pkg.sub.leaf"},  # pkg.sub/__init__ runs first: an edge too
        "pkg.other": {"pkg.sub", "pkg.sub.leaf"},
        "pkg.sub": {"pkg.sub.reg", "pkg.sub.leaf"},  # a package importing its own modules
        "pkg.sub.reg": set(),
        "pkg.sub.leaf": {"pkg.sub", "pkg.sub.reg", "pkg.top", "pkg.other"},  # its own package's __init__ counts
    }
    assert format_cycles(find_cycles(graph)).splitlines() == [
        "pkg.other -> pkg.sub.leaf -> pkg.other",
        "pkg.sub -> pkg.sub.leaf -> pkg.sub",
        "pkg.sub.leaf -> pkg.top -> pkg.sub.leaf",
    ]


def test_no_import_cycles_inside_finetune() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between finetune modules:\n" + format_cycles(cycles)


def test_no_module_is_over_the_line_limit() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    assert len(sizes) > 10  # the package was found
    over = {name: n for name, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by job): " + ", ".join(
        f"{name} ({n})" for name, n in over.items())
