"""Cancellation and deadlines: no backend work after a stream ends, typed timeouts, no hang."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

import infer
from infer_conformance.plugin import SuiteConfig
from infer_conformance.probes import Gate, StepDelay, StepRecorder, StepStall, installed, track_caches, wait_idle

pytestmark = pytest.mark.conformance

PROMPT = [5, 17, 42, 8, 99, 3, 61]


def _assert_stopped(model: infer.Model, recorder: StepRecorder, made: list[infer.KVCache]) -> None:
    wait_idle(model)
    settled = recorder.count()
    time.sleep(0.05)
    assert recorder.count() == settled, "the backend kept stepping after the stream was cancelled"
    assert made and all(seq.released for seq in made), "a cancelled request's cache was not released"


@pytest.mark.parametrize("how", ["close", "break", "drop", "context-exit"])
def test_ending_a_stream_stops_backend_work_within_one_step(fresh_model: infer.Model, how: str) -> None:
    made = track_caches(fresh_model)
    with installed(StepRecorder(fresh_model.handle)) as recorder:
        stream = fresh_model.stream(PROMPT, max_tokens=10_000, temperature=0, ignore_eos=True)
        if how == "close":
            next(stream)
            stream.close()
        elif how == "break":
            for _ in stream:
                break
        elif how == "drop":
            next(stream)
            del stream
            gc.collect()
        else:
            with stream:
                next(stream)
        _assert_stopped(fresh_model, recorder, made)
        assert recorder.count("decode") < 10_000 - 1


def test_cancelling_an_asyncio_task_stops_backend_work(fresh_model: infer.Model) -> None:
    made = track_caches(fresh_model)

    async def consume(started: asyncio.Event) -> None:
        async for _ in fresh_model.astream(PROMPT, max_tokens=10_000, temperature=0, ignore_eos=True):
            started.set()

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(consume(started))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with installed(StepRecorder(fresh_model.handle)) as recorder:
        asyncio.run(main())
        _assert_stopped(fresh_model, recorder, made)


def test_closing_a_stream_during_prefill_stops_before_the_next_chunk(suite: SuiteConfig) -> None:
    model = infer.load(
        suite.model,
        backend=suite.backend,
        device=suite.device,
        dtype=suite.dtype,
        prefill_chunk_size=4,
        **suite.options,
    )
    try:
        gate = Gate(model.handle)
        with installed(gate), installed(StepRecorder(model.handle)) as recorder:
            stream = model.stream(PROMPT * 4, max_tokens=5, temperature=0)
            assert gate.entered.wait(10)
            stream.close()
            gate.open()
            wait_idle(model)
            assert recorder.count("prefill") == 1
            assert recorder.count("decode") == 0
    finally:
        model.close()


def test_a_hanging_step_surfaces_as_a_typed_timeout_and_the_model_stays_usable(fresh_model: infer.Model) -> None:
    baseline = fresh_model.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True).token_ids
    stall = StepStall(fresh_model.handle, at=3, seconds=3.0)
    with installed(stall):
        started = time.monotonic()
        with pytest.raises(infer.DeadlineExceededError) as raised:
            fresh_model.generate(PROMPT, max_tokens=50, temperature=0, ignore_eos=True, timeout=0.3)
        waited = time.monotonic() - started
        stall.release.set()
    assert isinstance(raised.value, TimeoutError)
    assert waited < 1.5, f"the timeout fired {waited:.2f} s after the request started, not ~0.3 s"
    wait_idle(fresh_model)
    assert fresh_model.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True).token_ids == baseline


def test_a_deadline_ends_a_slow_stream_without_waiting_for_its_end(fresh_model: infer.Model) -> None:
    # 20 ms per step: the stream would need several seconds to reach its end, whatever the
    # backend's speed, so only the 0.2 s deadline can end it.
    longest = fresh_model.context_length - len(PROMPT)
    with installed(StepDelay(fresh_model.handle, 0.02)), installed(StepRecorder(fresh_model.handle)) as recorder:
        stream = fresh_model.stream(PROMPT, max_tokens=longest, temperature=0, ignore_eos=True, timeout=0.2)
        started = time.monotonic()
        with pytest.raises(infer.DeadlineExceededError):
            for _ in stream:
                pass
        waited = time.monotonic() - started
        recorder.wait_returned(5.0)
        wait_idle(fresh_model)
    assert waited < 1.5, f"the 0.2 s deadline ended the stream only after {waited:.2f} s"
    assert recorder.count("decode") < longest - 1, "the stream ran to its end instead of stopping at the deadline"


def test_async_streams_honour_the_deadline(fresh_model: infer.Model) -> None:
    stall = StepStall(fresh_model.handle, at=2, seconds=3.0)

    async def main() -> None:
        async for _ in fresh_model.astream(PROMPT, max_tokens=50, temperature=0, ignore_eos=True, timeout=0.3):
            pass

    with installed(stall):
        with pytest.raises(infer.DeadlineExceededError):
            asyncio.run(main())
        stall.release.set()
    wait_idle(fresh_model)
