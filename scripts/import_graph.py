"""The import graph of `src/pid_decoder` and its cycles.

    python scripts/import_graph.py                  # cycles over top-level and function-level imports
    python scripts/import_graph.py --top-level      # only the imports that run when a module is imported
    python scripts/import_graph.py --only pid_decoder.weights pid_decoder.backbones   # cycles touching these

An edge A -> B is an ``import`` / ``from ... import`` in A that names B, at module level or inside a function
(imports under ``if TYPE_CHECKING:`` never run and are skipped). ``from pkg import name`` points at the submodule
``pkg.name`` when there is one, else at ``pkg``. The implicit import of a module's parent package is not an edge:
a package whose ``__init__`` re-exports its submodules would otherwise form a cycle with each of them.

A cycle is reported per strongly connected component: its modules and one shortest loop through them, each step
with the line that makes it (``lazy`` marks a function-level import). Exit status 1 when a reported cycle exists.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "pid_decoder"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function: runs when the function is called, not on import


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module):
    """(node, lazy) for every import that can run, in source order."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        for child in reversed(list(ast.iter_child_nodes(node))):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend((c, lazy) for c in reversed(child.orelse))
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            stack.append((child, inner))


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def build_graph(root: Path = ROOT, package: str = PACKAGE) -> tuple[dict[str, Path], list[Edge]]:
    modules = module_names(root, package)
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, lazy in sorted(_imports(tree), key=lambda item: item[0].lineno):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _base(module, is_package, node)
                if base is None:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in dict.fromkeys(targets):
                while target not in modules and "." in target:  # `import pkg.mod.attr` style names
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != module:
                    edges.append(Edge(module, target, node.lineno, lazy))
    return modules, edges


def strongly_connected(nodes: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's components, iteratively (the package is small, but recursion limits are not a design)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(succ.get(start, ())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                    out.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(succ.get(child, ()))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def shortest_loop(start: str, members: set[str], by_pair: dict[tuple[str, str], Edge]) -> list[Edge]:
    """The shortest cycle from ``start`` back to itself inside one component (breadth-first)."""
    succ: dict[str, list[str]] = {}
    for a, b in by_pair:
        if a in members and b in members:
            succ.setdefault(a, []).append(b)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(succ.get(node, ())):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                hops = list(reversed(path)) + [start]
                return [by_pair[a, b] for a, b in pairwise(hops)]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a component but on no cycle")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-level", action="store_true", help="ignore function-level (lazy) imports")
    parser.add_argument("--only", nargs="+", metavar="MODULE", help="report only cycles through these modules "
                        "(a package name covers its submodules)")
    args = parser.parse_args(argv)

    modules, edges = build_graph()
    if args.top_level:
        edges = [e for e in edges if not e.lazy]
    by_pair: dict[tuple[str, str], Edge] = {}
    for edge in edges:  # a top-level import of a pair wins over a lazy one: it is the one that runs first
        kept = by_pair.get((edge.source, edge.target))
        if kept is None or (kept.lazy and not edge.lazy):
            by_pair[edge.source, edge.target] = edge
    succ: dict[str, list[str]] = {}
    for a, b in sorted(by_pair):
        succ.setdefault(a, []).append(b)
    cycles = [c for c in strongly_connected(sorted(modules), succ) if len(c) > 1]
    if args.only:
        wanted = tuple(args.only)
        cycles = [c for c in cycles if any(m == w or m.startswith(w + ".") for m in c for w in wanted)]

    lazy = sum(e.lazy for e in by_pair.values())
    print(f"{len(modules)} modules, {len(by_pair)} import edges ({lazy} function-level)")
    if not cycles:
        print("no cycles" + (f" through {', '.join(args.only)}" if args.only else ""))
        return 0
    for component in cycles:
        print(f"\ncycle among {len(component)} modules: {', '.join(component)}")
        for edge in shortest_loop(component[0], set(component), by_pair):
            where = f"{modules[edge.source].relative_to(ROOT.parent)}:{edge.line}"
            print(f"  {edge.source} -> {edge.target}  ({where}{', lazy' if edge.lazy else ''})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
