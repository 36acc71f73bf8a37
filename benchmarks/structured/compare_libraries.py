"""Compare grammar engines for constrained decoding on SmolLM2's vocabulary, in one run.

    /work/venv-ref/bin/python benchmarks/structured/compare_libraries.py TOKENIZER_JSON

Runs in an anchor environment (xgrammar fills torch tensors, so it needs torch) holding
``llguidance``, ``xgrammar`` and ``outlines-core``; the project itself depends only on the one
chosen (llguidance). For each schema it reports, per library:

* ``compile_ms``: from a JSON schema (and a tokenizer already wrapped) to a matcher ready for
  its first mask;
* ``mask_us``: median time to compute the next-token mask along the tokens of a valid instance
  (the same token walk for every library), and the slowest step;
* ``tokenizer_ms``: wrapping the 49,152-token vocabulary once.

Feature coverage is recorded in the README next to the figures: the schemas here are the
subset all three accept.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                        "gift": {"type": "boolean"},
                    },
                    "required": ["sku", "qty", "gift"],
                    "additionalProperties": False,
                },
            },
            "status": {"enum": ["new", "paid", "shipped"]},
        },
        "required": ["id", "items", "status"],
        "additionalProperties": False,
    },
}
INSTANCES = {
    "person": {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"]},
    "order": {
        "id": "ABC-1234",
        "items": [{"sku": "paint-red", "qty": 2, "gift": False}, {"sku": "brush", "qty": 1, "gift": True}],
        "status": "paid",
    },
}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_llguidance(tok_json: str, vocab: int, eos: int, walks: dict[str, list[int]]) -> dict[str, Any]:
    """llguidance: LLMatcher over an LLTokenizer, masks into a numpy bitmask."""
    import llguidance
    import numpy as np

    tokenizer, t_tok = timed(lambda: llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos))
    out: dict[str, Any] = {"tokenizer_ms": t_tok * 1e3}
    opts = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    for name, schema in SCHEMAS.items():

        def build(schema: dict[str, Any] = schema) -> Any:
            return llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=opts))

        matcher, t_compile = timed(build)
        bits = np.empty((vocab + 31) // 32, dtype=np.int32)
        mask = functools.partial(matcher.unsafe_compute_mask_ptr, bits.ctypes.data, bits.nbytes)
        out[name] = summary(t_compile, walk(mask, matcher.consume_token, walks[name]))
    return out


def bench_xgrammar(tok_json: str, vocab: int, eos: int, walks: dict[str, list[int]], hf: Any) -> dict[str, Any]:
    """xgrammar: GrammarCompiler + GrammarMatcher, masks into a torch bitmask."""
    import xgrammar

    info, t_tok = timed(lambda: xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos]))
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    out: dict[str, Any] = {"tokenizer_ms": t_tok * 1e3}
    for name, schema in SCHEMAS.items():

        def build(schema: dict[str, Any] = schema) -> Any:
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            return xgrammar.GrammarMatcher(compiled)

        matcher, t_compile = timed(build)
        mask = functools.partial(matcher.fill_next_token_bitmask, xgrammar.allocate_token_bitmask(1, vocab))
        out[name] = summary(t_compile, walk(mask, matcher.accept_token, walks[name]))
    return out


def bench_outlines(tok_json: str, vocab: int, eos: int, walks: dict[str, list[int]], hf: Any) -> dict[str, Any]:
    """outlines-core: a regex from the schema, an Index over the vocabulary, a Guide per request."""
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    vocabulary, t_tok = timed(lambda: outlines_vocabulary(outlines_core, hf, eos))
    out: dict[str, Any] = {"tokenizer_ms": t_tok * 1e3}
    for name, schema in SCHEMAS.items():

        def build(schema: dict[str, Any] = schema) -> Any:
            regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
            return outlines_core.Guide(outlines_core.Index(regex, vocabulary))

        try:
            guide, t_compile = timed(build)
        except Exception as exc:  # noqa: BLE001 - a library's refusal is a figure here
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        out[name] = summary(t_compile, walk(guide.get_tokens, guide.advance, walks[name]))
    return out


def outlines_vocabulary(outlines_core: Any, hf: Any, eos: int) -> Any:
    """outlines-core's Vocabulary built from the Hugging Face tokenizer's token strings."""
    return (
        outlines_core.Vocabulary.from_pretrained_tokenizer(hf)
        if hasattr(outlines_core.Vocabulary, "from_pretrained_tokenizer")
        else _vocab_from_hf(outlines_core, hf, eos)
    )


def _vocab_from_hf(outlines_core: Any, hf: Any, eos: int) -> Any:
    mapping: dict[str, list[int]] = {}
    for token_id in range(len(hf)):
        if token_id == eos:
            continue
        text = hf.convert_tokens_to_string([hf.convert_ids_to_tokens(token_id)])
        if text:
            mapping.setdefault(text, []).append(token_id)
    return outlines_core.Vocabulary(eos, mapping)


def walk(mask: Callable[[], object], advance: Callable[[int], object], tokens: list[int]) -> list[float]:
    """Seconds each next-token mask took along ``tokens`` (each token is fed after its mask)."""
    times = []
    for token in tokens:
        start = time.perf_counter()
        mask()
        times.append(time.perf_counter() - start)
        if advance(token) is False:
            raise AssertionError(f"the matcher refused token {token} of a valid instance")
    return times


def summary(t_compile: float, times: list[float]) -> dict[str, float]:
    """Compile time and mask-time statistics in ms / us."""
    return {
        "compile_ms": round(t_compile * 1e3, 2),
        "mask_us_median": round(statistics.median(times) * 1e6, 1),
        "mask_us_max": round(max(times) * 1e6, 1),
        "steps": len(times),
    }


def main() -> None:
    """Command-line entry."""
    from transformers import PreTrainedTokenizerFast

    path = sys.argv[1]
    tok_json = open(path, encoding="utf-8").read()  # noqa: SIM115
    hf = PreTrainedTokenizerFast(tokenizer_file=path)
    vocab, eos = 49152, 2
    walks = {name: hf.encode(json.dumps(INSTANCES[name]), add_special_tokens=False) for name in SCHEMAS}
    report = {
        "llguidance": bench_llguidance(tok_json, vocab, eos, walks),
        "xgrammar": bench_xgrammar(tok_json, vocab, eos, walks, hf),
        "outlines-core": bench_outlines(tok_json, vocab, eos, walks, hf),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
