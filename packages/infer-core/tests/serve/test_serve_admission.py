"""Admission on its own: a ticket is queued, then running, then done; slots, queue and KV budget hold."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("prometheus_client", reason="the server needs the serve extra")

from infer.serve.admission import Admission
from infer.serve.errors import APIError
from infer.serve.metrics import ServerMetrics

pytestmark = pytest.mark.unit


def _admission(concurrency: int = 1, queue: int = 4, kv_budget: int | None = None) -> Admission:
    return Admission(concurrency, queue, ServerMetrics(lambda: 0), kv_budget_bytes=kv_budget)


def test_a_ticket_is_queued_then_running_then_done_and_release_is_idempotent() -> None:
    async def scenario() -> None:
        admission = _admission()
        ticket = admission.admit()
        assert (admission.waiting, admission.running) == (1, 0)
        await ticket.acquire(timeout=1)
        assert (admission.waiting, admission.running) == (0, 1)
        ticket.release()
        ticket.release()
        assert (admission.waiting, admission.running) == (0, 0)

    asyncio.run(scenario())


def test_past_the_slots_and_the_queue_a_request_is_refused_with_429() -> None:
    admission = _admission(concurrency=1, queue=1)
    admission.admit()
    admission.admit()
    with pytest.raises(APIError) as refused:
        admission.admit()
    assert refused.value.status == 429 and admission.waiting == 2


def test_a_waiter_that_times_out_leaves_the_queue_and_holds_no_slot() -> None:
    async def scenario() -> None:
        admission = _admission(concurrency=1)
        first = admission.admit()
        await first.acquire(timeout=1)
        late = admission.admit()
        with pytest.raises(asyncio.TimeoutError):
            await late.acquire(timeout=0.01)
        assert (admission.waiting, admission.running) == (0, 1)
        first.release()
        again = admission.admit()
        await again.acquire(timeout=1)  # the slot came back; the late one took none
        assert admission.running == 1

    asyncio.run(scenario())


def test_a_request_waits_for_kv_bytes_until_a_running_one_gives_them_back() -> None:
    async def scenario() -> None:
        admission = _admission(concurrency=2, kv_budget=100)
        first = admission.admit(60)
        await first.acquire(timeout=1)
        second = admission.admit(60)
        waiting = asyncio.create_task(second.acquire(timeout=5))
        await asyncio.sleep(0.02)
        assert not waiting.done() and admission.kv_reserved_bytes == 60 and admission.waiting == 1
        first.release()
        await waiting
        assert admission.kv_reserved_bytes == 60 and (admission.waiting, admission.running) == (0, 1)
        second.release()
        assert admission.kv_reserved_bytes == 0

    asyncio.run(scenario())


def test_a_request_over_the_whole_kv_budget_is_refused_with_400() -> None:
    admission = _admission(kv_budget=100)
    with pytest.raises(APIError) as refused:
        admission.admit(101)
    assert refused.value.status == 400 and refused.value.param == "max_tokens" and admission.waiting == 0
