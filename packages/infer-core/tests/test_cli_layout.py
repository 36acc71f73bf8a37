"""The CLI package's shape: command modules share only ``infer.cli.common``, and building the
parser imports neither the server nor a numeric library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import infer.cli
import infer.serve

pytestmark = pytest.mark.unit

CLI = Path(infer.cli.__file__).parent
SERVE = Path(infer.serve.__file__).parent
#: Modules that register commands on the parser; none may import another, or the parser.
COMMAND_MODULES = [CLI / "run.py", CLI / "models.py", CLI / "chat.py", SERVE / "cli.py", SERVE / "ray_cli.py"]


def _cli_imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` for every name ``path`` imports from the ``infer.cli`` package, at any depth."""
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[:2] == ["infer", "cli"]:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[:2] == ["infer", "cli"]]
    return found


@pytest.mark.parametrize("path", COMMAND_MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_command_modules_import_only_public_names_of_the_common_module(path: Path) -> None:
    imports = _cli_imports(path)
    assert imports, f"{path.name} registers commands without the shared arguments"
    for module, name in imports:
        assert module == "infer.cli.common", f"{path.name} imports {module}"
        assert not name.startswith("_"), f"{path.name} imports the private {name}"


def test_common_names_are_exactly_what_the_common_module_exports() -> None:
    from infer.cli import common

    used = {name for path in COMMAND_MODULES for _, name in _cli_imports(path)}
    assert used <= set(common.__all__)
    assert all(hasattr(common, name) for name in common.__all__)


def test_building_the_parser_imports_no_server_app_and_no_numeric_library() -> None:
    code = (
        "import sys\n"
        "import infer.cli\n"
        "early = sorted(m for m in sys.modules if m.startswith('infer.serve'))\n"
        "from infer.cli.main import build_parser\n"
        "build_parser()\n"
        "heavy = ('numpy', 'onnxruntime', 'starlette', 'uvicorn', 'infer.serve.app', 'infer.model')\n"
        "print(early, sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"
