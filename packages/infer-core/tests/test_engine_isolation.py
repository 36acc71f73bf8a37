"""A request's failure is its own: bad rows and vanished consumers leave batch-mates and the scheduler alone."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import infer
from infer_conformance.probes import StepRecorder, installed

pytestmark = pytest.mark.unit

PROMPT = [5, 17, 42, 8, 99, 3, 61, 27, 14, 33]
POISON_SEED = 13


class PoisonRows:
    """Turns the logits row of every request seeded :data:`POISON_SEED` into NaN before sampling."""

    @infer.hookimpl(wrapper=True)
    def infer_sample(self, logits, params, states):
        for i, p in enumerate(params):
            if p.seed == POISON_SEED:
                logits[i] = np.nan
        return (yield)


def test_a_row_the_sampler_cannot_use_fails_only_its_own_request():
    model = infer.load("fake", backend="fake", latency=0.002)
    try:
        options = {"max_tokens": 12, "ignore_eos": True, "temperature": 0.9, "top_p": 0.95}
        solo = {seed: model.generate(PROMPT, seed=seed, **options).token_ids for seed in range(1, 9)}
        with installed(PoisonRows()), installed(StepRecorder(model.handle)) as recorder:
            streams = {seed: model.stream(PROMPT, seed=seed, **options) for seed in [*range(1, 5), POISON_SEED]}
            streams.update({seed: model.stream(PROMPT, seed=seed, **options) for seed in range(5, 9)})
            poisoned = streams.pop(POISON_SEED)
            with pytest.raises(infer.BackendError, match="no usable maximum"):
                poisoned.result()
            together = {seed: s.result().token_ids for seed, s in streams.items()}
        assert any(kind == "decode" and size > 2 for kind, size, *_ in recorder.calls)  # they were batched
        # Every batch-mate finished, with the very tokens of its solo run (its random draws were kept).
        assert together == solo
        assert model.active_requests == 0
    finally:
        model.close()


def test_a_repetition_penalty_that_would_overflow_the_logits_is_refused_up_front(fake):
    with pytest.raises(infer.InvalidParameterError, match="repetition_penalty"):
        fake.stream(PROMPT, repetition_penalty=1e-300)


def test_the_scheduler_survives_async_consumers_whose_event_loop_closes_mid_stream():
    model = infer.load("fake", backend="fake", latency=0.01)
    try:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda loop, context: None)  # the abandoned tasks are the point
        streams = [model.astream(PROMPT, max_tokens=500, ignore_eos=True) for _ in range(2)]

        async def read_all(stream):
            async for _ in stream:
                pass

        tasks = [loop.create_task(read_all(s)) for s in streams]
        loop.run_until_complete(asyncio.sleep(0.3))  # both are mid-stream, awaiting their next token
        assert not any(t.done() for t in tasks)
        loop.close()  # without cancelling them: their streams' loop is simply gone
        # The engine is alive: a new request runs, and the orphaned requests are retired.
        completion = model.generate(PROMPT, max_tokens=3, ignore_eos=True, timeout=10)
        assert completion.usage.completion_tokens == 3
        deadline = time.monotonic() + 5
        while model.active_requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert model.active_requests == 0
        del tasks, streams
    finally:
        model.close()
