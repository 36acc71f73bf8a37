"""KV reuse on a real model, in one process run: prefix caching and n-gram speculative decoding.

    python benchmarks/bench_kv_reuse.py [MODEL] [--backend onnx] [--dtype fp32 int4] [--threads 2]

MODEL defaults to $INFER_SMOLLM2_GGUF. For each precision it reports, as ratios to an anchor
measured in the same run:

- multi-turn chat: 4 turns over a ~1,000-token history, TTFT of each later turn with the prefix
  cache over the TTFT of the same prompt cold (target <= 0.2);
- input-grounded tasks (rewrite, summarise, extract from a ~500-token passage; edit a code file):
  greedy decode tok/s with speculation over without (target >= 1.8), and whether the tokens are
  identical;
- open-ended prompts: decode tok/s with speculation "auto" over "off" (target >= 0.97);
- the limit of speculation: the share of drafted tokens accepted per task, what verifying k
  drafted tokens costs in decode steps, and how far verification logits stray from decode logits
  (exact greedy output needs them equal up to near-ties);
- with ``--draft native`` (ONNX, float precisions): the same, the model drafting through its
  GGUF's own blocks as well as by prompt lookup (contract 1.3 draft steps);
- the same tasks on the anchors, as child processes in the anchor environment
  (benchmarks/onnx/child_lookup.py): llama.cpp on the GGUF, plain and with its prompt-lookup
  drafter (``LlamaPromptLookupDecoding``), and onnxruntime-genai plain (it has no lookup decoding
  on CPU) on an int4 export given with ``--genai-int4``.

Figures depend on the machine's load: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import infer
from infer.plugins import get_registry

HERE = Path(__file__).resolve().parent

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


class StepCounter:
    """Counts decode, draft and verification steps and drafted tokens (a wrapper on the hooks)."""

    def __init__(self) -> None:
        self.decode = self.verify = self.drafted = self.draft_steps = 0

    @infer.hookimpl(wrapper=True)
    def infer_decode(self, model: Any, batch: Any) -> Any:
        self.decode += 1
        return (yield)

    @infer.hookimpl(wrapper=True)
    def infer_draft(self, model: Any, batch: Any) -> Any:
        self.draft_steps += 1
        return (yield)

    @infer.hookimpl(wrapper=True)
    def infer_prefill_all(self, model: Any, batch: Any) -> Any:
        self.verify += 1
        self.drafted += sum(len(t) - 1 for t in batch.tokens)  # each row: the pending token + its draft
        return (yield)


def counted(model: Any, **kwargs: Any) -> tuple[Any, StepCounter]:
    """``model.generate(**kwargs)`` and the steps it took."""
    counter = StepCounter()
    pm = get_registry().pm
    pm.register(counter)
    try:
        return model.generate(**kwargs), counter
    finally:
        pm.unregister(counter)


def decode_speed(model: Any, prompts: dict[str, str], spec: str, repeats: int) -> dict[str, Any]:
    """Median decode tok/s per prompt with ``speculative=spec`` against "off", token identity, and
    the share of drafted tokens accepted (every emitted token after the first comes from a decode
    step, a verification step's sampled token, or an accepted draft token)."""
    rows = {}
    for name, text in prompts.items():
        messages = [{"role": "user", "content": text}]
        runs: dict[str, list[float]] = {"off": [], spec: []}
        tokens: dict[str, tuple[int, ...]] = {}
        steps = StepCounter()
        for _ in range(repeats):
            for mode in ("off", spec):  # interleaved: machine load drifts hit both sides alike
                out, counter = counted(model, messages=messages, max_tokens=128, temperature=0, speculative=mode)
                runs[mode].append(out.timings.decode_tokens_per_s)
                tokens[mode] = out.token_ids
                if mode == spec:
                    steps = counter
        n = len(tokens[spec])
        accepted = n - 1 - steps.decode - steps.verify
        rows[name] = {
            "off_tok_s": statistics.median(runs["off"]),
            "spec_tok_s": statistics.median(runs[spec]),
            "speedup": statistics.median(runs[spec]) / statistics.median(runs["off"]),
            "identical": tokens[spec] == tokens["off"],
            "tokens": len(tokens["off"]),
            "verify_steps": steps.verify,
            "draft_steps": steps.draft_steps,
            "drafted": steps.drafted,
            "acceptance": accepted / steps.drafted if steps.drafted else None,
            "tokens_per_step": (n - 1) / max(steps.decode + steps.verify, 1),
        }
    return {"prompts": rows, "geomean_speedup": statistics.geometric_mean(r["speedup"] for r in rows.values())}


def verify_cost(model: Any, ks: tuple[int, ...] = (1, 2, 4, 8), repeats: int = 15) -> dict[str, float]:
    """What verifying k drafted tokens (an all-position step of k + 1) costs, in decode steps,
    500 tokens into a context (the grounded tasks' length)."""
    seq = model.new_sequence(700)
    model.run_prefill([seq], [list(range(1000, 1500))])
    base = seq.length

    def timed(step: Any) -> float:
        t0 = time.perf_counter()
        step()
        spent = time.perf_counter() - t0
        model.truncate(seq, base)
        return spent

    for _ in range(3):
        timed(lambda: model.run_decode([seq], [5]))
    decode = statistics.median(timed(lambda: model.run_decode([seq], [5])) for _ in range(repeats * 2))
    out = {"decode_ms": decode * 1e3}
    for k in ks:
        fed = [[5] * (k + 1)]
        spent = statistics.median(timed(lambda fed=fed: model.run_prefill_all([seq], fed)) for _ in range(repeats))
        out[f"k{k}"] = spent / decode
    seq.release()
    return out


def verify_agreement(model: Any, ks: tuple[int, ...] = (1, 3, 7)) -> dict[str, Any]:
    """Largest difference between verification logits and the decode logits of the same tokens,
    and how many greedy choices differ: where this is not ~0, speculation's greedy output may
    differ from plain decoding's at a near-tie."""
    prompt = list(range(1000, 1300))
    worst, flips, positions = 0.0, 0, 0
    for k in ks:
        seq = model.new_sequence(400)
        model.run_prefill([seq], [prompt[:200]])
        draft = prompt[200 : 200 + k + 1]
        every = np.asarray(model.run_prefill_all([seq], [draft])[0])
        model.truncate(seq, 200)
        step = np.stack([model.run_decode([seq], [t])[0] for t in draft])
        seq.release()
        worst = max(worst, float(np.abs(every - step).max()))
        flips += int((every.argmax(-1) != step.argmax(-1)).sum())
        positions += len(draft)
    return {"max_abs_diff": worst, "argmax_flips": flips, "positions": positions}


def anchors(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The grounded tasks on llama.cpp (plain and lookup decoding) and GenAI int4 (plain), each a
    child process in the anchor environment; prompts are infer's own token ids."""
    tasks = {name: model.chat_ids([{"role": "user", "content": text}]) for name, text in GROUNDED.items()}
    job = {"tasks": tasks, "new_tokens": 128, "repeats": args.repeats}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        runs = {"llama.cpp": ["llamacpp", args.model, str(args.threads)]}
        if args.genai_int4:
            runs["genai int4"] = ["genai", args.genai_int4]
        for name, tail in runs.items():
            cmd = [args.anchor_python, "child_lookup.py", str(job_path), *tail]
            try:
                done = subprocess.run(
                    cmd, cwd=HERE / "onnx", capture_output=True, text=True, check=False, timeout=args.anchor_timeout
                )
            except subprocess.TimeoutExpired:
                out[name] = {"error": f"did not finish within {args.anchor_timeout:g} s"}
                continue
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                out[name] = {"error": (done.stderr or done.stdout)[-1500:]}
                continue
            out[name] = json.loads(line[len("RESULT ") :])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=os.environ.get("INFER_SMOLLM2_GGUF"))
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--anchor-python", default="/work/.venv-anchors/bin/python", help="'' skips the anchors")
    parser.add_argument("--genai-int4", help="an onnxruntime-genai int4 export of the same model (see ANCHORS.md)")
    parser.add_argument("--anchor-timeout", type=float, default=1800, help="seconds each anchor child may take")
    parser.add_argument(
        "--draft",
        default="none",
        help="ONNX backend draft graph for float precisions (native, int4): speculation drafts through it too",
    )
    args = parser.parse_args()
    if not args.model:
        parser.error("give MODEL or set INFER_SMOLLM2_GGUF")
    report: dict[str, Any] = {"model": args.model, "backend": args.backend, "threads": args.threads}
    for dtype in args.dtype:
        common = {"backend": args.backend, "dtype": dtype}
        if args.backend == "onnx":
            common["threads"] = args.threads
            if args.draft != "none" and dtype in ("fp32", "fp16"):
                common["draft"] = args.draft
        t0 = time.perf_counter()
        model = infer.load(args.model, prefix_cache=True, **common)
        cold = infer.load(args.model, **common)
        try:
            report[dtype] = {
                "load_s": time.perf_counter() - t0,
                "chat": chat(model, cold),
                "grounded": decode_speed(cold, GROUNDED, "ngram", args.repeats),
                "open_ended": decode_speed(cold, OPEN_ENDED, "auto", args.repeats),
                "auto_speculates": cold._speculation("auto"),
                "verify_cost_in_decode_steps": verify_cost(cold),
                "verify_agreement": verify_agreement(cold),
            }
            print(json.dumps({dtype: report[dtype]}, indent=1), flush=True)  # before the anchors: they are slow
            if args.anchor_python and "anchors" not in report:
                report["anchors"] = anchors(cold, args)  # the same prompt ids whatever infer's dtype
                print(json.dumps({"anchors": report["anchors"]}, indent=1), flush=True)
        finally:
            model.close()
            cold.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
