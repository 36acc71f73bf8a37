"""Trim OpenAI's published OpenAPI document to the operations ``infer serve`` serves.

Usage::

    python tools/trim_openai_openapi.py OPENAPI_JSON tests/openapi/openai-served.json

``OPENAPI_JSON`` is ``openapi.json`` from github.com/openai/openai-openapi (MIT). The output
keeps only the served operations (:data:`SERVED`), the components they reference (followed
through ``$ref`` to a fixed point), and the bearer-key security scheme; nothing in a kept
operation or schema is edited, so Schemathesis checks the server against OpenAI's own words.
Record the source commit in ``tests/openapi/SOURCE.md`` when you refresh it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: path -> the methods the server answers there (OpenAI's paths, under its ``/v1`` server URL).
SERVED: dict[str, tuple[str, ...]] = {
    "/chat/completions": ("post",),
    "/completions": ("post",),
    "/models": ("get",),
    "/models/{model}": ("get",),
    "/responses": ("post",),
}
_PREFIX = "#/components/"


def _refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` target under ``node``."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def trim(document: dict[str, Any]) -> dict[str, Any]:
    """The document with only the :data:`SERVED` operations and what they reference."""
    paths: dict[str, Any] = {}
    for path, methods in SERVED.items():
        item = document["paths"][path]
        # path-level keys (parameters, summary) stay; methods the server does not answer go
        paths[path] = {key: value for key, value in item.items() if key in methods or key not in _METHODS}
    components = document.get("components", {})
    kept: dict[str, dict[str, Any]] = {}
    pending = [ref for ref in _refs(paths)]
    while pending:
        ref = pending.pop()
        if not ref.startswith(_PREFIX):
            raise ValueError(f"unexpected $ref outside components: {ref}")
        section, _, name = ref[len(_PREFIX) :].partition("/")
        if name in kept.get(section, {}):
            continue
        node = components[section][name]
        kept.setdefault(section, {})[name] = node
        pending.extend(_refs(node))
    schemes = components.get("securitySchemes", {})
    used = {name for requirement in document.get("security", []) for name in requirement}
    kept["securitySchemes"] = {name: schemes[name] for name in sorted(used)}
    out = {key: value for key, value in document.items() if key not in ("paths", "components", "webhooks", "x-oaiMeta")}
    out["paths"] = paths
    out["components"] = {section: dict(sorted(kept[section].items())) for section in sorted(kept)}
    return out


_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def main(argv: list[str] | None = None) -> None:
    """Read the full document, write the trimmed one (compact JSON, keys in a stable order)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="OpenAI's openapi.json")
    parser.add_argument("output", type=Path, help="where to write the trimmed document")
    args = parser.parse_args(argv)
    trimmed = trim(json.loads(args.source.read_text(encoding="utf-8")))
    args.output.write_text(json.dumps(trimmed, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    counts = {section: len(entries) for section, entries in trimmed["components"].items()}
    print(f"{sum(len(m) for m in SERVED.values())} operations, components {counts} -> {args.output}")


if __name__ == "__main__":
    main()
