"""How infer-core's modules import each other: the contract and the sampler are in no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import infer

pytestmark = pytest.mark.unit

SOURCE = Path(infer.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("infer", *path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is imported: its top level, outside ``if TYPE_CHECKING:`` blocks.

    Imports inside functions run on use, once every module involved has finished importing, and
    type-checking imports never run: neither can leave a module half-initialised.
    """
    found: list[ast.Import | ast.ImportFrom] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            found += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def _imports(path: Path, name: str, known: set[str], *, everywhere: bool) -> set[str]:
    """The infer modules ``path`` imports: at import time, or ``everywhere`` (type-checking blocks, functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = list(ast.walk(tree)) if everywhere else _runtime_imports(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import sub` imports the module pkg.sub when there is one.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # Importing infer.a.b runs infer/a/__init__.py first: an edge to each parent package.
            # The top-level package is left out (its imports are lazy, see infer._lazy), and so are
            # the importer's own packages: they are already importing when it runs.
            pieces = target.split(".")
            for end in range(2, len(pieces) + 1):
                candidate = ".".join(pieces[:end])
                if candidate in known and candidate != name and not name.startswith(candidate + "."):
                    found.add(candidate)
    return found


def _graph(*, everywhere: bool = False) -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in SOURCE.rglob("*.py")}
    known = set(paths)
    return {name: _imports(path, name, known, everywhere=everywhere) for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
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
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _touching_the_contract_or_the_sampler(graph: dict[str, set[str]]) -> list[list[str]]:
    return [
        sorted(cycle)
        for cycle in _cycles(graph)
        if any(m in {"infer.hookspecs", "infer.markers"} or m.startswith("infer.sampling") for m in cycle)
    ]


def test_the_import_graph_sees_the_sampler_packages_rooms():
    graph = _graph()
    assert {"infer.sampling.params", "infer.sampling.state", "infer.sampling.chain"} <= graph["infer.sampling"]
    assert {"infer.sampling.params", "infer.sampling.state"} <= _graph(everywhere=True)["infer.hookspecs"]


def test_a_cycle_is_found_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_the_contract_and_the_sampler_are_in_no_import_time_cycle():
    assert _touching_the_contract_or_the_sampler(_graph()) == []


def test_the_contract_names_the_samplers_types_without_a_cycle_but_through_the_constraint_type():
    graph = _graph(everywhere=True)
    # SamplingParams.constraint is typed and checked as infer.structured.Constraint, and
    # infer.structured is a sampling plugin: the one way back, left for a later step.
    graph["infer.sampling.params"].discard("infer.structured")
    assert _touching_the_contract_or_the_sampler(graph) == []


def test_the_contract_imports_only_the_samplers_parameter_and_state_types():
    graph = _graph(everywhere=True)
    assert {m for m in graph["infer.hookspecs"] if m.startswith("infer.sampling")} == {
        "infer.sampling",  # the package of the two, which hands on names only
        "infer.sampling.params",
        "infer.sampling.state",
    }
    assert "infer.hookspecs" not in set().union(*(graph[m] for m in graph if m.startswith("infer.sampling")))


def test_importing_the_hookspecs_imports_no_sampler_module():
    code = "import sys, infer.hookspecs; print(sorted(m for m in sys.modules if m.startswith('infer.sampling')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_sampling_parameters_depend_on_no_other_room_of_the_sampler():
    graph = _graph(everywhere=True)
    assert {m for m in graph["infer.sampling.params"] if m.startswith("infer.sampling")} == set()
