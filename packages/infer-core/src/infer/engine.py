"""The engine loop: one scheduler thread per model drives every request on it.

Each iteration of :meth:`Engine._iterate` retires cancelled and expired requests, runs one
prefill chunk for the requests still reading their prompt, and one decode step for all
requests that are generating, batched (continuous batching: requests join and leave the
batch between steps). Sampled tokens are detokenized, checked against the stop rules and
pushed to the request's bounded :class:`Channel`; a request whose consumer has fallen behind
is simply not stepped until it catches up, so memory never grows without bound.

Consumers (sync or async streams) run in their own threads or event loops and only read
channels, which is what lets a deadline fire even while a backend step hangs.

A request's failure is its own: when sampling a batch fails, each row is sampled again alone
(from the random state it had before the batch) and only the rows that fail again end, with
their error; a consumer whose event loop has closed is treated as gone (its request is
cancelled), never as an error of the scheduler thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

import numpy as np
import numpy.typing as npt

from infer.contract import Batch, Capability, KVCache, ModelHandle, check_all_logits, check_logits
from infer.errors import BackendError, DeadlineExceededError, InferError, ModelClosedError
from infer.log import get_logger
from infer.prefix_cache import PrefixCache
from infer.results import Completion, FinishReason, Timings, TokenEvent, Usage
from infer.sampling import SamplerState, SamplingParams, logprobs
from infer.speculative import MAX_DRAFT, MAX_SPECULATIVE_BATCH, NGRAM_TRUST, NgramDrafter, StepDrafter
from infer.stops import StopMatcher

if TYPE_CHECKING:
    from infer.plugins import RoutedHooks
    from infer.tokenizer import Tokenizer

__all__ = ["Channel", "Engine", "Request"]

_request_ids = itertools.count(1)


@final
@dataclass(frozen=True, slots=True)
class Done:
    """Terminal channel item: the request finished normally."""

    completion: Completion


@final
@dataclass(frozen=True, slots=True)
class Failed:
    """Terminal channel item: the request ended with an error."""

    error: BaseException


@final
class Channel:
    """A bounded queue from the scheduler thread to one consumer, sync or async.

    Only the scheduler puts; it checks :meth:`has_room` first, so token events never exceed
    ``maxsize`` (a terminal item may add one more).
    """

    __slots__ = ("_cond", "_items", "_maxsize", "_on_room", "_waiter", "abandoned")

    def __init__(self, maxsize: int, on_room: Callable[[], None]) -> None:
        #: The consumer's event loop closed: nobody will read this channel again.
        self.abandoned = False
        self._items: deque[object] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._maxsize = maxsize
        self._on_room = on_room
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def has_room(self) -> bool:
        """Whether another token event fits."""
        return len(self._items) < self._maxsize

    def room(self) -> int:
        """How many more token events fit."""
        return self._maxsize - len(self._items)

    def put(self, item: object) -> None:
        """Append an item and wake the consumer."""
        with self._cond:
            self._items.append(item)
            self._cond.notify()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the consumer's loop closed while it awaited (asyncio.run ended)
                self.abandoned = True

    def _pop(self) -> object:
        was_full = len(self._items) >= self._maxsize
        item = self._items.popleft()
        if was_full:
            self._on_room()
        return item

    def get(self, timeout: float | None) -> object:
        """Next item; raise :class:`queue.Empty` after ``timeout`` seconds without one."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            return self._pop()

    async def aget(self, timeout: float | None) -> object:
        """Next item, awaited; raise :class:`TimeoutError` after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    return self._pop()
                future: asyncio.Future[None] = loop.create_future()
                self._waiter = (loop, future)
            try:
                await asyncio.wait_for(future, timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise TimeoutError from None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@final
class Request:
    """One generation request as the scheduler sees it."""

    __slots__ = (
        "cached",
        "cancelled",
        "channel",
        "deadline",
        "decoder",
        "draft_source",
        "drafter",
        "eos_ids",
        "events",
        "generated",
        "id",
        "kv",
        "max_new",
        "next_token",
        "params",
        "parent",
        "pos",
        "prompt",
        "sampler",
        "shadow_draft",
        "step_drafter",
        "stops",
        "stream_events",
        "t_first",
        "t_prefilled",
        "t_submit",
        "text",
        "timeout",
        "tool_format",
    )

    def __init__(
        self,
        prompt: npt.NDArray[np.int32],
        params: SamplingParams,
        *,
        vocab_size: int,
        max_new: int,
        eos_ids: frozenset[int],
        tokenizer: Tokenizer,
        timeout: float | None,
        channel: Channel,
        stream_events: bool = True,
    ) -> None:
        self.id = f"req-{next(_request_ids)}"
        #: Whether token events go to the channel (streams) or only the final result (generate).
        self.stream_events = stream_events
        self.prompt = prompt
        self.params = params
        self.sampler = SamplerState(params, prompt, vocab_size)
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopMatcher(params.stop) if params.stop else None
        self.eos_ids = eos_ids
        self.max_new = max_new
        self.channel = channel
        self.timeout = timeout
        self.t_submit = time.perf_counter()
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.cancelled = False
        self.kv: KVCache | None = None
        self.pos = 0
        #: Prompt tokens served from the prefix cache instead of prefilled.
        self.cached = 0
        #: Drafts tokens for speculative decoding, or ``None`` when the request does not speculate.
        self.drafter: NgramDrafter | None = None
        #: Drafts through the backend's draft steps (contract 1.3), where it has them.
        self.step_drafter: StepDrafter | None = None
        #: Which of the two made the draft being verified.
        self.draft_source: NgramDrafter | StepDrafter | None = None
        #: The lookup draft passed over for draft steps, scored once they are verified.
        self.shadow_draft: npt.NDArray[np.int32] = _NO_DRAFT
        #: Another choice of the same prompt whose prefill this request waits for, to fork its
        #: cache instead of prefilling the prompt again (``n > 1``); ``None`` once served.
        self.parent: Request | None = None
        self.next_token: int | None = None
        self.generated: list[int] = []
        self.text: list[str] = []
        self.events: list[TokenEvent] | None = [] if params.logprobs else None
        self.t_first = 0.0
        self.t_prefilled = 0.0
        #: The tool-call format to read the output with (set by the model for tool requests).
        self.tool_format: str | None = None


class Engine:
    """Schedules every request of one model on one thread and batches their steps."""

    def __init__(
        self,
        handle: ModelHandle,
        hooks: RoutedHooks,
        *,
        max_batch_size: int,
        prefill_chunk_size: int,
        capabilities: frozenset[Capability] = frozenset(),
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.handle = handle
        #: What the backend declared; the engine uses a contract 1.1 hook only when declared here.
        self.capabilities = capabilities
        #: The prefix index a new request starts from, or ``None`` when prefix caching is off.
        self.prefix_cache = prefix_cache
        self.hooks = hooks
        self.max_batch_size = max(1, max_batch_size)
        self.prefill_chunk_size = prefill_chunk_size
        #: Serialises backend calls between the scheduler and the low-level API.
        self.step_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: deque[Request] = deque()
        self._active: list[Request] = []
        self._closed = False
        self._holds = 0
        self._thread: threading.Thread | None = None
        self._log = get_logger()
        self._generation = -1
        self._prefill_call: Any = hooks.prefill
        self._decode_call: Any = hooks.decode
        self._sample_call: Any = hooks.sample
        self._host_sample_call: Any = hooks.host_sample
        #: A device sampler that does not declare token masks (contract 1.2) never sees a
        #: constrained row: those rows are drawn by the host chain, which applies the mask.
        self._masks_on_host = Capability.DEVICE_SAMPLING in capabilities and Capability.TOKEN_MASK not in capabilities

    def _refresh_calls(self) -> None:
        generation = self.hooks.pm.generation
        if generation != self._generation:
            self._generation = generation
            self._prefill_call = self.hooks.direct(self.hooks.prefill)
            self._decode_call = self.hooks.direct(self.hooks.decode)
            self._sample_call = self.hooks.direct(self.hooks.sample)
            self._host_sample_call = self.hooks.direct(self.hooks.host_sample)

    # -- called from consumer threads ------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; the scheduler picks it up before its next step."""
        with self._cond:
            if self._closed:
                raise ModelClosedError("the model is closed; load it again to generate")
            self._pending.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"infer-{self.handle.backend}", daemon=True)
                self._thread.start()
            self._cond.notify()
        self._log.info(
            "request.started", request_id=request.id, backend=self.handle.backend, prompt_tokens=len(request.prompt)
        )

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Submit several requests that the scheduler must first see together (the choices of one
        prompt, linked by :attr:`Request.parent` after submission): running requests keep
        stepping, new ones wait until the block ends."""
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request before its next step and release its cache."""
        request.cancelled = True
        self.wake()

    def wake(self) -> None:
        """Make the scheduler look at its requests again."""
        with self._cond:
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Fail every request with :class:`ModelClosedError` and stop the scheduler thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cond:
            leftovers = [*self._pending, *self._active]
            self._pending.clear()
            self._active.clear()
        for request in leftovers:
            self._end(request, Failed(ModelClosedError("the model was closed while the request ran")))
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    @property
    def active_requests(self) -> int:
        """Requests admitted and not yet finished (queued ones included)."""
        with self._cond:
            return len(self._pending) + len(self._active)

    # -- backend steps, shared with the low-level API ---------------------------------------

    def step(self, kind: str, batch: Batch) -> npt.NDArray[np.float32]:
        """Run prefill or decode on ``batch``, split to the backend's max batch size."""
        if self.hooks.pm.generation != self._generation:
            self._refresh_calls()
        hook = self._prefill_call if kind == "prefill" else self._decode_call
        size, most = len(batch.sequences), self.max_batch_size
        with self.step_lock:
            if size <= most:
                return self._call(hook, kind, batch, size)
            parts = [self._call(hook, kind, batch.rows(i, i + most), min(most, size - i)) for i in range(0, size, most)]
        return np.concatenate(parts)

    def _call(self, hook: Any, kind: str, batch: Batch, rows: int) -> npt.NDArray[np.float32]:
        backend = self.handle.backend
        try:
            out = hook(self.handle, batch)
        except InferError:
            raise
        except Exception as exc:
            raise BackendError(
                f"backend {backend!r} failed during {kind}: {type(exc).__name__}: {exc}", backend=backend
            ) from exc
        if out is None:
            raise BackendError(f"backend {backend!r} did not implement infer_{kind}", backend=backend)
        return check_logits(out, rows, self.handle.vocab_size, backend)

    # -- contract 1.1 capabilities ----------------------------------------------------------

    def step_all(self, batch: Batch) -> tuple[npt.NDArray[np.float32], ...]:
        """Run ``infer_prefill_all`` on ``batch``: every position's logits, one array per row."""
        rows: list[npt.NDArray[np.float32]] = []
        for start in range(0, batch.size, self.max_batch_size):
            part = batch.rows(start, start + self.max_batch_size)
            out = self._capability_call(Capability.ALL_LOGITS, self.hooks.prefill_all, part)
            rows += check_all_logits(out, [len(t) for t in part.tokens], self.handle.vocab_size, self.handle.backend)
        return tuple(rows)

    def step_draft(self, batch: Batch) -> npt.NDArray[np.float32]:
        """Run ``infer_draft`` on ``batch`` (one token a row): approximate next-token logits (contract 1.3)."""
        out = self._capability_call(Capability.DRAFT, self.hooks.draft, batch)
        return check_logits(out, batch.size, self.handle.vocab_size, self.handle.backend)

    def truncate(self, sequence: KVCache, length: int) -> None:
        """Roll ``sequence`` back to its first ``length`` tokens (``infer_truncate``)."""
        self._capability_call(Capability.TRUNCATE, self.hooks.truncate, sequence, length)
        if sequence.length != length:
            backend = self.handle.backend
            raise BackendError(
                f"backend {backend!r} truncated a cache to {sequence.length} tokens, not {length}", backend=backend
            )

    def fork(self, sequence: KVCache, length: int, capacity: int) -> KVCache:
        """A new cache holding ``sequence``'s first ``length`` tokens (``infer_fork``)."""
        out = self._capability_call(Capability.FORK, self.hooks.fork, sequence, length, capacity)
        if not isinstance(out, KVCache) or out.length != length:
            backend = self.handle.backend
            raise BackendError(
                f"backend {backend!r} forked a cache that does not hold {length} tokens", backend=backend
            )
        return out

    def _capability_call(self, capability: Capability, caller: Any, *args: Any) -> Any:
        backend = self.handle.backend
        if capability not in self.capabilities:
            raise BackendError(
                f"backend {backend!r} does not declare the {capability.value!r} capability",
                backend=backend,
            )
        names = caller.spec.argnames
        try:
            with self.step_lock:
                out = caller(**dict(zip(names, (self.handle, *args), strict=True)))
        except InferError:
            raise
        except Exception as exc:
            raise BackendError(
                f"backend {backend!r} failed in {caller.name}: {type(exc).__name__}: {exc}", backend=backend
            ) from exc
        if out is None:
            raise BackendError(
                f"backend {backend!r} declares {capability.value!r} but did not answer {caller.name}", backend=backend
            )
        return out

    # -- the scheduler thread ---------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        while True:
            with self._cond:
                # after a productive iteration go straight on; only an idle one waits
                while not self._closed and not self._admissible() and not (busy or self._has_work()):
                    self._cond.wait(self._wait_time())
                if self._closed:
                    return
                while self._admissible():
                    self._active.append(self._pending.popleft())
            try:
                busy = self._iterate()
            except Exception as exc:  # noqa: BLE001 - keep the model usable whatever happened
                self._log.error("engine.error", error=f"{type(exc).__name__}: {exc}")
                with self._cond:
                    failed, self._active = self._active, []
                for request in failed:
                    self._end(request, Failed(exc))
                busy = False

    def _admissible(self) -> bool:
        return bool(self._pending) and not self._holds

    def _has_work(self) -> bool:
        now = time.monotonic()
        return any(_ending(r, now) or (r.channel.has_room() and not _waiting(r)) for r in self._active)

    def _wait_time(self) -> float | None:
        deadlines = [r.deadline for r in self._active if r.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _iterate(self) -> bool:
        """One scheduling round; return whether any backend step ran."""
        now = time.monotonic()
        prefill: list[Request] = []
        decode: list[Request] = []
        ending: list[Request] = []
        for r in self._active:
            if _ending(r, now):
                ending.append(r)
            elif r.channel.has_room() and not _waiting(r):
                (prefill if r.next_token is None else decode).append(r)
        for r in ending:
            if r.cancelled or r.channel.abandoned:
                self._retire(r, None)
            else:
                assert r.timeout is not None
                self._retire(r, Failed(DeadlineExceededError(r.timeout, len(r.generated))))
        if prefill:
            self._prefill(prefill[: self.max_batch_size])
        if decode:
            self._decode(decode)
            if len(decode) == 1 and not prefill:
                self._decode_alone(decode[0])
        return bool(prefill or decode)

    def _decode(self, requests: list[Request]) -> None:
        # Speculation only pays while decode is bound by reading the weights: a batch already
        # reads them once for every row (see infer.speculative.MAX_SPECULATIVE_BATCH).
        drafts = [self._draft(r) for r in requests] if len(requests) <= MAX_SPECULATIVE_BATCH else []
        if drafts and any(r.next_token is None for r in requests):  # a draft step failed: that request ended
            kept = [i for i, r in enumerate(requests) if r.next_token is not None]
            requests, drafts = [requests[i] for i in kept], [drafts[i] for i in kept]
            if not requests:
                return
        if any(len(d) for d in drafts):
            self._verify(requests, drafts)
            return
        if len(requests) == 1:
            tokens = [np.array((requests[0].next_token,), dtype=np.int32)]
        else:
            ids = np.array([r.next_token for r in requests], dtype=np.int32)
            tokens = [ids[i : i + 1] for i in range(len(requests))]
        logits = self._run_step("decode", requests, tokens)
        if logits is not None:
            self._sample(requests, logits)

    def _draft(self, request: Request) -> npt.NDArray[np.int32]:
        """The tokens ``request`` speculates will follow its pending one (none when it does not)."""
        drafter, kv = request.drafter, request.kv
        if drafter is None or kv is None:
            return _NO_DRAFT
        limit = min(
            request.max_new - len(request.generated) - 1,  # never past max_tokens
            kv.capacity - kv.length - 1,  # the pending token goes in too
            request.channel.room() - 1 if request.stream_events else MAX_DRAFT,  # never past the buffer
        )
        context = np.concatenate([request.prompt, np.asarray(request.generated, np.int32)])
        draft = drafter.draft(context, limit)
        steps = request.step_drafter
        if steps is not None and limit > 0 and (not len(draft) or drafter.rate < NGRAM_TRUST):
            request.draft_source, request.shadow_draft = steps, draft
            return self._draft_steps(request, steps, limit)
        request.draft_source, request.shadow_draft = drafter, _NO_DRAFT
        return draft

    def _draft_steps(self, request: Request, steps: StepDrafter, limit: int) -> npt.NDArray[np.int32]:
        """Draft by the backend's draft steps (contract 1.3), then roll the cache back to where it
        was: verification feeds the drafted positions again."""
        kv, token = request.kv, request.next_token
        assert kv is not None and token is not None
        start, drafted = kv.length, []
        try:
            for _ in range(min(steps.k, limit)):
                logits = self.step_draft(Batch((kv,), (np.array((token,), np.int32),)))
                token, sure = steps.choose(logits[0])
                drafted.append(token)
                if not sure:
                    break
            self.truncate(kv, start)
        except InferError as exc:
            self._retire(request, Failed(exc))
            return _NO_DRAFT
        return np.array(drafted, np.int32)

    def _verify(self, requests: list[Request], drafts: list[npt.NDArray[np.int32]]) -> None:
        """Feed each pending token and its draft in one all-position step; keep what sampling confirms.

        Each position is sampled with the request's own sampler, in order; a draft token stays
        while it equals the sampled one, and the first that does not is replaced by the sampled
        token, the cache truncated to what was kept (see :mod:`infer.speculative` for why this is
        exact). Every sampled token is emitted, so stateful samplers see an ordinary sequence.
        """
        rows = [np.concatenate((np.array([r.next_token], np.int32), d)) for r, d in zip(requests, drafts, strict=True)]
        kvs = tuple(r.kv for r in requests if r.kv is not None)
        try:
            logits = self.step_all(Batch(kvs, tuple(rows)))
        except InferError as exc:
            for request in requests:
                self._retire(request, Failed(exc))
            return
        for request, draft, row_logits in zip(requests, drafts, logits, strict=True):
            self._confirm(request, draft, row_logits)

    def _confirm(self, request: Request, draft: npt.NDArray[np.int32], logits: npt.NDArray[np.float32]) -> None:
        assert request.kv is not None
        fed = request.kv.length - len(draft)  # the cache length once the pending token is in
        kept = 0
        for j in range(len(draft) + 1):
            try:
                token = int(self._draw(logits[j : j + 1], [request.params], [request.sampler])[0])
                hit = j < len(draft) and token == int(draft[j])
                if not hit and j < len(draft):
                    self.truncate(request.kv, fed + j)
            except Exception as exc:  # noqa: BLE001 - this request's failure ends this request only
                self._retire(request, Failed(_as_typed(exc, self.handle.backend, "sample")))
                return
            self._accept(request, token, logits, j)
            if not hit or request.next_token is None:  # a mismatch, or the request ended
                break
            kept += 1
        if request.draft_source is not None and len(draft):
            request.draft_source.update(len(draft), kept)
        shadow = request.shadow_draft
        if len(shadow) and request.drafter is not None:
            # the lookup draft that was not taken, scored against the tokens this step emitted
            emitted = np.asarray(request.generated[len(request.generated) - kept - 1 :], np.int32)
            size = min(len(shadow), len(emitted))
            wrong = np.flatnonzero(shadow[:size] != emitted[:size])
            request.drafter.observe(len(shadow), int(wrong[0]) if len(wrong) else size)

    def _decode_alone(self, request: Request) -> None:
        """Step a request that decodes alone back to back, while nothing else needs the scheduler.

        The same steps as going round :meth:`_run` once per token, without re-scanning every
        request: it hands back as soon as the request ends, is cancelled, passes its deadline or
        fills its channel, another request arrives, or the model closes.
        """
        while (
            request.next_token is not None
            and not self._pending
            and not self._closed
            and not _ending(request, time.monotonic())
            and request.channel.has_room()
        ):
            self._decode([request])

    def _prefill(self, requests: list[Request]) -> None:
        for request in requests:
            if request.kv is None:
                try:
                    self._start(request)
                except Exception as exc:  # noqa: BLE001
                    self._retire(request, Failed(_as_typed(exc, self.handle.backend, "new_sequence")))
        requests = [r for r in requests if r.kv is not None]
        if not requests:
            return
        chunks = [r.prompt[r.pos : r.pos + self.prefill_chunk_size] for r in requests]
        logits = self._run_step("prefill", requests, chunks)
        if logits is None:
            return
        done, rows = [], []
        for i, (request, chunk) in enumerate(zip(requests, chunks, strict=True)):
            request.pos += len(chunk)
            if request.pos == len(request.prompt):
                request.t_prefilled = time.perf_counter()
                if self.prefix_cache is not None and request.kv is not None:
                    self.prefix_cache.add_live(request.kv, request.prompt)
                done.append(request)
                rows.append(i)
                for sibling in self._fork_siblings(request):
                    done.append(sibling)
                    rows.append(i)
        if done:
            self._sample(done, logits if rows == list(range(len(requests))) else logits[rows])

    def _fork_siblings(self, request: Request) -> list[Request]:
        """The choices waiting for ``request``'s prompt, each given a fork of its cache.

        They start from the same last-position logits, so the prompt is prefilled once for all
        ``n`` choices; a sibling whose fork fails ends with that error, the others go on.
        """
        served = []
        for sibling in [r for r in self._active if r.parent is request]:
            sibling.parent = None
            assert request.kv is not None
            try:
                sibling.kv = self.fork(request.kv, len(request.prompt), len(sibling.prompt) + sibling.max_new)
            except Exception as exc:  # noqa: BLE001 - one choice's failure ends that choice only
                self._retire(sibling, Failed(_as_typed(exc, self.handle.backend, "fork")))
                continue
            sibling.pos = sibling.cached = len(sibling.prompt)
            sibling.t_prefilled = request.t_prefilled
            served.append(sibling)
        return served

    def _start(self, request: Request) -> None:
        """Give ``request`` its cache: a fork of the longest cached prefix of its prompt, or a new one."""
        capacity = len(request.prompt) + request.max_new
        hit = self.prefix_cache.lookup(request.prompt) if self.prefix_cache is not None else None
        if hit is None:
            request.kv = self.handle.new_sequence(capacity)
            return
        request.kv = self.fork(hit.kv, hit.length, capacity)
        request.pos = request.cached = hit.length
        self._log.info("request.prefix_hit", request_id=request.id, cached_tokens=hit.length)

    def _run_step(
        self, kind: str, requests: list[Request], tokens: Sequence[npt.NDArray[np.int32]]
    ) -> npt.NDArray[np.float32] | None:
        batch = Batch(tuple([r.kv for r in requests if r.kv is not None]), tuple(tokens))
        try:
            return self.step(kind, batch)
        except InferError as exc:
            for request in requests:
                self._retire(request, Failed(exc))
            return None

    def _sample(self, requests: list[Request], logits: npt.NDArray[np.float32]) -> None:
        params = [r.params for r in requests]
        states = [r.sampler for r in requests]
        # A row that fails must not take its batch-mates with it: they are sampled again alone,
        # from the random state they had before (so their tokens stay those of a solo run).
        saved = [s.rng.bit_generator.state for s in states if not s.params.greedy] if len(requests) > 1 else None
        try:
            chosen = self._draw(logits, params, states)
        except Exception as exc:  # noqa: BLE001
            if saved is None:
                self._retire(requests[0], Failed(_as_typed(exc, self.handle.backend, "sample")))
                return
            random_states = iter(saved)
            for state in states:
                if not state.params.greedy:
                    state.rng.bit_generator.state = next(random_states)
            for i, request in enumerate(requests):
                self._sample_alone(request, logits, i)
            return
        for i, token in enumerate(chosen.tolist()):
            self._accept(requests[i], token, logits, i)

    def _draw(
        self, logits: npt.NDArray[np.float32], params: list[SamplingParams], states: list[SamplerState]
    ) -> npt.NDArray[np.int64]:
        """Sample one token per row: on the backend's chain, constrained rows on the host's when
        the backend samples on its device without declaring token masks."""
        if not self._masks_on_host:
            return self._sample_call(logits, params, states)  # type: ignore[no-any-return]
        host = [i for i, p in enumerate(params) if p.constraint is not None]
        if not host:
            return self._sample_call(logits, params, states)  # type: ignore[no-any-return]
        if len(host) == len(params):
            return self._host_sample_call(logits, params, states)  # type: ignore[no-any-return]
        device = [i for i, p in enumerate(params) if p.constraint is None]
        chosen = np.empty(len(params), dtype=np.int64)
        for rows, call in ((device, self._sample_call), (host, self._host_sample_call)):
            chosen[rows] = call(logits[rows], [params[i] for i in rows], [states[i] for i in rows])
        return chosen

    def _sample_alone(self, request: Request, logits: npt.NDArray[np.float32], row: int) -> None:
        try:
            token = int(self._draw(logits[row : row + 1], [request.params], [request.sampler])[0])
        except Exception as exc:  # noqa: BLE001
            self._retire(request, Failed(_as_typed(exc, self.handle.backend, "sample")))
            return
        self._accept(request, token, logits, row)

    def _accept(self, request: Request, token: int, logits: npt.NDArray[np.float32], row: int) -> None:
        try:
            self._take(request, token, logits, row)
        except Exception as exc:  # noqa: BLE001 - one request's bad row or token ends that request only
            self._retire(request, Failed(_as_typed(exc, self.handle.backend, "sample")))

    def _take(self, request: Request, token: int, logits: npt.NDArray[np.float32], row: int) -> None:
        request.sampler.append(token)
        params = request.params
        lp, top = (logprobs(logits[row], token, params.top_logprobs)) if params.logprobs else (None, ())
        generated = request.generated
        generated.append(token)
        if len(generated) == 1:
            request.t_first = time.perf_counter()
            ttft = round(request.t_first - request.t_submit, 6)
            self._log.info("request.first_token", request_id=request.id, ttft_s=ttft)
        finish: FinishReason | None = None
        if (token in request.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            finish = "stop"
        delta = request.decoder.step(token)
        if request.stops is not None:
            delta, hit = request.stops.feed(delta)
            if hit:
                finish = "stop"
        if finish is None and len(generated) >= request.max_new:
            finish = "length"
        if finish is not None and request.stops is not None:
            delta += request.stops.flush()
        request.text.append(delta)
        if request.stream_events or request.events is not None:
            event = TokenEvent(len(generated) - 1, token, delta, lp, top)
            if request.events is not None:
                request.events.append(event)
            if request.stream_events:
                request.channel.put(event)
        if finish is None:
            request.next_token = token
        else:
            self._retire(request, Done(self._completion(request, finish, time.perf_counter())))

    def _completion(self, request: Request, finish: FinishReason, now: float) -> Completion:
        n = len(request.generated)
        prefill_s = max(request.t_prefilled - request.t_submit, 1e-9)
        decode_s = now - request.t_first
        return Completion(
            id=request.id,
            text="".join(request.text),
            token_ids=tuple(request.generated),
            finish_reason=finish,
            usage=Usage(len(request.prompt), n, cached_tokens=request.cached),
            timings=Timings(
                time_to_first_token=request.t_first - request.t_submit,
                prefill_tokens_per_s=len(request.prompt) / prefill_s,
                decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                total=now - request.t_submit,
            ),
            logprobs=tuple(request.events) if request.events is not None else None,
        )

    def _retire(self, request: Request, outcome: Done | Failed | None) -> None:
        with self._cond:
            if request in self._active:
                self._active.remove(request)
        self._end(request, outcome)

    def _end(self, request: Request, outcome: Done | Failed | None) -> None:
        with self._cond:
            for sibling in self._active:
                if sibling.parent is request:  # it will never prefill for them: they prefill alone
                    sibling.parent = None
        if request.kv is not None:
            try:
                self._keep(request, outcome)
            except Exception as exc:  # noqa: BLE001 - a failed keep loses only the reuse, never the scheduler
                self._log.error("prefix_cache.keep_failed", request_id=request.id, error=f"{type(exc).__name__}: {exc}")
            try:
                request.kv.release()
            except Exception as exc:  # noqa: BLE001 - the scheduler outlives a backend's failed release
                self._log.error("engine.release_failed", request_id=request.id, error=f"{type(exc).__name__}: {exc}")
        request.next_token = None
        if outcome is not None:
            request.channel.put(outcome)
        fields: dict[str, Any] = {"request_id": request.id, "completion_tokens": len(request.generated)}
        if isinstance(outcome, Done):
            timings = outcome.completion.timings
            fields |= {
                "finish_reason": outcome.completion.finish_reason,
                "ttft_s": round(timings.time_to_first_token, 6),
                "decode_tok_s": round(timings.decode_tokens_per_s, 2),
            }
        elif isinstance(outcome, Failed):
            fields["error"] = type(outcome.error).__name__
        else:
            fields["finish_reason"] = "cancelled"
        if request.drafter is not None:
            fields |= {"draft_proposed": request.drafter.proposed, "draft_accepted": request.drafter.accepted}
        if request.step_drafter is not None:
            steps = request.step_drafter
            fields |= {"draft_step_proposed": steps.proposed, "draft_step_accepted": steps.accepted}
        self._log.info("request.finished", **fields)

    def _keep(self, request: Request, outcome: Done | Failed | None) -> None:
        """Hand a compact copy of a finished request's cache to the prefix index.

        The copy (``infer_fork`` of exactly the tokens held) is what the index keeps, never the
        request's own cache: that one sits in memory sized for the whole request and, on batching
        backends, shared with the rest of its batch, so keeping it would pin all of that while
        the budget counted only its share. The caller releases the request's cache either way.
        A failed request's cache is never kept: the failure may have left it half-written.
        """
        kv, cache = request.kv, self.prefix_cache
        if cache is None or kv is None or kv.released:
            return
        cache.forget(kv)  # indexed while live; the copy replaces it
        if isinstance(outcome, Failed) or Capability.FORK not in self.capabilities:
            return
        held = np.concatenate([request.prompt[: request.pos], np.asarray(request.generated, np.int32)])[: kv.length]
        if len(held) != kv.length or not cache.worth_keeping(len(held)):
            return  # tokens the engine cannot name are never indexed; too short to be hit
        kept = self.fork(kv, len(held), len(held))
        if not cache.adopt(kept, held):
            kept.release()


_NO_DRAFT: npt.NDArray[np.int32] = np.zeros(0, np.int32)


def _waiting(request: Request) -> bool:
    """Whether ``request`` waits for a sibling choice's prefill to fork it."""
    return request.parent is not None and request.kv is None


def _ending(request: Request, now: float) -> bool:
    """Whether ``request`` is to be retired before another step: cancelled, consumer gone, or past its deadline."""
    return request.cancelled or request.channel.abandoned or (request.deadline is not None and now >= request.deadline)


def _as_typed(exc: BaseException, backend: str, what: str) -> InferError:
    if isinstance(exc, BackendError) and exc.backend != backend and what == "sample":
        # the sampler cannot know which backend produced the bad logits; the engine does
        return BackendError(str(exc), backend=backend)
    if isinstance(exc, InferError):
        return exc
    error = BackendError(f"backend {backend!r} failed in {what}: {type(exc).__name__}: {exc}", backend=backend)
    error.__cause__ = exc
    return error
