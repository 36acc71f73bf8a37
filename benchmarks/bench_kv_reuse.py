"""KV reuse on a real model, in one process run: prefix caching and n-gram speculative decoding.

    python benchmarks/bench_kv_reuse.py [MODEL] [--backend onnx] [--dtype fp32 int4] [--threads 2]

MODEL defaults to $INFER_SMOLLM2_GGUF. For each precision it reports, as ratios to an anchor
measured in the same run:

- multi-turn chat: 4 turns over a ~1,000-token history, TTFT of each later turn with the prefix
  cache over the TTFT of the same prompt cold (target <= 0.2);
- input-grounded tasks (rewrite, summarise, extract from a ~500-token passage; edit a code file):
  greedy decode tok/s with speculation over without (target >= 1.8), and whether the tokens are
  identical;
- open-ended prompts: decode tok/s with speculation "auto" over "off" (target >= 0.97).

Figures depend on the machine's load: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import infer

PASSAGE = (
    "The city library opened its new reading room on Monday. The room has forty desks, each with a lamp "
    "and a power socket, and large windows that face the river. Opening hours are from nine in the morning "
    "to eight in the evening on weekdays, and from ten to four on Saturdays; the room is closed on Sundays. "
    "Visitors need a library card, which is free for residents and costs twelve euros a year for others. "
    "Food is not allowed, but covered drinks are. The room also holds the local history collection: maps "
    "of the river from 1820 onwards, photographs of the old harbour, and the minutes of the town council "
    "since 1901. Staff can help with research on weekday mornings. Groups of more than six people should "
    "book in advance by email. The library plans to add a small café next to the entrance next spring, and "
    "asks visitors for their opinion in a short survey at the front desk. "
)
CODE = '''def total_price(items, tax_rate):
    """Sum the prices of items and add tax."""
    subtotal = 0
    for item in items:
        subtotal = subtotal + item["price"] * item["quantity"]
    tax = subtotal * tax_rate
    total = subtotal + tax
    return total


def average_price(items):
    """The mean price of the items."""
    if len(items) == 0:
        return 0
    prices = [item["price"] for item in items]
    return sum(prices) / len(prices)
'''
GROUNDED = {
    "rewrite": f"Rewrite the following text, keeping every fact and changing nothing else:\n\n{PASSAGE}",
    "summarize": f"Summarize the following text in a few sentences:\n\n{PASSAGE}",
    "extract": f"List every opening hour, price and date mentioned in this text, quoting it:\n\n{PASSAGE}",
    "code_edit": f"Rename the variable `subtotal` to `net` in this code and output the whole file:\n\n{CODE}",
}
OPEN_ENDED = {
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "ideas": "Give me ten ideas for a birthday party for a seven-year-old.",
    "explain": "Explain why the sky is blue to a curious teenager.",
}
CHAT_TURNS = [
    "Here are my notes from this week; keep them in mind. " + PASSAGE * 2,
    "What are the opening hours on Saturday?",
    "And how much does a card cost for someone who is not a resident?",
    "Which old documents does the room keep?",
]


def _messages(history: list[dict[str, str]], question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a helpful assistant. " + PASSAGE},
        *history,
        {"role": "user", "content": question},
    ]


def chat(model: Any, cold: Any) -> dict[str, Any]:
    """Later turns' TTFT with the prefix cache over the cold TTFT of the same prompt."""
    history: list[dict[str, str]] = []
    turns = []
    for i, question in enumerate(CHAT_TURNS):
        messages = _messages(history, question)
        warm = model.generate(messages=messages, max_tokens=48, temperature=0)
        if i:
            base = cold.generate(messages=messages, max_tokens=1, temperature=0)  # no prefix cache
            turns.append(
                {
                    "turn": i + 1,
                    "prompt_tokens": warm.usage.prompt_tokens,
                    "cached_tokens": warm.usage.cached_tokens,
                    "ttft_ratio": warm.timings.time_to_first_token / base.timings.time_to_first_token,
                }
            )
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": warm.text}]
    return {"turns": turns, "worst_ttft_ratio": max(t["ttft_ratio"] for t in turns)}


def decode_speed(model: Any, prompts: dict[str, str], spec: str, repeats: int) -> dict[str, Any]:
    """Median decode tok/s per prompt with ``speculative=spec`` against "off", and token identity."""
    rows = {}
    for name, text in prompts.items():
        messages = [{"role": "user", "content": text}]
        runs: dict[str, list[float]] = {"off": [], spec: []}
        tokens: dict[str, tuple[int, ...]] = {}
        for _ in range(repeats):
            for mode in ("off", spec):  # interleaved: machine load drifts hit both sides alike
                out = model.generate(messages=messages, max_tokens=128, temperature=0, speculative=mode)
                runs[mode].append(
                    out.usage.completion_tokens / max(out.timings.total - out.timings.time_to_first_token, 1e-9)
                )
                tokens[mode] = out.token_ids
        rows[name] = {
            "speedup": statistics.median(runs[spec]) / statistics.median(runs["off"]),
            "identical": tokens[spec] == tokens["off"],
            "tokens": len(tokens["off"]),
        }
    return {"prompts": rows, "geomean_speedup": statistics.geometric_mean(r["speedup"] for r in rows.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=os.environ.get("INFER_SMOLLM2_GGUF"))
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.model:
        parser.error("give MODEL or set INFER_SMOLLM2_GGUF")
    report: dict[str, Any] = {"model": args.model, "backend": args.backend, "threads": args.threads}
    for dtype in args.dtype:
        common = {"backend": args.backend, "dtype": dtype}
        if args.backend == "onnx":
            common["threads"] = args.threads
        t0 = time.perf_counter()
        model = infer.load(args.model, prefix_cache=True, **common)
        cold = infer.load(args.model, **common)
        try:
            report[dtype] = {
                "load_s": time.perf_counter() - t0,
                "chat": chat(model, cold),
                "grounded": decode_speed(cold, GROUNDED, "ngram", args.repeats),
                "open_ended": decode_speed(cold, OPEN_ENDED, "auto", args.repeats),
            }
        finally:
            model.close()
            cold.close()
        print(json.dumps({dtype: report[dtype]}, indent=1), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
