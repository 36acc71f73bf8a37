"""Wrapper plugins the suite uses to watch and disturb any backend through the contract itself.

They are ``wrapper=True`` hookimpls: they see every backend's prefill and decode without the
backend's cooperation, which is what lets the suite test cancellation and deadlines on
backends that have no fault injection of their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

from infer import hookimpl

__all__ = ["Gate", "StepDelay", "StepRecorder", "StepStall", "installed", "track_caches", "wait_idle"]


class StepRecorder:
    """Records every prefill/decode call on one model: kind, row count, when, and how many still run."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.calls: list[tuple[str, int, float, tuple[int, ...]]] = []
        self._lock = threading.Lock()
        self._in_flight = 0

    def _record(self, kind: str, model: Any, batch: Any) -> None:
        if model is self._handle:
            with self._lock:
                self.calls.append((kind, batch.size, time.monotonic(), tuple(id(s) for s in batch.sequences)))

    def count(self, kind: str | None = None) -> int:
        """Calls recorded so far (of one kind, or all)."""
        with self._lock:
            return sum(1 for c in self.calls if kind is None or c[0] == kind)

    def calls_touching(self, sequence: Any) -> int:
        """Calls whose batch held ``sequence``."""
        with self._lock:
            return sum(1 for c in self.calls if id(sequence) in c[3])

    def wait_returned(self, seconds: float) -> None:
        """Fail unless every recorded call has returned within ``seconds`` (a step that never returns)."""
        deadline = time.monotonic() + seconds
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.002)
        assert self._in_flight == 0, f"a backend step has not returned {seconds:g} s later: the backend hangs"

    def _watch(self, kind: str, model: Any, batch: Any) -> Generator[None, Any, Any]:
        self._record(kind, model, batch)
        if model is not self._handle:
            return (yield)
        with self._lock:
            self._in_flight += 1
        try:
            return (yield)
        finally:
            with self._lock:
                self._in_flight -= 1

    @hookimpl(wrapper=True)
    def infer_prefill(self, model: Any, batch: Any) -> Generator[None, Any, Any]:
        return (yield from self._watch("prefill", model, batch))

    @hookimpl(wrapper=True)
    def infer_decode(self, model: Any, batch: Any) -> Generator[None, Any, Any]:
        return (yield from self._watch("decode", model, batch))


class StepStall:
    """Makes the ``at``-th decode call on one model block for ``seconds`` (an injected hang)."""

    def __init__(self, handle: Any, *, at: int, seconds: float) -> None:
        self._handle = handle
        self._at = at
        self._seconds = seconds
        self._seen = 0
        self.release = threading.Event()

    @hookimpl(wrapper=True)
    def infer_decode(self, model: Any, batch: Any) -> Generator[None, Any, Any]:
        if model is self._handle:
            self._seen += 1
            if self._seen == self._at:
                self.release.wait(self._seconds)
        return (yield)


class StepDelay:
    """Makes every prefill and decode call on one model take at least ``seconds`` longer.

    Slows a stream down through the contract, so that a test about deadlines does not depend
    on how fast the backend or the machine is (nor on the context length capping the stream).
    """

    def __init__(self, handle: Any, seconds: float) -> None:
        self._handle = handle
        self._seconds = seconds

    def _delay(self, model: Any) -> None:
        if model is self._handle:
            time.sleep(self._seconds)

    @hookimpl(wrapper=True)
    def infer_prefill(self, model: Any, batch: Any) -> Generator[None, Any, Any]:
        self._delay(model)
        return (yield)

    @hookimpl(wrapper=True)
    def infer_decode(self, model: Any, batch: Any) -> Generator[None, Any, Any]:
        self._delay(model)
        return (yield)


class Gate:
    """Holds the first prefill call on one model until :meth:`open` (to act between chunks)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.entered = threading.Event()
        self._open = threading.Event()
        self._used = False

    def open(self) -> None:
        """Let the held call go on."""
        self._open.set()

    @hookimpl(wrapper=True)
    def infer_prefill(self, model: Any, batch: Any) -> Generator[None, Any, Any]:
        if model is self._handle and not self._used:
            self._used = True
            self.entered.set()
            self._open.wait(30)
        return (yield)


@contextmanager
def installed(plugin: object) -> Iterator[Any]:
    """Register a wrapper plugin for the duration of a ``with`` block."""
    from infer.plugins import get_registry

    pm = get_registry().pm
    pm.register(plugin, name=f"infer-conformance-probe-{id(plugin)}")
    try:
        yield plugin
    finally:
        pm.unregister(plugin)


def track_caches(model: Any) -> list[Any]:
    """Record every cache ``model``'s backend makes from now on (the list fills as requests run)."""
    made: list[Any] = []
    original = model.handle.new_sequence

    def tracking(capacity: int) -> Any:
        made.append(original(capacity))
        return made[-1]

    model.handle.new_sequence = tracking
    return made


def wait_idle(model: Any, seconds: float = 5.0) -> None:
    """Wait until ``model`` has no request queued or running; fail if that takes ``seconds``."""
    deadline = time.monotonic() + seconds
    while model.active_requests and time.monotonic() < deadline:
        time.sleep(0.002)
    assert model.active_requests == 0, "a request is still running after it should have ended"
