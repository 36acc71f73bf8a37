"""What both benchmark children share: the protocol (prompt ids in, timings out) and the statistics.

This file imports only the standard library so that the anchor environment, which does not
have infer installed, can use it too.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Timed repetitions after one warm-up; the median is reported (``BENCH_REPEATS`` overrides it:
#: long-context runs take minutes per repetition on a small machine).
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def read_job(path: str) -> dict[str, Any]:
    """The job the driver wrote: prompt ids, long-prompt ids, tokens to generate, model path."""
    return json.loads(Path(path).read_text())


def measure(
    generate: Callable[[list[int], int], tuple[float, float, list[int]]],
    prefill: Callable[[list[int]], float],
    job: dict[str, Any],
) -> dict[str, Any]:
    """Run ``generate`` (returns ttft seconds, decode seconds, tokens) and ``prefill`` (seconds).

    One warm-up of each, then :data:`REPEATS` timed runs; medians, tokens of the last run.
    """
    prompt, long_prompt, new = job["prompt"], job["long_prompt"], job["new_tokens"]
    generate(prompt, new)
    runs = [generate(prompt, new) for _ in range(REPEATS)]
    prefill(long_prompt)
    long_runs = [prefill(long_prompt) for _ in range(REPEATS)]
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    tokens = runs[-1][2]
    long_s = statistics.median(long_runs)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": len(tokens),
        "ttft_ms": ttft * 1000,
        "prefill_tok_s": len(prompt) / ttft,
        "decode_tok_s": (len(tokens) - 1) / decode,
        "long_prompt_tokens": len(long_prompt),
        "long_prefill_tok_s": len(long_prompt) / long_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens": tokens,
    }


def emit(result: dict[str, Any]) -> None:
    """Hand the result to the driver on the last line of stdout."""
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


def clock() -> float:
    """The timer every measurement uses: wall time, or this process's CPU time when the driver
    sets ``BENCH_CLOCK=cpu`` (with one thread, CPU time ignores the time other processes on a
    shared machine take from us, which wall time cannot)."""
    return time.process_time() if os.environ.get("BENCH_CLOCK") == "cpu" else time.perf_counter()
