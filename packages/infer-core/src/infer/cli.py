"""The ``infer`` command line.

Every command imports what it needs when it runs, so ``infer --help`` stays instant. Bad
arguments exit with status 2 and one line on stderr; typed errors from infer print their message
(status 2 for bad requests and missing models, 1 for failures); nothing prints a traceback
unless ``INFER_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def bounded(convert: Callable[[str], Any], *, minimum: float, inclusive: bool, expected: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text, then require a finite value above ``minimum``."""

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


_positive_int = bounded(int, minimum=0, inclusive=False, expected="a positive integer")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="infer", description="A plugin-based LLM inference microkernel.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log events (model loaded, requests) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("backends", help="list installed backends and plugins that failed to load")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_backends)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="model folder, .gguf file, pulled model name, hf:ORG/NAME, or backend ref")
        p.add_argument("--backend", help="backend name (default: the best installed one)")
        p.add_argument("--device", help="device, e.g. cpu or cuda (default: the backend's)")
        p.add_argument("--dtype", help="precision, e.g. fp32 or int4 (default: the backend's)")
        p.add_argument(
            "-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="backend load option (JSON value)"
        )

    p = sub.add_parser("run", help="generate text, streamed to the terminal")
    model_args(p)
    p.add_argument("prompt", nargs="?", help="prompt text ('-' or omitted: read stdin)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--system", help="system message (chat mode)")
    p.add_argument("--max-tokens", type=_positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, help="seconds before the request is abandoned")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    p.add_argument(
        "--speculative", choices=("auto", "ngram", "off"), default="auto", help="n-gram speculative decoding"
    )
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="constrain the output to this JSON schema")
    shape.add_argument("--json-mode", action="store_true", help="constrain the output to a JSON object")
    shape.add_argument("--regex", metavar="PATTERN", help="constrain the output to match this regular expression")
    shape.add_argument("--grammar", metavar="FILE", help="constrain the output to this Lark or GBNF grammar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="measure prompt and decode throughput, TTFT and peak RSS")
    model_args(p)
    p.add_argument("--new-tokens", type=_positive_int, default=128)
    p.add_argument("--prefill-tokens", type=_positive_int, default=512)
    p.add_argument("--runs", type=_positive_int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("eval", help="perplexity on a fixed text, and greedy agreement with a reference precision")
    model_args(p)
    p.add_argument("--reference-dtype", default="fp32", help="precision to compare with (default fp32; 'none': skip)")
    p.add_argument("--chunks", type=_positive_int, default=8, help="chunks of text to score (default 8)")
    p.add_argument(
        "--chunk-tokens", type=_positive_int, default=512, help="tokens a chunk (default 512; less for short contexts)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)

    from infer.cli_chat import add_chat_command
    from infer.cli_models import add_model_commands
    from infer.serve.cli import add_serve_command

    add_model_commands(sub)  # type: ignore[arg-type]
    add_serve_command(sub, model_args)
    add_chat_command(sub, model_args)
    return parser


def _options(pairs: Sequence[str]) -> dict[str, Any]:
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


def _load(args: argparse.Namespace, **engine: Any) -> Any:
    """Load the model the shared model arguments name; ``engine`` adds core load options (``prefix_cache``...)."""
    import infer

    options = _options(args.option)
    return infer.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype, **engine, **options)


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


def _cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    model = _load(args, speculative=args.speculative)
    try:
        sampling = {
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty,
            "seed": args.seed,
            "stop": tuple(args.stop),
            "response_format": _response_format(args),
        }
        if args.raw or model.chat_template is None:
            stream = model.stream(prompt, timeout=args.timeout, **sampling)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt}
            ]
            stream = model.stream(messages=messages, timeout=args.timeout, **sampling)
        with stream:
            for event in stream:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        if args.stats and stream.completion is not None:
            c = stream.completion
            print(
                f"[{c.usage.prompt_tokens} prompt + {c.usage.completion_tokens} generated tokens, "
                f"TTFT {c.timings.time_to_first_token * 1e3:.1f} ms, {c.timings.decode_tokens_per_s:.1f} tok/s, "
                f"finish: {c.finish_reason}]",
                file=sys.stderr,
            )
    finally:
        model.close()
    return 0


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``response_format`` that ``--json-schema``, ``--json-mode``, ``--regex`` or ``--grammar`` ask for."""
    from infer.errors import GrammarError

    if args.regex is not None:
        return {"type": "regex", "pattern": args.regex}
    if args.json_mode:
        return {"type": "json_object"}
    flag, path = ("--json-schema", args.json_schema) if args.json_schema is not None else ("--grammar", args.grammar)
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GrammarError(f"{flag} {path}: cannot read the file: {exc}") from exc
    if flag == "--grammar":
        return {"type": "grammar", "grammar": text}
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"{flag} {path}: not JSON: {exc}") from exc
    return {"type": "json_schema", "json_schema": {"name": Path(path).stem, "schema": schema, "strict": True}}


def _cmd_bench(args: argparse.Namespace) -> int:
    from infer.bench import run_bench

    model = _load(args)
    try:
        report = run_bench(model, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens, runs=args.runs)
    finally:
        model.close()
    report["model"] = args.model
    _print_report(report, as_json=args.json)
    return 0


def _print_report(report: dict[str, Any], *, as_json: bool) -> None:
    """One JSON object, or one aligned ``key  value`` line per entry."""
    if as_json:
        print(json.dumps(report))
        return
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


def _cmd_eval(args: argparse.Namespace) -> int:
    import infer
    from infer.evaluate import evaluate

    model = _load(args)
    reference = None
    try:
        if args.reference_dtype not in ("none", model.dtype):
            reference = infer.load(
                args.model,
                backend=model.backend,
                device=args.device,
                dtype=args.reference_dtype,
                **_options(args.option),
            )
        report = evaluate(model, reference=reference, chunks=args.chunks, chunk_tokens=args.chunk_tokens).as_dict()
    finally:
        model.close()
        if reference is not None:
            reference.close()
    report["model"] = args.model
    _print_report(report, as_json=args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infer`` command; returns the exit status."""
    parser = _build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
