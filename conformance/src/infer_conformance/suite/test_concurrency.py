"""Many streams on one model at once, from threads and from asyncio."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import infer

pytestmark = [pytest.mark.conformance, pytest.mark.stress]

PROMPTS = [[5 + i, 17, 42 + i, 8, 99 - i, 3] for i in range(32)]


def _request(i: int) -> dict[str, Any]:
    if i % 2:
        return dict(max_tokens=12, temperature=0, ignore_eos=True)
    return dict(max_tokens=12, temperature=0.9, top_k=40, seed=i, ignore_eos=True)


def test_32_threads_get_the_same_results_as_sequential_runs_without_deadlock(model: infer.Model) -> None:
    sequential = [model.generate(p, **_request(i)).token_ids for i, p in enumerate(PROMPTS)]
    barrier = threading.Barrier(32)

    def run(i: int) -> tuple[int, ...]:
        barrier.wait(timeout=30)
        return model.generate(PROMPTS[i], **_request(i)).token_ids

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(run, i) for i in range(32)]
        concurrent = [f.result(timeout=120) for f in futures]
    assert concurrent == sequential


def test_asyncio_streams_interleave_and_match_sequential_runs(model: infer.Model) -> None:
    sequential = [model.generate(p, **_request(i)).token_ids for i, p in enumerate(PROMPTS[:16])]

    async def one(i: int) -> tuple[int, ...]:
        return tuple([event.token_id async for event in model.astream(PROMPTS[i], **_request(i))])

    async def main() -> list[tuple[int, ...]]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), 120)

    assert asyncio.run(main()) == sequential


def test_a_slow_consumer_does_not_make_the_engine_buffer_without_bound(model: infer.Model) -> None:
    import time

    stream = model.stream(PROMPTS[0], max_tokens=2000, temperature=0, ignore_eos=True)
    next(stream)
    time.sleep(0.3)  # the engine runs ahead only until the stream's buffer is full
    buffered = stream._request.channel._items
    assert len(buffered) <= 65
    assert len(stream._request.generated) < 2000
    stream.close()
