"""The Starlette app: OpenAI-style routes over one loaded :class:`infer.Model`.

A generation request goes: Host check (:mod:`infer.serve.guards`) -> authorize -> require a
JSON content type -> read the body (bounded in size and time) -> check its shape
(:mod:`infer.serve.schemas`) -> render the chat template (budgeted) and tokenize, in a small
pool of worker threads, after a byte-length check -> take a queue place (429 when full) ->
wait for a slot -> stream from the model. The last two steps run inside the
response, next to a task watching for the client to go away: if it does, the request is
cancelled wherever it is (queued, prefilling, decoding), so its sequence leaves the model's
batch before the next step and its cache is released.

Safe by default: a request deadline (:data:`DEFAULT_REQUEST_TIMEOUT`), a body read timeout,
a write timeout for clients that stop reading, loopback hosts only, metric labels from route
templates (never raw paths), and no filesystem path in any answer.

Only the core's public API is used; nothing here knows which backend runs the model.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace
from typing import Any, final

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from infer import __version__ as infer_version
from infer.errors import (
    ContextLengthError,
    DeadlineExceededError,
    EmptyPromptError,
    InferError,
    InvalidParameterError,
    InvalidTokenError,
    PromptTooLongError,
)
from infer.evaluate import prompt_logprobs
from infer.log import get_logger
from infer.model import AsyncTokenStream, Model, PreparedRequest
from infer.results import Completion, Timings, TokenEvent, Usage
from infer.sampling import SamplingParams
from infer.serve.admission import Admission, Ticket
from infer.serve.defaults import DEFAULT_BODY_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_WRITE_TIMEOUT
from infer.serve.errors import APIError, from_infer_error, shutdown_error
from infer.serve.formats import Echo, Formatter, ToolCallHolder, sse
from infer.serve.guards import DEFAULT_ALLOWED_HOSTS, HostCheck
from infer.serve.metrics import CONTENT_TYPE, ServerMetrics
from infer.serve.request_id import RequestId
from infer.serve.responses import ConversationStore, ResponsesFormatter
from infer.serve.responses import event as responses_event
from infer.serve.schemas import (
    GenerationRequest,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_json,
    parse_responses,
    parse_tokenize,
)
from infer.tools import ToolFormat, with_tool_calls

__all__ = ["create_app"]

#: Default slots: requests the model works on at once (their decode steps are batched).
DEFAULT_MAX_CONCURRENCY = 32
#: Default queue: requests waiting for a slot before the server answers 429.
DEFAULT_MAX_QUEUE = 256
#: Default request body limit (a 128k-token prompt is about 0.5 MB of text).
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
#: Worker threads rendering templates and tokenizing prompts at once. Few on purpose: the work
#: holds the GIL in part, and the event loop must keep its share to answer /health meanwhile.
PREPARE_THREADS = 4
#: Fill-in-the-middle token names (prefix, suffix, middle) of the tokenizer families that have them.
_FIM_TOKENS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen 2.5 coder
)
# Unknown request fields named in warnings, at most, over the server's life (no log floods).
_MAX_IGNORED_NAMES = 64

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies must not buffer a token stream
]


def create_app(
    model: Model,
    *,
    model_name: str,
    api_key: str | None = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_tokens: int | None = None,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    allowed_hosts: tuple[str, ...] | list[str] = DEFAULT_ALLOWED_HOSTS,
    strict_requests: bool = False,
    aliases: Sequence[str] = (),
    any_model_name: bool = False,
    cors_origins: Sequence[str] = (),
    max_kv_bytes: int | None = None,
) -> Starlette:
    """Build the ASGI app serving ``model`` under the name ``model_name``.

    ``api_key``: when set (non-empty), every ``/v1`` route needs ``Authorization: Bearer <key>``.
    ``max_concurrency`` requests run at once (batched by the model's scheduler) and up to
    ``max_queue`` more wait; past that the server answers 429. Bodies over ``max_body_bytes``
    get 413, prompts over ``max_prompt_tokens`` (or the model's context) 400. A request
    still running ``request_timeout`` seconds after it arrived ends with 504 (or an error
    event, once its stream has begun); ``None`` removes the deadline. A body not received within
    ``body_timeout`` seconds gets 408, and a client that leaves a write blocked for
    ``write_timeout`` seconds is dropped. Requests must name one of ``allowed_hosts`` in their
    ``Host`` header (``"*"``: any). Unknown request fields are ignored with a logged warning,
    or refused with 400 when ``strict_requests``. Requests may also name the model by one of
    ``aliases``, or by any name at all with ``any_model_name`` (for clients that insist on their
    own default). ``cors_origins`` lets browser pages from those origins (``"*"``: any) call the
    API; none by default. With ``max_kv_bytes``, running requests together reserve at most that
    much KV cache (prompt plus ``max_tokens``, times the model's KV bytes per token): a request
    over it alone gets 400, one that does not fit yet waits in the queue. The caller keeps
    ownership of ``model``.
    """
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise InvalidParameterError("api_key", api_key, "a non-empty string, or None for no key")
    _check_positive("max_concurrency", max_concurrency)
    _check_positive("max_queue", max_queue, zero=True)
    _check_positive("max_body_bytes", max_body_bytes)
    if max_prompt_tokens is not None:
        _check_positive("max_prompt_tokens", max_prompt_tokens)
    if max_kv_bytes is not None:
        _check_positive("max_kv_bytes", max_kv_bytes)
    if request_timeout is not None and (
        isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float)) or not request_timeout > 0
    ):
        raise InvalidParameterError("request_timeout", request_timeout, "a positive number of seconds or None")
    for name, value in (("body_timeout", body_timeout), ("write_timeout", write_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InvalidParameterError(name, value, "a positive number of seconds")
    if isinstance(allowed_hosts, str) or not allowed_hosts or not all(isinstance(h, str) for h in allowed_hosts):
        raise InvalidParameterError("allowed_hosts", allowed_hosts, "a non-empty list of host names (or '*')")
    if not isinstance(model_name, str) or not model_name:
        raise InvalidParameterError("model_name", model_name, "a non-empty string")
    for name, values in (("aliases", aliases), ("cors_origins", cors_origins)):
        if isinstance(values, str) or not all(isinstance(v, str) and v for v in values):
            raise InvalidParameterError(name, values, "a list of non-empty strings")
    server = _Server(
        model,
        model_name=model_name,
        api_key=api_key,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        max_prompt_tokens=max_prompt_tokens,
        request_timeout=None if request_timeout is None else float(request_timeout),
        body_timeout=float(body_timeout),
        write_timeout=float(write_timeout),
        strict_requests=bool(strict_requests),
        names=(model_name, *(a for a in dict.fromkeys(aliases) if a != model_name)),
        any_model_name=bool(any_model_name),
        max_kv_bytes=max_kv_bytes,
    )
    routes = [
        Route("/v1/models", server.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", server.get_model, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/responses", server.responses, methods=["POST"]),
        Route("/tokenize", server.tokenize, methods=["POST"]),
        Route("/detokenize", server.detokenize, methods=["POST"]),
        Route("/tokenizer_info", server.tokenizer_info, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_page, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        # RequestId outermost: the Host check's refusals carry the header too.
        middleware=[
            Middleware(RequestId),
            Middleware(HostCheck, allowed=tuple(allowed_hosts)),
            *_cors(cors_origins),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.server = server
    return app


def _cors(origins: Sequence[str]) -> list[Middleware]:
    """CORS for the given origins, after the Host check (a rebound DNS name is refused first)."""
    if not origins:
        return []
    from starlette.middleware.cors import CORSMiddleware

    return [
        Middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id"],
            max_age=600,
        )
    ]


def _check_positive(name: str, value: object, *, zero: bool = False) -> None:
    lowest = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise InvalidParameterError(name, value, f"an integer >= {lowest}")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    # A 405 carries Starlette's Allow header (the methods the route takes), as HTTP requires.
    return _error_response(APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Reached only by a bug: say so without the stack (which the server logs).
    get_logger().exception("serve.internal_error", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
    return _error_response(APIError(500, "internal server error; the server's log has the details"))


@final
@dataclass(slots=True)
class _Job:
    """An admitted generation request, ready to run."""

    request: GenerationRequest
    #: What the model runs, one prepared request per choice.
    prepared: list[PreparedRequest]
    arrived: float
    ticket: Ticket
    label: str
    #: The model name the answer carries.
    served: str
    #: Responses: the conversation so far (earlier turns and this input), kept with the answer when stored.
    conversation: list[dict[str, Any]] | None = None

    @property
    def prompts(self) -> list[tuple[int, ...]]:
        """Prompt ids, one per choice."""
        return [prepared.prompt_ids for prepared in self.prepared]

    @property
    def params(self) -> SamplingParams:
        """The sampling parameters (of the first choice: the others differ in their seed alone)."""
        return self.prepared[0].params

    @property
    def tool_format(self) -> ToolFormat | None:
        """The tool-call format the output is parsed with (``None``: no tools in play)."""
        return self.prepared[0].tool_format


@final
class _Server:
    """The routes' shared state: the model, the limits, the slots and the metrics."""

    def __init__(
        self,
        model: Model,
        *,
        model_name: str,
        api_key: str | None,
        max_concurrency: int,
        max_queue: int,
        max_body_bytes: int,
        max_prompt_tokens: int | None,
        request_timeout: float | None,
        body_timeout: float,
        write_timeout: float,
        strict_requests: bool,
        names: tuple[str, ...],
        any_model_name: bool,
        max_kv_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.model_name = model_name
        #: Names requests may give the model: the name first, then the aliases.
        self.names = names
        self.any_model_name = any_model_name
        self._key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes
        self.max_prompt_tokens = max_prompt_tokens
        self.request_timeout = request_timeout
        self.body_timeout = body_timeout
        self.write_timeout = write_timeout
        self.strict_requests = strict_requests
        # A prompt over this many bytes cannot fit the token limit: refused before tokenizing.
        self.max_prompt_bytes = model.max_prompt_bytes
        if max_prompt_tokens is not None:
            per_token = model.max_prompt_bytes // model.context_length  # the model's own bytes-per-token bound
            self.max_prompt_bytes = min(self.max_prompt_bytes, max_prompt_tokens * per_token)
        self._prepare_limiter = anyio.CapacityLimiter(PREPARE_THREADS)
        self._ignored_names: set[str] = set()
        self.metrics = ServerMetrics(lambda: model.active_requests)
        self.admission = Admission(max_concurrency, max_queue, self.metrics, max_kv_bytes)
        self.metrics.kv_bytes_per_token.set_function(lambda: model.kv_bytes_per_token)
        self.metrics.prefix_cache(lambda: model.prefix_cache_stats)
        if max_kv_bytes is not None:
            self.metrics.kv_budget(max_kv_bytes)
            model.kv_bytes_per_token  # noqa: B018 (measured now, not in the event loop at the first request)
        self.created = int(time.time())
        self.log = get_logger()
        #: Conversations of stored Responses, for previous_response_id.
        self.conversations = ConversationStore()
        #: OpenAI's system_fingerprint: changes when the software, backend or model served changes.
        self.fingerprint = (
            "fp_"
            + hashlib.sha256(f"{infer_version}|{model.backend}|{model.dtype}|{model_name}".encode()).hexdigest()[:12]
        )

    # -- plain routes -----------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        """``GET /v1/models``: the one model served."""
        return self._guarded(
            request, "/v1/models", lambda: {"object": "list", "data": [self._model_card(n) for n in self.names]}
        )

    async def get_model(self, request: Request) -> Response:
        """``GET /v1/models/{id}``: the model, or 404."""

        def card() -> dict[str, Any]:
            wanted = request.path_params["model_id"]
            return self._model_card(self.served_name(wanted))

        return self._guarded(request, "/v1/models/{model_id}", card)

    def _guarded(self, request: Request, label: str, body: Any) -> Response:
        # `label` is the route's template: metric labels from raw paths would grow without bound.
        try:
            self._authorize(request)
            content = body()
        except APIError as err:
            self.metrics.count(label, err.status)
            return _error_response(err)
        self.metrics.count(label, 200)
        return JSONResponse(content)

    def _model_card(self, name: str) -> dict[str, Any]:
        # OpenAI's four fields, then what local clients read: vLLM's max_model_len, and ours.
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "infer",
            "root": self.model_name,
            "context_length": self.model.context_length,
            "max_model_len": self.model.context_length,
            "backend": self.model.backend,
            "dtype": self.model.dtype,
        }

    def served_name(self, name: str) -> str:
        """The name answers carry for a request naming ``name``; 404 for a name not served."""
        if name in self.names:
            return name
        if self.any_model_name:
            return self.model_name
        served = ", ".join(repr(n) for n in self.names)
        raise APIError(
            404,
            f"the model {name!r} does not exist here; this server serves {served}",
            param="model",
            code="model_not_found",
        )

    async def tokenize(self, request: Request) -> Response:
        """``POST /tokenize`` (vLLM's): the token ids of a text or of chat messages, and their count."""

        def run(data: dict[str, Any]) -> dict[str, Any]:
            parsed = parse_tokenize(data)
            if parsed.model is not None:
                self.served_name(parsed.model)
            model = self.model
            try:
                if parsed.messages is not None:
                    ids = model.chat_ids(
                        parsed.messages,
                        timeout=self.request_timeout,
                        max_bytes=self.max_prompt_bytes,
                        add_generation_prompt=parsed.add_generation_prompt,
                        **parsed.template_kwargs,
                    )
                else:
                    assert parsed.prompt is not None
                    model.check_prompt_bytes(parsed.prompt, max_bytes=self.max_prompt_bytes)
                    ids = model.encode(parsed.prompt, add_special_tokens=parsed.add_special_tokens)
            except InferError as exc:
                raise from_infer_error(exc) from None
            return {"count": len(ids), "max_model_len": model.context_length, "tokens": ids}

        return await self._json_route(request, "/tokenize", run)

    async def detokenize(self, request: Request) -> Response:
        """``POST /detokenize`` (vLLM's): the text of token ids."""

        def run(data: dict[str, Any]) -> dict[str, Any]:
            name, tokens = parse_detokenize(data)
            if name is not None:
                self.served_name(name)
            bad = [t for t in tokens if not 0 <= t < self.model.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"token id {bad[0]} is outside the vocabulary [0, {self.model.vocab_size})",
                    param="tokens",
                    code="invalid_value",
                )
            return {"prompt": self.model.decode(tokens)}

        return await self._json_route(request, "/detokenize", run)

    async def tokenizer_info(self, request: Request) -> Response:
        """``GET /tokenizer_info`` (vLLM's): special tokens, chat template and context length.

        With ``/tokenize`` and ``/detokenize`` it lets a client tokenize as the server does
        without the tokenizer files (lm-evaluation-harness's remote tokenizer reads it).
        """

        def info() -> dict[str, Any]:
            model = self.model
            eos = min(model.eos_token_ids, default=None)
            return {
                "eos_token": None if eos is None else model.tokenizer.id_to_token(eos),
                "bos_token": None,
                "pad_token": None,
                "chat_template": model.chat_template,
                "model_max_length": model.context_length,
            }

        return self._guarded(request, "/tokenizer_info", info)

    async def _json_route(self, request: Request, label: str, run: Any) -> Response:
        """A JSON-in, JSON-out route: key, content type and body checked; ``run(data)`` in a worker thread."""
        try:
            self._authorize(request)
            _require_json(request)
            data = parse_json(await self._read_body(request))
            content = await anyio.to_thread.run_sync(run, data, limiter=self._prepare_limiter, abandon_on_cancel=True)
        except APIError as err:
            self.metrics.count(label, err.status)
            return _error_response(err)
        self.metrics.count(label, 200)
        return JSONResponse(content)

    async def health(self, request: Request) -> Response:
        """``GET /health``: liveness plus the load figures (no key needed; no paths, no secrets)."""
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model_name,
                "backend": self.model.backend,
                "running": self.admission.running,
                "queued": self.admission.waiting,
                "active_sequences": self.model.active_requests,
            }
        )

    async def metrics_page(self, request: Request) -> Response:
        """``GET /metrics``: Prometheus exposition (no key needed)."""
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # -- generation -------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        return await self._generation(request, "completions")

    async def responses(self, request: Request) -> Response:
        """``POST /v1/responses`` (OpenAI's Responses API: text, function tools, structured output)."""
        return await self._generation(request, "responses")

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        return await self._generation(request, "chat")

    async def _generation(self, request: Request, endpoint: str) -> Response:
        arrived = time.perf_counter()
        label = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}[
            endpoint
        ]
        parse = {"chat": parse_chat, "completions": parse_completion, "responses": parse_responses}[endpoint]
        try:
            self._authorize(request)
            _require_json(request)
            data = parse_json(await self._read_body(request))
            strict = self.strict_requests
            parsed = parse(data, strict=strict)
            if parsed.ignored:
                self._warn_ignored(label, parsed.ignored)
            served = self.served_name(parsed.model)
            conversation = None
            if parsed.endpoint == "responses":
                parsed, conversation = self._conversation(parsed)
            left = None if self.request_timeout is None else self.request_timeout - (time.perf_counter() - arrived)
            prepared = await anyio.to_thread.run_sync(
                self._prepare, parsed, left, limiter=self._prepare_limiter, abandon_on_cancel=True
            )
            prepared = [request for request in prepared for _ in range(parsed.n)]  # choice i*n + j: prompt i's j-th
            ticket = self.admission.admit(sum(self._kv_bytes(request) for request in prepared))
        except APIError as err:
            self.metrics.count(label, err.status)
            return _error_response(err)
        if parsed.user is not None:
            self.log.info("serve.request", endpoint=label, user=parsed.user)
        return _GenerationResponse(self, _Job(parsed, prepared, arrived, ticket, label, served, conversation))

    def _conversation(self, parsed: GenerationRequest) -> tuple[GenerationRequest, list[dict[str, Any]]]:
        """A Responses request's messages: instructions, the stored turns it continues, its input."""
        history: list[dict[str, Any]] = []
        if parsed.previous_response_id is not None:
            found = self.conversations.get(parsed.previous_response_id)
            if found is None:
                raise APIError(
                    404,
                    f"previous response {parsed.previous_response_id[:80]!r} is not kept here: it was not stored, "
                    f"or was forgotten (this server keeps the last {self.conversations.capacity} in memory)",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = found
        conversation = [*history, *(parsed.messages or ())]
        system = [{"role": "system", "content": parsed.instructions}] if parsed.instructions else []
        return replace(parsed, messages=[*system, *conversation]), conversation

    def _kv_bytes(self, request: PreparedRequest) -> int:
        """KV cache bytes the request's sequence will hold: its capacity, as the engine sizes it."""
        if self.admission.kv_budget_bytes is None:
            return 0
        return int((len(request.prompt_ids) + request.max_new_tokens) * self.model.kv_bytes_per_token)

    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        # Constant time, so the key cannot be guessed byte by byte from response times.
        if not hmac.compare_digest(given.strip().encode(), self._key):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def _warn_ignored(self, label: str, names: tuple[str, ...]) -> None:
        new = [n for n in names if n not in self._ignored_names][:8]
        if not new or len(self._ignored_names) >= _MAX_IGNORED_NAMES:
            return  # each name is reported once; the set is bounded so a scanner cannot flood the log
        self._ignored_names.update(new)
        self.log.warning(
            "serve.ignored_fields",
            endpoint=label,
            fields=[n[:40] for n in new],
            hint="unknown request fields are ignored; start the server with --strict-requests to refuse them",
        )

    async def _read_body(self, request: Request) -> bytes:
        try:
            with anyio.fail_after(self.body_timeout):
                return await self._read_body_unbounded(request)
        except TimeoutError:
            raise APIError(
                408, f"the request body did not arrive within {self.body_timeout:g} s", code="request_timeout"
            ) from None

    async def _read_body_unbounded(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        too_big = APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, f"invalid Content-Length header {declared[:40]!r}", code="invalid_request")
            if int(declared) > limit:
                raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # the body may be chunked, or longer than it declared
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _prepare(self, parsed: GenerationRequest, left: float | None) -> list[PreparedRequest]:
        """The model's prepared requests, one per prompt (in a worker thread).

        :meth:`infer.Model.prepare` checks the sampling, plans tools, compiles the output
        constraint and tokenizes (after a byte-length check against the server's limit); ``left``,
        the seconds before the request's deadline, bounds the template's render. Here: the
        server's own limits, and its words for the core's errors about the prompt.
        """
        if left is not None and left <= 0:
            raise self.deadline_error("before its prompt was read")
        options: dict[str, Any] = {**parsed.sampling, **parsed.engine_options}
        options["max_prompt_bytes"] = self.max_prompt_bytes
        if parsed.tools is not None or parsed.tool_choice is not None:
            options |= {"tools": parsed.tools, "tool_choice": parsed.tool_choice}
        if parsed.response_format is not None:
            options["response_format"] = parsed.response_format
        if parsed.template_kwargs:
            options["chat_template_kwargs"] = parsed.template_kwargs
        prepared: list[PreparedRequest] = []
        try:
            if parsed.messages is not None:
                prepared.append(self.model.prepare(messages=parsed.messages, timeout=left, **options))
            for prompt in parsed.prompts:
                if prepared:  # the sampling is the first prompt's, checked and compiled once
                    options = {"params": prepared[0].params, "max_prompt_bytes": self.max_prompt_bytes}
                    options |= parsed.engine_options
                prepared.append(self.model.prepare(self._fim(prompt, parsed.suffix), timeout=left, **options))
        except InferError as exc:
            raise self._prompt_error(exc, parsed) from None
        for request in prepared:
            error = self._length_error(parsed, len(request.prompt_ids))
            if error is not None:
                raise error
        return prepared

    def _fim(self, prompt: str | list[int], suffix: str | None) -> str | list[int]:
        """The prompt, or with a ``suffix`` the fill-in-the-middle ids of both."""
        if suffix is None:
            return prompt
        model = self.model
        if isinstance(prompt, str):
            model.check_prompt_bytes(prompt + suffix, max_bytes=self.max_prompt_bytes)
        prefix_id, suffix_id, middle_id = self.fim_ids()
        head = model.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        # Prefix-suffix-middle order, as StarCoder-style and Qwen coder models are trained.
        return [prefix_id, *head, suffix_id, *model.encode(suffix, add_special_tokens=False), middle_id]

    def fim_ids(self) -> tuple[int, int, int]:
        """The tokenizer's fill-in-the-middle tokens (prefix, suffix, middle), or a 400 saying there are none."""
        find = self.model.tokenizer.backend.token_to_id
        for names in _FIM_TOKENS:
            prefix, suffix, middle = (find(name) for name in names)
            if prefix is not None and suffix is not None and middle is not None:
                return prefix, suffix, middle
        raise APIError(
            400,
            "suffix needs a model trained for fill-in-the-middle; this model's tokenizer has no FIM tokens "
            f"(looked for {', '.join(n[0] for n in _FIM_TOKENS)})",
            param="suffix",
            code="unsupported_parameter",
        )

    def _prompt_error(self, exc: InferError, parsed: GenerationRequest) -> APIError:
        """The answer to a core error; the server's own words for a prompt empty, too long or off the vocabulary."""
        field = parsed.prompt_field
        if isinstance(exc, EmptyPromptError):
            return APIError(400, f"{field} has no tokens; give non-empty text", param=field, code="invalid_value")
        if isinstance(exc, InvalidTokenError):
            return APIError(
                400,
                f"token id {exc.token_id} is outside the vocabulary [0, {exc.vocab_size})",
                param=field,
                code="invalid_value",
            )
        if isinstance(exc, ContextLengthError) and not isinstance(exc, PromptTooLongError):
            error = self._length_error(parsed, exc.prompt_tokens)
            if error is not None:
                return error
        return from_infer_error(exc, params=parsed.error_names)

    def _length_error(self, parsed: GenerationRequest, prompt_tokens: int) -> APIError | None:
        """The 400 of a prompt over the server's limit or the model's context, or of a max_tokens that does not fit."""
        model = self.model
        field = parsed.prompt_field
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            return APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; this server accepts at most {self.max_prompt_tokens}",
                param=field,
                code="context_length_exceeded",
            )
        room = model.context_length - prompt_tokens
        if room < 1:
            return APIError(
                400,
                f"the prompt has {prompt_tokens} tokens and leaves no room in the model's context of "
                f"{model.context_length} tokens; shorten it",
                param=field,
                code="context_length_exceeded",
            )
        if parsed.max_tokens is not None and parsed.max_tokens > room:
            # The core cuts max_tokens to the room left; OpenAI's API refuses it instead.
            name = parsed.error_names.get("max_tokens", "max_tokens")
            return APIError(
                400,
                f"{name}={parsed.max_tokens} does not fit: the prompt has {prompt_tokens} tokens, so at most {room} "
                f"more fit in the model's context of {model.context_length}",
                param=name,
                code="context_length_exceeded",
            )
        return None

    def remaining(self, job: _Job) -> float | None:
        """Seconds left before the job's deadline (``None``: no deadline)."""
        if self.request_timeout is None:
            return None
        return job.arrived + self.request_timeout - time.perf_counter()

    def deadline_error(self, where: str) -> APIError:
        """The 504 of a request that ran out of time ``where``."""
        return APIError(
            504,
            f"the request exceeded the server's timeout of {self.request_timeout:g} s {where}",
            code="deadline_exceeded",
        )


class _ClientGone(Exception):
    """Sending failed: the client closed the connection."""


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


@final
class _GenerationResponse(Response):
    """Runs an admitted job and answers with JSON or an event stream; cancels it if the client leaves."""

    def __init__(self, server: _Server, job: _Job) -> None:
        super().__init__(status_code=200)
        self.server = server
        self.job = job
        #: Outcome status for the metrics: the HTTP status, or what a failed stream's error maps to.
        self.outcome = 200
        self.started = False
        self.formatter = Formatter(
            job.request.endpoint,
            id={"chat": "chatcmpl-", "completions": "cmpl-", "responses": "resp_"}[job.request.endpoint]
            + uuid.uuid4().hex,
            created=int(time.time()),
            model=job.served,
            token_text=lambda token: server.model.decode([token]),
            token_bytes=server.model.tokenizer.token_bytes,
            system_fingerprint=server.fingerprint,
            n=job.request.n,
        )
        #: Holds back streamed text that may be a tool call (``None``: no tools in play).
        fmt = job.tool_format
        #: Per choice: holds back streamed text that may be a tool call (``None``: no tools in play).
        self.holders = [None if fmt is None else ToolCallHolder(fmt) for _ in job.prompts]
        self.responses = ResponsesFormatter(job.request, self.formatter.id, self.formatter.created, job.served)
        self._last_token = 0.0
        #: The server cancelled this response (shutdown past its grace period).
        self.shutting_down = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        run = asyncio.ensure_future(self._run(send))
        watch = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait((run, watch), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Shutdown past the grace period: `run` ends the response with an error (an event
            # and the terminator, once a stream has begun) and this call returns normally, so
            # the client learns why and the server prints no traceback for a planned stop.
            self.shutting_down = True
        finally:
            finished = run.done() and not run.cancelled()
            for task in (run, watch):
                task.cancel()
            ending = asyncio.gather(run, watch, return_exceptions=True)
            while not ending.done():
                try:
                    await asyncio.shield(ending)
                except asyncio.CancelledError:
                    # Cancelled again (the event loop is closing): the error event is still on
                    # its way out; asyncio.run waits for this task, so let it finish sending.
                    self.shutting_down = True
            if not finished and not self.shutting_down:
                self.outcome = 499
            self.job.ticket.release()
            self.server.metrics.count(self.job.label, self.outcome)

    async def _run(self, send: Send) -> None:
        server, job = self.server, self.job
        streams: list[AsyncTokenStream] = []
        try:
            try:
                await job.ticket.acquire(server.remaining(job))
            except (asyncio.TimeoutError, TimeoutError):
                raise server.deadline_error("while queued for a slot") from None
            left = server.remaining(job)
            if left is not None and left <= 0:
                raise server.deadline_error("while queued for a slot")
            if job.request.max_tokens != 0:  # 0: echo alone, nothing generated
                # All prompts at once: the model's scheduler batches their steps; a prompt's n
                # choices share its prefill (the others fork the first one's cache).
                n = job.request.n
                for i in range(0, len(job.prepared), n):
                    streams += server.model.astream_choices([self._choice(k, left) for k in range(i, i + n)])
            server.metrics.prompt_tokens.inc(sum(len(ids) for ids in job.prompts[:: job.request.n]))
            echoes = await self._echoes(left)
            if job.request.stream:
                await self._stream(streams, echoes, send)
            else:
                await self._whole(streams, echoes, send)
        except _ClientGone:
            self.outcome = 499
        except asyncio.CancelledError:
            if not self.shutting_down:
                raise  # the client went away: nobody to tell
            await self._fail(send, shutdown_error())
        except APIError as err:
            await self._fail(send, err)
        except DeadlineExceededError:
            # The stream's own timeout is what was left of the server's: quote the server's.
            await self._fail(send, server.deadline_error("while generating"))
        except InferError as exc:
            await self._fail(send, from_infer_error(exc, params=job.request.error_names))
        except Exception as exc:
            server.log.exception("serve.internal_error", path=job.label, error=f"{type(exc).__name__}: {exc}")
            await self._fail(send, APIError(500, "internal server error; the server's log has the details"))
        finally:
            for stream in streams:
                await stream.aclose()  # a no-op when it finished; otherwise the request leaves the batch
            job.ticket.release()

    def _choice(self, k: int, left: float | None) -> PreparedRequest:
        """Choice ``k``, to end within ``left`` seconds.

        A seeded prompt's n choices take seeds seed, seed+1... (distinct, reproducible).
        """
        prepared, j = self.job.prepared[k], k % self.job.request.n
        params = prepared.params
        if j and params.seed is not None:
            params = replace(params, seed=(params.seed + j) % 2**64)
        return replace(prepared, params=params, timeout=left)

    async def _echoes(self, left: float | None) -> list[Echo | None]:
        """Each prompt to echo (``None`` each without ``echo``), scored when logprobs are asked for.

        Scoring feeds the prompt through the model one token per step
        (:func:`infer.evaluate.prompt_logprobs`), in a worker thread, within the deadline.
        """
        job, model = self.job, self.server.model
        if not job.request.echo:
            return [None] * len(job.prompts)
        echoes: list[Echo | None] = []
        for k, ids in enumerate(job.prompts):
            given = job.request.prompts[k // job.request.n]
            text = given if isinstance(given, str) else model.decode(ids)
            events: tuple[TokenEvent, ...] = ()
            if job.params.logprobs:
                try:
                    with anyio.fail_after(left):
                        events = tuple(
                            await anyio.to_thread.run_sync(
                                prompt_logprobs, model, ids, job.params.top_logprobs, abandon_on_cancel=True
                            )
                        )
                except TimeoutError:
                    raise self.server.deadline_error("while scoring the prompt") from None
            echoes.append(Echo(text, events))
        return echoes

    # -- sending ----------------------------------------------------------------------------

    async def _send(self, send: Send, message: Message) -> None:
        try:
            # A client that stops reading leaves the write blocked on flow control: past the
            # write timeout it counts as gone, so it cannot hold its slot forever.
            with anyio.fail_after(self.server.write_timeout):
                await send(message)
        except OSError as exc:  # ASGI 2.4 servers raise this once the client has gone
            raise _ClientGone from exc
        except TimeoutError:
            raise _ClientGone from None

    async def _send_json(self, send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await self._send(send, {"type": "http.response.start", "status": status, "headers": raw})
        self.started = True
        await self._send(send, {"type": "http.response.body", "body": body, "more_body": False})

    async def _event(self, send: Send, payload: dict[str, Any] | str, *, last: bool = False) -> None:
        await self._send(send, {"type": "http.response.body", "body": sse(payload), "more_body": not last})

    async def _fail(self, send: Send, err: APIError) -> None:
        self.outcome = err.status
        try:
            if not self.started:
                await self._send_json(send, err.status, err.encode(), err.headers)
            else:  # the stream has begun with 200: the error travels as an event, then the stream ends
                await self._event(send, err.body())
                await self._event(send, "[DONE]", last=True)
        except _ClientGone:
            self.outcome = 499

    # -- the two response kinds -------------------------------------------------------------

    def _tick(self, event: TokenEvent) -> None:
        now = time.perf_counter()
        metrics = self.server.metrics
        if event.index == 0:
            metrics.time_to_first_token.observe(now - self.job.arrived)
        else:
            metrics.time_per_output_token.observe(now - self._last_token)
        self._last_token = now
        metrics.completion_tokens.inc()

    async def _whole(self, streams: list[AsyncTokenStream], echoes: list[Echo | None], send: Send) -> None:
        async def run(stream: AsyncTokenStream) -> Completion:
            async for event in stream:
                self._tick(event)
            return _finished(stream)

        job = self.job
        completions = list(await asyncio.gather(*map(run, streams))) if streams else self._nothing_generated()
        if job.request.endpoint == "chat":
            body = self.formatter.chat([with_tool_calls(c, job.tool_format) for c in completions])
        elif job.request.endpoint == "responses":
            completion = with_tool_calls(completions[0], job.tool_format)
            body = self.responses.response(completion)
            self._keep(completion)
        else:
            body = self.formatter.completions(completions, echoes, with_logprobs=job.params.logprobs)
        await self._send_json(send, 200, _json_bytes(body), {})

    def _nothing_generated(self) -> list[Completion]:
        """The completions of ``max_tokens: 0`` (echo only): no tokens, finish reason ``length``."""
        return [
            Completion(f"echo-{i}", "", (), "length", Usage(len(ids), 0), Timings(0.0, 0.0, 0.0, 0.0))
            for i, ids in enumerate(self.job.prompts)
        ]

    async def _token(self, send: Send, index: int, event: TokenEvent, with_logprobs: bool) -> None:
        self._tick(event)
        holder = self.holders[index]
        if holder is not None:
            # Tools in play: text that may be a call waits for the end (see ToolCallHolder).
            event = replace(event, text=holder.feed(event.text))
        if event.text or with_logprobs:  # "" = held back (a partial character, a possible stop string)
            await self._event(send, self.formatter.delta([event], with_logprobs=with_logprobs, index=index))

    async def _held_calls(self, send: Send, index: int, completion: Completion) -> Completion:
        """Send what choice ``index``'s tool-call holder kept back; the completion with its calls split out."""
        holder = self.holders[index]
        if holder is None:
            return completion
        content, calls = holder.finish()
        if content:
            await self._event(send, self.formatter.content_delta(content, index))
        if not calls:
            return completion
        await self._event(send, self.formatter.tool_call_deltas(calls, index))
        return replace(completion, tool_calls=tuple(calls), finish_reason="tool_calls")

    def _keep(self, completion: Completion) -> None:
        """Store a Responses conversation with its answer, unless the request said ``store: false``."""
        job = self.job
        if job.conversation is not None and job.request.store:
            answer: dict[str, Any] = {"role": "assistant", "content": completion.text}
            if completion.tool_calls:
                answer["tool_calls"] = [call.as_openai() for call in completion.tool_calls]
            self.server.conversations.put(self.formatter.id, [*job.conversation, answer])

    async def _stream_response(self, stream: AsyncTokenStream, send: Send) -> None:
        """A Responses stream: its typed events (no ``[DONE]``: the completed event ends it)."""
        fmt = self.responses
        first = await anext(aiter(stream), None)  # errors before the first token get their status
        await self._send(send, {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        self.started = True
        holder = self.holders[0]  # tools in play: text that may be a call waits (see ToolCallHolder)
        for payload in [*fmt.opening(), *(fmt.open_message() if holder is None else ())]:
            await self._send_event(send, payload)
        events = [] if first is None else [first]
        sent: list[str] = []
        async for item in _chain(events, stream):
            self._tick(item)
            text = item.text if holder is None else holder.feed(item.text)
            if text:
                await self._send_text(send, text, sent)
        completion = _finished(stream)
        if holder is not None:
            rest, calls = holder.finish()
            if rest:
                await self._send_text(send, rest, sent)
            if calls:
                completion = replace(
                    completion, text="".join(sent), tool_calls=tuple(calls), finish_reason="tool_calls"
                )
        self._keep(completion)
        closing = list(fmt.closing(completion))
        for payload in closing[:-1]:
            await self._send_event(send, payload)
        await self._send_event(send, closing[-1], last=True)

    async def _send_text(self, send: Send, text: str, sent: list[str]) -> None:
        """A piece of a Responses stream's text (its message item opened first if need be), noted in ``sent``."""
        for payload in [*self.responses.open_message(), self.responses.delta(text)]:
            await self._send_event(send, payload)
        sent.append(text)

    async def _send_event(self, send: Send, payload: dict[str, Any], *, last: bool = False) -> None:
        await self._send(send, {"type": "http.response.body", "body": responses_event(payload), "more_body": not last})

    async def _stream(self, streams: list[AsyncTokenStream], echoes: list[Echo | None], send: Send) -> None:
        if self.job.request.endpoint == "responses":
            await self._stream_response(streams[0], send)
            return
        fmt = self.formatter
        with_logprobs = self.job.params.logprobs
        merged = _merge(streams)
        try:
            # Wait for the first token before answering 200: an error until then gets its real status.
            first = await anext(merged, None)
            await self._send(send, {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            self.started = True
            for index in range(len(self.job.prompts)):
                opening = fmt.opening(index)
                if opening is not None:
                    await self._event(send, opening)
            for index, echo in enumerate(echoes):
                if echo is not None:
                    await self._event(send, fmt.echo_delta(echo, with_logprobs=with_logprobs, index=index))
            if first is not None:
                await self._token(send, *first, with_logprobs)
            async for index, event in merged:
                await self._token(send, index, event, with_logprobs)
        finally:
            await merged.aclose()
        completions = [_finished(s) for s in streams] if streams else self._nothing_generated()
        if self.job.request.endpoint == "chat":
            completions = [await self._held_calls(send, i, c) for i, c in enumerate(completions)]
        for index, completion in enumerate(completions):
            await self._event(send, fmt.closing(completion, index))
        if self.job.request.include_usage:
            await self._event(send, fmt.usage_chunk(fmt.total(completions)))
        await self._event(send, "[DONE]", last=True)


async def _chain(first: list[TokenEvent], rest: AsyncTokenStream) -> AsyncGenerator[TokenEvent]:
    for item in first:
        yield item
    async for item in rest:
        yield item


async def _merge(streams: list[AsyncTokenStream]) -> AsyncGenerator[tuple[int, TokenEvent]]:
    """Events of all ``streams`` as they come, tagged with their stream's index; errors pass through."""
    if len(streams) == 1:  # the usual case: no tasks, no queue
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncTokenStream) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it as it is
            await queue.put((index, exc))
            return
        await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _require_json(request: Request) -> None:
    # Browsers send text/plain or form bodies cross-site without asking (no CORS preflight);
    # insisting on JSON keeps a web page from driving a local server through its visitors.
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        shown = kind[:60] or "none"
        raise APIError(
            415,
            f"the request body must be JSON sent as 'Content-Type: application/json' (got {shown})",
            code="unsupported_media_type",
        )


def _finished(stream: AsyncTokenStream) -> Completion:
    if stream.completion is None:  # only a cancelled stream ends without one, and then nobody listens
        raise APIError(499, "the request was cancelled", code="cancelled")
    return stream.completion


def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
