"""What every ``infer`` command shares: argument types, the model arguments, and loading.

The command modules (``infer.cli.main``, ``models``, ``chat``) and the server's
(``infer.serve.cli``, ``infer.serve.ray_cli``) import these names and nothing else from the CLI,
so no command module imports another. Like the rest of the CLI, this module imports only the
standard library at import time: ``infer --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

if TYPE_CHECKING:
    from infer.model import Model

__all__ = [
    "Parser",
    "Subcommands",
    "add_model_arguments",
    "bounded",
    "load_model",
    "load_options",
    "positive_int",
]


class Parser(argparse.ArgumentParser):
    """The parser of ``infer`` and of each of its commands: a usage error is one line on stderr
    that points at ``--help``, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Exit with status 2 and ``message``."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


#: What a command module's ``add_*_command(s)`` function registers its commands on.
Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"


def bounded(convert: Callable[[str], Any], *, minimum: float, inclusive: bool, expected: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text, then require a finite value above ``minimum``
    (or equal to it when ``inclusive``); ``expected`` describes a good value in the error."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        in_range = value >= minimum if inclusive else value > minimum
        if not in_range or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


#: An argparse ``type=`` for counts that must be at least 1.
positive_int = bounded(int, minimum=0, inclusive=False, expected="a positive integer")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments every model command shares: the model, ``--backend``, ``--device``,
    ``--dtype`` and ``-o KEY=VALUE`` backend options (read back by :func:`load_model`)."""
    parser.add_argument("model", help="model folder, .gguf file, pulled model name, hf:ORG/NAME, or backend ref")
    parser.add_argument("--backend", help="backend name (default: the best installed one)")
    parser.add_argument("--device", help="device, e.g. cpu or cuda (default: the backend's)")
    parser.add_argument("--dtype", help="precision, e.g. fp32 or int4 (default: the backend's)")
    parser.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="backend load option (JSON value)"
    )


def load_options(pairs: Sequence[str]) -> dict[str, Any]:
    """Backend load options from ``-o KEY=VALUE`` pairs: a value is JSON when it parses as JSON,
    else the text itself; a pair without ``=`` or key raises :class:`~infer.errors.InvalidParameterError`."""
    from infer.errors import InvalidParameterError

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidParameterError("--option", pair, "KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def load_model(args: argparse.Namespace, **engine: Any) -> Model:
    """Load the model that :func:`add_model_arguments`' arguments name; ``engine`` adds core load
    options (``prefix_cache``, ``speculative``...)."""
    import infer

    options = load_options(args.option)
    return infer.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype, **engine, **options)
