"""The model-management commands of the ``infer`` CLI: ``convert``, ``pull`` and ``list``.

:func:`add_model_commands` registers them on the main parser's subcommands; each handler takes
the parsed arguments and returns the exit status. Typed errors propagate to the CLI's main,
which prints them as one line. Heavy modules are imported inside the handlers so that
``infer --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infer.cli.common import Subcommands

__all__ = ["add_model_commands"]


def add_model_commands(subparsers: Subcommands) -> None:
    """Register ``convert``, ``pull`` and ``list`` with handlers in ``func``."""
    p = subparsers.add_parser("convert", help="import a GGUF file into a model folder (float32 safetensors)")
    p.add_argument("gguf", type=Path, metavar="FILE.gguf", help="GGUF file to import")
    p.add_argument("out", type=Path, metavar="OUT", help="model folder to write (new, empty, or an earlier import)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = subparsers.add_parser("pull", help="download a known model into the local store")
    p.add_argument("name", help="model name (see 'infer list --available')")
    p.add_argument("--force", action="store_true", help="fetch and convert again even if already stored")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pull)

    p = subparsers.add_parser("list", help="list models in the local store")
    p.add_argument("--available", action="store_true", help="list the models 'infer pull' can fetch instead")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_list)


def _cmd_convert(args: argparse.Namespace) -> int:
    from infer.gguf_import import import_gguf
    from infer.progress import ProgressBar

    bar = ProgressBar(None if args.quiet else sys.stderr)
    out = import_gguf(args.gguf, args.out, progress=bar.stage("converting"))
    print(out)
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from infer.pull import pull

    print(pull(args.name, progress=not args.quiet, force=args.force))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    if args.available:
        from infer.pull import KNOWN_MODELS

        known = [{"name": m.name, "description": m.description} for m in KNOWN_MODELS.values()]
        if args.json:
            print(json.dumps(known))
        else:
            for entry in known:
                print(f"{entry['name']}  {entry['description']}")
        return 0

    from infer.store import infer_home, list_models

    models = list_models()
    if args.json:
        print(
            json.dumps(
                [
                    {"name": m.name, "kind": m.kind, "chat": m.chat, "size_bytes": m.size_bytes, "path": str(m.path)}
                    for m in models
                ]
            )
        )
        return 0
    if not models:
        print(f"no models in {infer_home()}; fetch one with 'infer pull NAME' (see 'infer list --available')")
        return 0
    width = max(len(m.name) for m in models)
    for m in models:
        # A base model has no chat template: `infer run` completes its prompt as text.
        role = "chat" if m.chat else "base"
        print(f"{m.name:<{width}}  {m.kind:<9}  {role}  {m.size_bytes / 1e6:9.1f} MB  {m.path}")
    return 0
