"""Admission control: a fixed number of slots, a bounded queue in front of them, 429 past that.

A slot is what a request holds while the model works on it; the model's scheduler batches
every slot holder's decode steps together. Requests beyond the slots wait in arrival order;
beyond the queue they are refused at once, so a burst never turns into unbounded memory or
latency.
"""

from __future__ import annotations

import asyncio
from typing import final

from infer.serve.errors import APIError
from infer.serve.metrics import ServerMetrics

__all__ = ["Admission", "Ticket"]


@final
class Admission:
    """``max_concurrency`` slots and at most ``max_queue`` waiters; one per event loop."""

    def __init__(self, max_concurrency: int, max_queue: int, metrics: ServerMetrics) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(max_concurrency)
        self._waiting = 0
        self._running = 0
        self._metrics = metrics

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return self._waiting

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return self._running

    def admit(self) -> Ticket:
        """Take a place in the queue, or refuse with a 429 (and ``Retry-After``) when it is full.

        The place is taken at once, so requests admitted together cannot overfill the queue.
        """
        if self._running + self._waiting >= self.max_concurrency + self.max_queue:
            raise APIError(
                429,
                f"the server is at capacity ({self._running} running, {self._waiting} queued); retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self._waiting += 1
        self._metrics.queue_depth.inc()
        return Ticket(self)


@final
class Ticket:
    """One admitted request's place: queued, then holding a slot, then done."""

    __slots__ = ("_admission", "_state")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._state = "queued"

    async def acquire(self, timeout: float | None) -> None:
        """Wait for a slot; raise :class:`asyncio.TimeoutError` after ``timeout`` seconds."""
        a = self._admission
        try:
            await asyncio.wait_for(a._slots.acquire(), timeout)
        except BaseException:
            self.release()
            raise
        self._leave_queue()
        self._state = "running"
        a._running += 1
        a._metrics.running.inc()

    def _leave_queue(self) -> None:
        a = self._admission
        a._waiting -= 1
        a._metrics.queue_depth.dec()

    def release(self) -> None:
        """Leave the queue or give the slot back (to the longest waiter). Idempotent."""
        a = self._admission
        if self._state == "queued":
            self._leave_queue()
        elif self._state == "running":
            a._running -= 1
            a._metrics.running.dec()
            a._slots.release()
        self._state = "done"
