"""The commands that work a loaded model: ``run`` (generate, streamed), ``bench`` (throughput)
and ``eval`` (perplexity and agreement with a reference precision).

:func:`add_run_commands` registers them on the main parser's subcommands; each handler takes the
parsed arguments and returns the exit status. Heavy modules are imported inside the handlers so
that ``infer --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from infer.cli.common import Subcommands, add_model_arguments, load_model, load_options, positive_int

__all__ = ["add_run_commands"]


def add_run_commands(subparsers: Subcommands) -> None:
    """Register ``run``, ``bench`` and ``eval`` with handlers in ``func``."""
    p = subparsers.add_parser("run", help="generate text, streamed to the terminal")
    add_model_arguments(p)
    p.add_argument("prompt", nargs="?", help="prompt text ('-' or omitted: read stdin)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--system", help="system message (chat mode)")
    p.add_argument("--max-tokens", type=positive_int, default=256)
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

    p = subparsers.add_parser("bench", help="measure prompt and decode throughput, TTFT and peak RSS")
    add_model_arguments(p)
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--prefill-tokens", type=positive_int, default=512)
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_bench)

    p = subparsers.add_parser(
        "eval", help="perplexity on a fixed text, and greedy agreement with a reference precision"
    )
    add_model_arguments(p)
    p.add_argument("--reference-dtype", default="fp32", help="precision to compare with (default fp32; 'none': skip)")
    p.add_argument("--chunks", type=positive_int, default=8, help="chunks of text to score (default 8)")
    p.add_argument(
        "--chunk-tokens", type=positive_int, default=512, help="tokens a chunk (default 512; less for short contexts)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)


def _cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    model = load_model(args, speculative=args.speculative)
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

    model = load_model(args)
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

    model = load_model(args)
    reference = None
    try:
        if args.reference_dtype not in ("none", model.dtype):
            reference = infer.load(
                args.model,
                backend=model.backend,
                device=args.device,
                dtype=args.reference_dtype,
                **load_options(args.option),
            )
        report = evaluate(model, reference=reference, chunks=args.chunks, chunk_tokens=args.chunk_tokens).as_dict()
    finally:
        model.close()
        if reference is not None:
            reference.close()
    report["model"] = args.model
    _print_report(report, as_json=args.json)
    return 0
