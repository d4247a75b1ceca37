"""The shape of the package: loopscope's modules import one another without cycles, and
nothing in loopscope reaches into prometheus_client's private attributes.

Imports are read from the source (``ast``), at module level and inside functions alike: a
function-level import is still a dependency, only a later one.  Imports under
``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import loopscope

PACKAGE = "loopscope"
#: The public layer's modules, which may import the installation.
PUBLIC = ("_apps", "_factories", "_run", "otel", "testing")
SOURCE = Path(loopscope.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(SOURCE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, at any depth, outside ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]
) -> set[str]:
    """The loopscope modules one import statement of ``module`` loads, by name."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    if source != PACKAGE and not source.startswith(PACKAGE + "."):
        return set()
    targets: set[str] = set()
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        # ``from . import _x`` loads the module _x; ``from ._x import name`` loads _x.
        targets.add(submodule if submodule in known else source)
    return {target for target in targets if target in known}


def _extension_modules() -> set[str]:
    """The compiled modules (``_speedups``): imported, importing nothing of loopscope."""
    names = {path.name.split(".")[0] for path in SOURCE.glob("*.so")}
    names |= {path.stem for path in SOURCE.glob("*.pyi")}
    return {f"{PACKAGE}.{name}" for name in names}


def import_graph() -> dict[str, set[str]]:
    """Each loopscope module and the loopscope modules it imports."""
    modules = _modules()
    known = set(modules) | _extension_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _imports(tree):
            edges |= _targets(name, is_package, node, known)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle is not None:
                return cycle
    return None


class TestImportGraph:
    """The modules of loopscope form layers: no import cycles."""

    def test_the_walk_sees_the_package(self) -> None:
        """The walk finds the package's modules and their imports, function-level too."""
        graph = import_graph()
        assert "loopscope._installation" in graph
        assert "loopscope._options" in graph["loopscope._installation"]
        # _run imports _installation inside a function only.
        assert "loopscope._installation" in graph["loopscope._run"]

    def test_no_cycles(self) -> None:
        """No loopscope module imports, directly or not, one that imports it back."""
        cycle = find_cycle(import_graph())
        assert cycle is None, "import cycle: " + " -> ".join(cycle or [])

    def test_only_the_public_layer_imports_the_installation(self) -> None:
        """Pieces below the installation get a narrow context from it, never import it."""
        graph = import_graph()
        importers = {
            name for name, targets in graph.items() if "loopscope._installation" in targets
        }
        public = {f"{PACKAGE}.{name}" for name in PUBLIC}
        assert importers <= {PACKAGE, *public}

    def test_not_even_for_type_checking(self) -> None:
        """Below the public layer the installation is not named even in type hints: the
        probe and the watchdog declare the narrow context they need (``ProbeContext``,
        ``WatchContext``), which the installation satisfies."""
        public = {f"{PACKAGE}.{name}" for name in PUBLIC}
        naming = []
        for name, path in _modules().items():
            if name in public or name in (PACKAGE, f"{PACKAGE}._installation"):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and "_installation" in (
                    node.module or "",
                    *(alias.name for alias in node.names),
                ):
                    naming.append(f"{name}:{node.lineno}")
        assert naming == []

    def test_a_cycle_is_found(self) -> None:
        """The cycle finder finds a cycle through function-level imports."""
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        assert find_cycle(graph) == ["a", "b", "c", "a"]
        tree = ast.parse(
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from ._x import X\n"
            "def f():\n    from ._y import Y\n"
        )
        names = {node.module for node in _imports(tree) if isinstance(node, ast.ImportFrom)}
        assert names == {"typing", "_y"}


#: prometheus_client's private names loopscope once used, and any ``registry._...``.
_PRIVATE = re.compile(
    r"(?i:registry)\._|(?i:registry), [\"']_|_names_to_collectors|_collector_to_names"
    r"|prometheus_client(\.\w+)*\._"
)


@pytest.mark.parametrize("path", sorted(SOURCE.rglob("*.py")), ids=lambda p: p.name)
def test_no_private_prometheus_client_attributes(path: Path) -> None:
    """Nothing in loopscope reads or rewrites prometheus_client's private attributes."""
    hits = [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _PRIVATE.search(line)
    ]
    assert hits == []
