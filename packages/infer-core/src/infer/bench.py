"""``infer bench``: prompt and decode throughput, time to first token, peak memory, KV bytes per token.

Figures are medians over ``runs`` after ``warmup`` runs. Backend time is measured by a
``wrapper=True`` hookimpl around prefill/decode, so the report also shows the engine's own
overhead per generated token (everything that is not the backend: scheduling, sampling,
detokenization, stop checks, the hand-off to the consumer).
"""

from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from infer.hookspecs import hookimpl

if TYPE_CHECKING:
    from infer.contract import Batch, ModelHandle
    from infer.model import Model

__all__ = ["BENCH_PROMPT", "StepTimer", "run_bench"]

#: The chat prompt of the published anchor figures.
BENCH_PROMPT = "Write a short story about a robot who learns to paint."


class StepTimer:
    """A wrapper plugin that adds up the time spent inside the backend's prefill and decode."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0

    def _timed(self) -> Generator[None, Any, Any]:
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            self.seconds += time.perf_counter() - start
            self.steps += 1

    @hookimpl(wrapper=True)
    def infer_prefill(self, model: ModelHandle, batch: Batch) -> Generator[None, Any, Any]:
        return (yield from self._timed())

    @hookimpl(wrapper=True)
    def infer_decode(self, model: ModelHandle, batch: Batch) -> Generator[None, Any, Any]:
        return (yield from self._timed())


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_bench(
    model: Model,
    *,
    new_tokens: int = 128,
    prefill_tokens: int = 512,
    runs: int = 3,
    warmup: int = 1,
    prompt: str = BENCH_PROMPT,
) -> dict[str, Any]:
    """Measure ``model`` and return the figures as a JSON-ready dict."""
    from infer.plugins import get_registry

    if model.chat_template is not None:
        ids = model.encode(model.apply_chat_template([{"role": "user", "content": prompt}]), add_special_tokens=False)
    else:
        ids = model.encode(prompt)
    long_ids = (ids * (prefill_tokens // max(len(ids), 1) + 1))[:prefill_tokens]
    registry = get_registry()
    timer = StepTimer()
    registry.pm.register(timer, name=f"infer.bench.timer.{id(timer)}")
    try:
        decode, ttft, overhead, prefill = [], [], [], []
        for i in range(warmup + runs):
            timer.seconds, timer.steps = 0.0, 0
            start = time.perf_counter()
            completion = model.generate(ids, max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            wall = time.perf_counter() - start
            backend_s = timer.seconds
            long = model.generate(long_ids, max_tokens=1, temperature=0.0, ignore_eos=True)
            if i < warmup:
                continue
            n = completion.usage.completion_tokens
            decode.append(completion.timings.decode_tokens_per_s)
            ttft.append(completion.timings.time_to_first_token)
            overhead.append(max(wall - backend_s, 0.0) / max(n, 1))
            prefill.append(len(long_ids) / long.timings.time_to_first_token)
    finally:
        registry.pm.unregister(timer)
    return {
        "backend": model.backend,
        "device": model.device,
        "dtype": model.dtype,
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "runs": runs,
        "decode_tok_s": round(statistics.median(decode), 2),
        "ttft_ms": round(statistics.median(ttft) * 1e3, 3),
        "prefill_tokens": len(long_ids),
        "prefill_tok_s": round(statistics.median(prefill), 1),
        "engine_overhead_us_per_token": round(statistics.median(overhead) * 1e6, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        # What each token of context costs in cache: a long context's memory is this times its length.
        "kv_bytes_per_token": round(model.kv_bytes_per_token, 1),
        "kv_dtype": model.handle.details.get("kv_dtype"),
        "python": platform.python_version(),
    }
