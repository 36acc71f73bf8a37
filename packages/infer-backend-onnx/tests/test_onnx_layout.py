"""The backend's module shape: no import cycles, and no module reaching into another's privates."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import infer_backend_onnx

pytestmark = pytest.mark.unit

PACKAGE = Path(infer_backend_onnx.__file__).parent
MODULES = {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """The package's modules that ``tree`` imports, anywhere (functions and TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found |= {n.split(".")[1] for n in names if n.startswith("infer_backend_onnx.")}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or ``None``."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            if found := visit(nxt, [*path, node]):
                return found
        done.add(node)
        return None

    return next((c for n in sorted(graph) if (c := visit(n, []))), None)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_backend_modules_import_one_another_without_cycles() -> None:
    graph = {name: _imports(tree) - {name} for name, tree in MODULES.items()}
    assert _cycle(graph) is None


@pytest.mark.parametrize("name", ["runtime", "exports", "loading"])
def test_modules_touch_no_private_attribute_of_another_object(name: str) -> None:
    # ``self._x`` is a class's own business; ``other._x`` couples two classes' internals.
    reaching = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(MODULES[name])
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]
    assert reaching == []
