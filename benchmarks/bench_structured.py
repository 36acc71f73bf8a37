"""Decode speed under a JSON schema against unconstrained decode, on SmolLM2, in one run.

    python benchmarks/bench_structured.py [--dtypes int4 fp32] [--rounds 5] [--new-tokens 128]

For each precision the two cases alternate round by round (constrained, then free), so both
see the same machine; the report gives medians and the ratio constrained / free. The
constrained request asks for a JSON object with a free-text story (so it runs long, like a
real structured answer); the free one generates the same number of tokens with ``ignore_eos``.
Also reported: the schema's compile time (tokenizer already wrapped) and the one-off cost of
wrapping the tokenizer. Goal (issue: structured output): constrained decode no more than 10%
slower than free at int4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import infer

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint, as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 60}, "story": {"type": "string"}},
    "required": ["title", "story"],
}


def run(dtype: str, rounds: int, new_tokens: int) -> dict[str, object]:
    """Median decode tok/s of both cases at ``dtype`` and their ratio."""
    model = infer.load("smollm2-135m-instruct", dtype=dtype)
    try:
        t0 = time.perf_counter()
        model.compile_response_format({"type": "json_object"})  # wraps the tokenizer once
        wrap_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        constraint = model.compile_response_format(SCHEMA)
        compile_s = time.perf_counter() - t0
        free: list[float] = []
        constrained: list[float] = []
        produced: list[int] = []
        for _ in range(rounds + 1):  # the first round warms up
            c = model.generate(messages=PROMPT, temperature=0, max_tokens=new_tokens, constraint=constraint)
            if c.finish_reason == "stop":
                json.loads(c.text)  # a finished constrained answer is JSON, or this run is void
            n = c.usage.completion_tokens
            f = model.generate(messages=PROMPT, temperature=0, max_tokens=n, ignore_eos=True)
            constrained.append(c.timings.decode_tokens_per_s)
            free.append(f.timings.decode_tokens_per_s)
            produced.append(n)
        c_med, f_med = statistics.median(constrained[1:]), statistics.median(free[1:])
        return {
            "dtype": dtype,
            "constrained_tok_s": round(c_med, 1),
            "free_tok_s": round(f_med, 1),
            "ratio": round(c_med / f_med, 3),
            "tokens": produced[1:],
            "schema_compile_ms": round(compile_s * 1e3, 2),
            "tokenizer_wrap_ms": round(wrap_s * 1e3, 1),
        }
    finally:
        model.close()


def main() -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["int4", "fp32"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    for dtype in args.dtypes:
        print(json.dumps(run(dtype, args.rounds, args.new_tokens)))


if __name__ == "__main__":
    main()
