"""Admission control: a fixed number of slots, a bounded queue in front of them, 429 past that.

A slot is what a request holds while the model works on it; the model's scheduler batches
every slot holder's decode steps together. Requests beyond the slots wait in arrival order;
beyond the queue they are refused at once, so a burst never turns into unbounded memory or
latency.

With a KV budget, each request also reserves the cache bytes its sequence will hold (its prompt
plus its ``max_tokens``, within the context, times the model's KV bytes per token) while it
runs: a request that could never fit the budget is refused at once with a 400 naming both
sizes, one that fits but not beside the requests running waits for them to finish, so a long
context is queued, never an out-of-memory.
"""

from __future__ import annotations

import asyncio
from typing import final

from infer.serve.errors import APIError
from infer.serve.metrics import ServerMetrics

__all__ = ["Admission", "Ticket"]


@final
class Admission:
    """``max_concurrency`` slots and at most ``max_queue`` waiters; one per event loop.

    A request gets a :class:`Ticket` from :meth:`admit` and moves only through it; the ticket
    calls :meth:`take_slot`, :meth:`start`, :meth:`leave_queue` and :meth:`finish`, which keep
    the counts, the KV reservation and the metrics together.
    """

    def __init__(
        self, max_concurrency: int, max_queue: int, metrics: ServerMetrics, kv_budget_bytes: int | None = None
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        #: Most KV cache bytes the running requests may reserve together (``None``: no limit).
        self.kv_budget_bytes = kv_budget_bytes
        #: KV cache bytes the running requests reserve.
        self.kv_reserved_bytes = 0
        #: Requests holding a slot that wait for KV bytes, woken when a request gives its bytes back.
        self._kv_waiters: list[asyncio.Future[None]] = []
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

    def admit(self, kv_bytes: int = 0) -> Ticket:
        """Take a place in the queue, or refuse with a 429 (and ``Retry-After``) when it is full.

        The place is taken at once, so requests admitted together cannot overfill the queue.
        ``kv_bytes``: the cache the request will hold; over the whole KV budget it is a 400.
        """
        budget = self.kv_budget_bytes
        if budget is not None and kv_bytes > budget:
            raise APIError(
                400,
                f"the request needs {kv_bytes / 2**20:.1f} MiB of KV cache (prompt plus max_tokens) and this "
                f"server's KV budget is {budget / 2**20:.1f} MiB; shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if self._running + self._waiting >= self.max_concurrency + self.max_queue:
            raise APIError(
                429,
                f"the server is at capacity ({self._running} running, {self._waiting} queued); retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self._waiting += 1
        self._metrics.queue_depth.inc()
        return Ticket(self, kv_bytes)

    # -- a ticket's moves: queued -> holding a slot -> done -------------------------------------
    async def take_slot(self, kv_bytes: int) -> None:
        """Wait for a slot, then for ``kv_bytes`` of the KV budget, and reserve both.

        A cancelled or failed wait holds nothing. The caller stays counted as queued until
        :meth:`start`.
        """
        await self._slots.acquire()
        try:
            budget = self.kv_budget_bytes
            while budget is not None and self.kv_reserved_bytes + kv_bytes > budget:
                freed = asyncio.get_running_loop().create_future()
                self._kv_waiters.append(freed)
                await freed
            self.kv_reserved_bytes += kv_bytes
            self._metrics.kv_reserved_bytes.set(self.kv_reserved_bytes)
        except BaseException:
            self._slots.release()
            raise

    def start(self) -> None:
        """Count a request that took its slot as running instead of queued."""
        self.leave_queue()
        self._running += 1
        self._metrics.running.inc()

    def leave_queue(self) -> None:
        """Count a request as no longer queued (it started, or gave up waiting)."""
        self._waiting -= 1
        self._metrics.queue_depth.dec()

    def finish(self, kv_bytes: int) -> None:
        """Give a running request's slot (to the longest waiter) and ``kv_bytes`` back."""
        self._running -= 1
        self._metrics.running.dec()
        self._slots.release()
        self.kv_reserved_bytes -= kv_bytes
        self._metrics.kv_reserved_bytes.set(self.kv_reserved_bytes)
        waiters, self._kv_waiters = self._kv_waiters, []
        for freed in waiters:  # each checks again whether it fits now
            if not freed.done():
                freed.set_result(None)


@final
class Ticket:
    """One admitted request's place: queued, then holding a slot, then done."""

    __slots__ = ("_admission", "_kv_bytes", "_state")

    def __init__(self, admission: Admission, kv_bytes: int = 0) -> None:
        self._admission = admission
        self._kv_bytes = kv_bytes
        self._state = "queued"

    async def acquire(self, timeout: float | None) -> None:
        """Wait for a slot and the KV bytes; raise :class:`asyncio.TimeoutError` after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._admission.take_slot(self._kv_bytes), timeout)
        except BaseException:
            self.release()
            raise
        self._admission.start()
        self._state = "running"

    def release(self) -> None:
        """Leave the queue or give the slot back (to the longest waiter). Idempotent."""
        if self._state == "queued":
            self._admission.leave_queue()
        elif self._state == "running":
            self._admission.finish(self._kv_bytes)
        self._state = "done"
