"""The ``infer`` command line: the parser, ``infer backends``, and the exit statuses.

Every command imports what it needs when it runs, so ``infer --help`` stays instant. Bad
arguments exit with status 2 and one line on stderr; typed errors from infer print their message
(status 2 for bad requests and missing models, 1 for failures); nothing prints a traceback
unless ``INFER_DEBUG=1``. The commands live one group a module (:mod:`infer.cli.run`,
:mod:`infer.cli.models`, :mod:`infer.cli.chat`, and the server's :mod:`infer.serve.cli`), each
built on :mod:`infer.cli.common`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from infer.cli.common import Parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``infer`` parser with every command registered; a command's handler is in ``func``."""
    from infer.cli.chat import add_chat_command
    from infer.cli.models import add_model_commands
    from infer.cli.run import add_run_commands
    from infer.serve.cli import add_serve_command

    parser = Parser(prog="infer", description="A plugin-based LLM inference microkernel.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log events (model loaded, requests) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("backends", help="list installed backends and plugins that failed to load")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_backends)

    add_run_commands(sub)
    add_model_commands(sub)
    add_serve_command(sub)
    add_chat_command(sub)
    return parser


def _cmd_backends(args: argparse.Namespace) -> int:
    from infer.contract import CONTRACT_VERSION
    from infer.plugins import get_registry

    reg = get_registry()
    rows: list[dict[str, Any]] = [
        {
            "name": b.name,
            "version": b.version or b.info.version,
            "contract": b.info.contract_version,
            "devices": list(b.info.devices),
            "dtypes": list(b.info.dtypes),
            "capabilities": sorted(c.value for c in b.info.capabilities),
            "max_batch_size": b.info.max_batch_size,
            "available": b.info.available,
            "unavailable_reason": b.info.unavailable_reason,
        }
        for b in sorted(reg.backends.values(), key=lambda b: (-b.info.priority, b.name))
    ]
    failed = [{"name": f.name, "version": f.version, "error": f.error} for f in reg.failures]
    if args.json:
        print(json.dumps({"contract": CONTRACT_VERSION, "backends": rows, "failed": failed, "disabled": reg.disabled}))
        return 0
    print(f"infer contract {CONTRACT_VERSION}")
    if not rows:
        print("no backends installed: pip install 'infer-core[onnx]'")
    for r in rows:
        status = "available" if r["available"] else f"unavailable: {r['unavailable_reason']}"
        print(f"  {r['name']:<10} {r['version']:<10} contract {r['contract']:<5} {status}")
        devices, dtypes = ", ".join(r["devices"]), ", ".join(r["dtypes"])
        print(f"      devices: {devices}; dtypes: {dtypes}; max batch {r['max_batch_size']}")
        print(f"      capabilities: {', '.join(r['capabilities']) or '-'}")
    for f in failed:
        print(f"  {f['name']:<10} {f['version'] or '?':<10} FAILED: {f['error']}")
    for name in reg.disabled:
        print(f"  {name:<10} disabled by INFER_PLUGINS / INFER_DISABLE_PLUGINS")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infer`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from infer.errors import BackendNotFoundError, BackendUnavailableError, InferError, ModelNotFoundError, RequestError
    from infer.log import configure_logging

    if args.verbose:
        configure_logging(level="info")
    try:
        return int(args.func(args))
    except (RequestError, ModelNotFoundError, BackendNotFoundError, BackendUnavailableError) as exc:
        if os.environ.get("INFER_DEBUG"):
            raise
        print(f"infer: error: {exc}", file=sys.stderr)
        return 2
    except InferError as exc:
        if os.environ.get("INFER_DEBUG"):
            raise
        print(f"infer: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("infer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
