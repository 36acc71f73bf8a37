"""``infer serve`` on Ray Serve: model replicas behind one ingress (the ``ray`` extra).

Two deployments make the application::

    client -> Ray's HTTP proxy -> InferIngress (reads the body, keys the conversation)
                                      |  DeploymentHandle[Any], PrefixAffinityRouter
                                      v
                                  InferReplica x N (loads the model once; runs create_app's app)

Each ``InferReplica`` runs the very Starlette app ``infer serve`` runs (:func:`create_app`),
so routes, errors, limits and streaming are the same code. The ingress is thin: Ray's proxy
gives a deployment's router only the request's headers, so the ingress reads the body, keys
it (:func:`infer.serve.routing.prefix_key`) for the prefix-aware router, and relays the
replica's ASGI messages back. It also turns a replica's death into a clean answer: 503 before
the response began, an error event and ``[DONE]`` after it, so no client hangs while Ray
restarts the replica and the other replicas keep serving. A client that goes away cancels the
call, which the replica's app sees as a disconnect (the request leaves the model's batch).

Build it with :func:`build_app` (the ``serve run`` / config-file builder:
``import_path: infer.serve.ray:build_app``) or run it with ``infer serve MODEL --replicas N``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, final

import anyio
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import Message

from infer.errors import InvalidParameterError
from infer.log import bind_process_fields, get_logger
from infer.serve.errors import APIError
from infer.serve.formats import sse
from infer.serve.routing import ForwardedRequest, portable_scope, prefix_key

__all__ = ["REPLICA_HEADER", "RayServeArgs", "build_app"]

#: Response header naming the replica that answered (routing is observable, and testable).
REPLICA_HEADER = "x-infer-replica"
#: The application's name in Ray Serve (``serve status``, ``serve delete infer``).
APP_NAME = "infer"
_ROUTER = "infer.serve.routing:PrefixAffinityRouter"
_DONE = object()


@final
@dataclass(frozen=True, slots=True)
class RayServeArgs:
    """The builder's arguments (a config file's ``args``, ``serve run``'s ``key=value``).

    ``model`` to ``options`` are those of :func:`infer.load`; ``app`` holds
    :func:`~infer.serve.create_app`'s keyword arguments (``max_concurrency``, ``api_key``, ...),
    checked by ``create_app`` on each replica. Either ``replicas`` fixes the count, or
    ``min_replicas``/``max_replicas``/``target_ongoing_requests`` autoscale it.
    """

    #: Model reference; a path must exist at the same place on every node.
    model: str
    #: Name clients send in ``"model"``; the model reference when not given.
    name: str | None = None
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    #: Backend load options (``-o KEY=VALUE``).
    options: Mapping[str, Any] = field(default_factory=dict)
    #: ``create_app`` keyword arguments.
    app: Mapping[str, Any] = field(default_factory=dict)
    #: A fixed number of replicas (default 1 when no autoscaling bound is given).
    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    #: Ongoing requests per replica the autoscaler aims at (default: the app's max_concurrency).
    target_ongoing_requests: float | None = None
    #: CPUs and GPUs Ray reserves for each replica.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: Route by conversation prefix (else Ray's default power-of-two-choices router).
    prefix_routing: bool = True
    #: Seconds a stopping replica gives its in-flight requests.
    grace: float = 30.0

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> RayServeArgs:
        """Validate ``args``; a bad or unknown one raises :class:`InvalidParameterError` naming it."""
        known = {f.name for f in fields(cls)}
        for key in args:
            if key not in known:
                raise InvalidParameterError(key, args[key], f"one of the application's arguments {sorted(known)}")
        if not isinstance(args.get("model"), str) or not args["model"]:
            raise InvalidParameterError("model", args.get("model"), "a model reference (a path or a name)")
        for name in ("options", "app"):
            if not isinstance(args.get(name, {}), Mapping):
                raise InvalidParameterError(name, args[name], "a mapping of keyword arguments")
        parsed = cls(**args)
        for name in ("replicas", "min_replicas", "max_replicas"):
            value = getattr(parsed, name)
            lowest = 0 if name == "min_replicas" else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lowest):
                raise InvalidParameterError(name, value, f"an integer >= {lowest}")
        if parsed.replicas is not None and (parsed.min_replicas is not None or parsed.max_replicas is not None):
            raise InvalidParameterError(
                "replicas", parsed.replicas, "left out when min_replicas/max_replicas autoscale the count"
            )
        lo, hi = parsed.bounds()
        if parsed.autoscaling and lo > hi:
            raise InvalidParameterError("max_replicas", hi, f"at least min_replicas ({lo})")
        for name in ("max_concurrency", "max_queue", "max_body_bytes"):  # read here too, before a replica exists
            value = parsed.app.get(name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_queue" else 1):
                raise InvalidParameterError(f"app.{name}", value, "a positive integer (max_queue may be 0)")
        for name in ("num_cpus", "num_gpus", "target_ongoing_requests", "grace"):
            value = getattr(parsed, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise InvalidParameterError(name, value, "a number >= 0")
        return parsed

    @property
    def autoscaling(self) -> bool:
        """Whether the replica count follows the load."""
        return any(v is not None for v in (self.min_replicas, self.max_replicas, self.target_ongoing_requests))

    def bounds(self) -> tuple[int, int]:
        """The fewest and most replicas (equal when the count is fixed)."""
        if not self.autoscaling:
            return self.replicas or 1, self.replicas or 1
        lo = 1 if self.min_replicas is None else self.min_replicas
        return lo, self.max_replicas or max(lo, 1)

    def slots(self) -> int:
        """Requests one replica's app admits at once (running plus queued) before answering 429."""
        from infer.serve.app import DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_QUEUE

        return int(self.app.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)) + int(
            self.app.get("max_queue", DEFAULT_MAX_QUEUE)
        )

    def replica_options(self) -> dict[str, Any]:
        """``InferReplica``'s deployment options."""
        from infer.serve.app import DEFAULT_MAX_CONCURRENCY

        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        options: dict[str, Any] = {
            "ray_actor_options": actor,
            # The app queues and answers 429 itself; Ray needs to see that load to route by it.
            "max_ongoing_requests": self.slots(),
            "graceful_shutdown_timeout_s": self.grace,
        }
        lo, hi = self.bounds()
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": lo,
                "max_replicas": hi,
                "target_ongoing_requests": self.target_ongoing_requests
                or self.app.get("max_concurrency", DEFAULT_MAX_CONCURRENCY),
            }
        else:
            options["num_replicas"] = hi
        if self.prefix_routing:
            options["request_router_config"] = {"request_router_class": _ROUTER}
        return options


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """The Ray Serve application for ``args`` (see :class:`RayServeArgs`); Ray's builder entry point."""
    parsed = RayServeArgs.parse(args)
    model = parsed.model
    if os.path.exists(model):  # replicas run in other working directories
        model = os.path.abspath(model)
        parsed = RayServeArgs.parse({**_as_dict(parsed), "model": model})
    replicas = InferReplica.options(**parsed.replica_options()).bind(parsed)
    from infer.serve.app import DEFAULT_MAX_BODY_BYTES
    from infer.serve.defaults import DEFAULT_BODY_TIMEOUT

    ingress = InferIngress.options(
        # Every request passes through; it only relays, so it reserves no CPU of its own.
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=parsed.slots() * parsed.bounds()[1],
        graceful_shutdown_timeout_s=parsed.grace,
    )
    return ingress.bind(
        replicas,
        max_body_bytes=int(parsed.app.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
        body_timeout=float(parsed.app.get("body_timeout", DEFAULT_BODY_TIMEOUT)),
        prefix_routing=parsed.prefix_routing,
    )


def _as_dict(args: RayServeArgs) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(args)}


# -- the model replica ---------------------------------------------------------------------------


class _Replica:
    """One model replica: loads the model once and runs ``infer serve``'s app on forwarded requests."""

    def __init__(self, args: RayServeArgs) -> None:
        import infer
        from infer.serve.app import create_app
        from infer.serve.cli import public_model_name

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        bind_process_fields(replica=self.replica_id)
        self.log = get_logger()
        self.model = infer.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype, **args.options)
        self.app = create_app(self.model, model_name=args.name or public_model_name(args.model), **args.app)
        self.grace = args.grace
        self._metrics = _ReplicaMetrics()
        self.log.info("serve.replica_ready", backend=self.model.backend)

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[dict[str, Any]]:
        """Run ``request`` through the app, yielding its ASGI messages as they are sent."""
        sent: asyncio.Queue[Any] = asyncio.Queue()
        gone = asyncio.Event()
        body_given = False
        header = (REPLICA_HEADER.encode(), self.replica_id.encode())

        async def receive() -> Message:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": request.body, "more_body": not request.complete}
            await gone.wait()  # the caller cancelled: its client went away
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
                self._metrics.count(request.scope.get("path", ""), int(message["status"]))
            await sent.put(message)

        task = asyncio.ensure_future(self.app(dict(request.scope), receive, send))
        task.add_done_callback(lambda _: sent.put_nowait(_DONE))
        try:
            while (message := await sent.get()) is not _DONE:
                yield message
        finally:
            gone.set()
            # Let the app see the disconnect and take the request out of the model's batch.
            done, _ = await asyncio.wait({task}, timeout=self.grace)
            if task in done and not task.cancelled() and task.exception() is not None:
                error = task.exception()
                self.log.error("serve.replica_error", error=f"{type(error).__name__}: {error}")

    def __del__(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


@final
class _ReplicaMetrics:
    """Per-replica metrics the Ray way: Ray tags them with deployment, replica and application."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "infer_replica_requests",
            "HTTP responses a replica started, by path and status",
            ("path", "status"),  # type: ignore[arg-type]  # Ray annotates tag_keys as tuple[str]
        )

    def count(self, path: str, status: int) -> None:
        # Paths are the app's own few routes; anything else collapses so tag values stay bounded.
        shown = path if path.startswith(("/v1/", "/health", "/metrics")) and len(path) < 64 else "other"
        self.requests.inc(tags={"path": shown, "status": str(status)})


InferReplica = serve.deployment(name="InferReplica")(_Replica)


# -- the ingress ---------------------------------------------------------------------------------


class _Ingress:
    """The HTTP entry: reads each request's body, keys it, relays it to a replica and back."""

    def __init__(
        self, replicas: DeploymentHandle[Any], *, max_body_bytes: int, body_timeout: float, prefix_routing: bool
    ) -> None:
        self._relay = _Relay(
            replicas.options(method_name="handle", stream=True),
            max_body_bytes=max_body_bytes,
            body_timeout=body_timeout,
            prefix_routing=prefix_routing,
        )

    def __serve_build_asgi_app__(self) -> _Relay:
        return self._relay


InferIngress = serve.deployment(name="InferIngress")(serve.ingress()(_Ingress))


@final
class _Relay:
    """The ingress' ASGI app: one model replica answers each HTTP request."""

    def __init__(
        self, handle: DeploymentHandle[Any], *, max_body_bytes: int, body_timeout: float, prefix_routing: bool
    ):
        self.handle = handle
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.prefix_routing = prefix_routing
        self.log = get_logger()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # the app has no websocket routes; the server closes the connection
        body, complete = await self._read_body(receive)
        request = ForwardedRequest(
            portable_scope(scope), body, complete, prefix_key(body) if self.prefix_routing else None
        )
        responses = self.handle.remote(request)
        assert isinstance(responses, DeploymentResponseGenerator)  # the handle streams
        try:
            await self._forward(responses, send)
        except asyncio.CancelledError:
            # Ray's proxy cancels this call when the client goes away (and a receive() left
            # waiting here would race the connection's next request): pass it on, so the
            # replica's app sees a disconnect and the request leaves the model's batch.
            responses.cancel()  # type: ignore[no-untyped-call]
            raise

    async def _read_body(self, receive: Any) -> tuple[bytes, bool]:
        # One byte past the limit is enough for the replica's app to answer 413.
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(self.body_timeout):
                while size <= self.max_body_bytes:
                    message = await receive()
                    if message["type"] != "http.request":
                        return b"".join(chunks), False
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if not message.get("more_body", False):
                        return b"".join(chunks), True
        except TimeoutError:
            return b"".join(chunks), False
        return b"".join(chunks)[: self.max_body_bytes + 1], True

    async def _forward(self, responses: DeploymentResponseGenerator[Any], send: Any) -> None:
        started = streaming = False
        try:
            async for message in responses:
                if message["type"] == "http.response.start":
                    started = True
                    streaming = any(
                        k == b"content-type" and v.startswith(b"text/event-stream")
                        for k, v in message.get("headers", [])
                    )
                await send(message)
        except RequestCancelledError:
            return  # cancelled because the client went away: nobody to answer
        except BackPressureError:
            await _fail(
                send,
                started,
                streaming,
                APIError(
                    429,
                    "every replica's queue is full; retry later",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": "1"},
                ),
            )
        except (RayError, RayServeException) as exc:
            self.log.warning("serve.replica_failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            await _fail(
                send,
                started,
                streaming,
                APIError(
                    503,
                    "the replica serving this request stopped; Ray is restarting it and the other replicas "
                    "keep serving: retry the request",
                    code="replica_unavailable",
                    headers={"Retry-After": "1"},
                ),
            )


async def _fail(send: Any, started: bool, streaming: bool, err: APIError) -> None:
    """End a relayed response with ``err``: its status before it began, an event once streaming."""
    if not started:
        body = err.encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    elif streaming:
        await send({"type": "http.response.body", "body": sse(err.body()) + sse("[DONE]"), "more_body": False})
    else:  # a JSON answer whose body never came: end it so the client sees a broken body, not a hang
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
