"""No import cycles among explaind's modules, counting the imports made inside functions.

The graph is read from the source (AST), not from ``sys.modules``: every ``import`` and
``from ... import`` statement counts wherever it stands (module level, inside a function or a
method), and so does ``importlib.import_module("a.literal.name")``. Only imports under
``if TYPE_CHECKING:`` are left out, since they never run. Importing ``pkg.sub`` also runs
``pkg/__init__.py``, so such an import is an edge to ``pkg`` as well, unless the importing module
is itself inside ``pkg`` (then ``pkg`` is already initialised or being initialised).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Package directories whose modules form the graph.
PACKAGES = (
    REPO / "explaind",
    REPO / "plugins" / "explaind_architectures",
    REPO / "plugins" / "explaind_losses",
    REPO / "plugins" / "explaind_optimizers",
    REPO / "plugins" / "explaind_pruning",
)

#: Modules whose cycles are not reported (none).
EXCLUDED: tuple[str, ...] = ()

Edge = tuple[str, int]  # (imported module, line of the import statement)


def package_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of a package directory."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(nodes: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """Import statements and literal ``import_module`` calls in or below ``nodes`` (not under TYPE_CHECKING)."""
    for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            yield node
        yield from _import_nodes(ast.iter_child_nodes(node))


def _named(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """Dotted names an import node brings in (each submodule imported by name, else its package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.Call):
        return [str(node.args[0].value)]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join([*anchor, *([node.module] if node.module else [])])
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]


def module_imports(module: str, path: Path, known: dict[str, Path]) -> set[Edge]:
    """The modules of ``known`` that importing (and running every function of) ``module`` may import."""
    edges: set[Edge] = set()
    is_package = path.name == "__init__.py"
    for node in _import_nodes([ast.parse(path.read_text(encoding="utf-8"), str(path))]):
        for name in _named(node, module, is_package, known):
            parts = name.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            for end in range(1, len(parts) + 1):
                target = ".".join(parts[:end])
                explicit = end == len(parts)
                inside = module.startswith(target + ".")
                if target in known and target != module and (explicit or not inside):
                    edges.add((target, node.lineno))
    return edges


def import_graph(package_dirs: tuple[Path, ...] = PACKAGES) -> dict[str, set[Edge]]:
    """``module -> {(imported module, line)}`` over every module of ``package_dirs``."""
    known: dict[str, Path] = {}
    for package_dir in package_dirs:
        known.update(package_modules(package_dir))
    return {module: module_imports(module, path, known) for module, path in known.items()}


def find_cycles(graph: dict[str, set[Edge]], excluded: tuple[str, ...] = ()) -> list[list[Edge]]:
    """One shortest cycle per strongly connected component with more than one module.

    Modules equal to or under a name in ``excluded`` are dropped from the graph first. A cycle is
    returned as its edges ``[(module, line), ...]``: module ``i`` is imported at that line of module
    ``i - 1`` (the first one by the last).
    """

    def kept(name: str) -> bool:
        return not any(name == ex or name.startswith(ex + ".") for ex in excluded)

    succ = {m: {t: line for t, line in sorted(edges) if kept(t)} for m, edges in graph.items() if kept(m)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in succ.get(node, {}):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(succ):
        if node not in index:
            strongconnect(node)
    return [_shortest_cycle(min(component), component, succ) for component in components]


def _shortest_cycle(start: str, component: set[str], succ: dict[str, dict[str, int]]) -> list[Edge]:
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in succ[node]:
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    order = path[::-1]
                    return [(b, succ[a][b]) for a, b in zip(order, [*order[1:], start])]
                if nxt in component and nxt not in parent:
                    parent[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component always has one


def describe(cycle: list[Edge]) -> str:
    """``a -> b (line 12 of a) -> a (line 40 of b)``."""
    first = cycle[-1][0]
    steps, previous = [first], first
    for module, line in cycle:
        steps.append(f"{module} (line {line} of {previous})")
        previous = module
    return " -> ".join(steps)


def test_explaind_has_no_import_cycles():
    cycles = find_cycles(import_graph(), EXCLUDED)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(map(describe, cycles))


# ------------------------------------------------------------------------------------ the detector itself
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root / "pkg"


@pytest.mark.parametrize("text, cyclic", [
    ("def f():\n    from .a import x\n", True),
    ("import pkg.a\n", True),
    ("import importlib\n\ndef f():\n    return importlib.import_module('pkg.a')\n", True),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n", False),
    ("from . import c\n", False),
])
def test_detector_counts_deferred_imports(tmp_path, text, cyclic):
    pkg = _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from .b import y\n", "pkg/b.py": text,
                            "pkg/c.py": ""})
    cycles = find_cycles(import_graph((pkg,)))
    assert bool(cycles) is cyclic
    if cyclic:
        assert describe(cycles[0]).startswith("pkg.a -> pkg.b (line 1 of pkg.a) -> pkg.a (line ")


def test_detector_follows_package_inits_and_exclusions(tmp_path):
    pkg = _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from .sub.b import y\n",
                            "pkg/sub/__init__.py": "from .b import y\n", "pkg/sub/b.py": "y = 1\n",
                            "pkg/sub/c.py": "from ..a import z\n", "pkg/sub/d.py": "from . import c\n"})
    graph = import_graph((pkg,))
    assert {t for t, _ in graph["pkg.a"]} == {"pkg.sub", "pkg.sub.b"}
    assert {t for t, _ in graph["pkg.sub.d"]} == {"pkg.sub.c"}  # its own package is not re-entered
    assert find_cycles(graph) == []
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n", encoding="utf-8")
    assert len(find_cycles(import_graph((pkg,)))) == 1
    assert find_cycles(import_graph((pkg,)), excluded=("pkg.sub",)) == []
