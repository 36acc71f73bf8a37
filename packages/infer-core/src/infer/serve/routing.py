"""Prefix-aware routing for Ray Serve: a conversation's turns go to the replica holding its prefix.

Ray Serve's HTTP proxy hands a deployment only the request's headers (the body follows later),
so the routing key is computed by the ingress deployment, which has read the body, and travels
with the call to the model replicas (:class:`ForwardedRequest`). :func:`prefix_key` keys a chat
request by its opening, every message up to and including the first user message, which every
later turn of the same conversation repeats; a completion request by the first
:data:`PROMPT_KEY_CHARS` characters of its prompt.

:class:`PrefixAffinityRouter` is a Ray Serve custom request router (``request_router_config``):
rendezvous hashing of the key over the live replicas names one preferred replica, so the mapping
is the same in every ingress process without shared state, and only the keys of a replica that
goes away move. It ranks that replica first (twice: Ray doubles the probe deadline for the
second try) and the others after; Ray probes each rank's queue lengths and takes the least
loaded replica that accepts, so a full preferred replica, or one loaded past
``imbalanced_threshold`` more requests than the idlest, falls back to least-loaded.
A request without a key (``/health``, a body that is not JSON) is routed least-loaded.

Ray Serve loads the router by its import path (``infer.serve.routing:PrefixAffinityRouter``)
and ships it to each ingress by value, so the router finds the key by attribute, not by class.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, final

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

__all__ = ["PROMPT_KEY_CHARS", "ForwardedRequest", "PrefixAffinityRouter", "prefix_key"]

#: Characters of a completion prompt that key it: long enough to tell system prompts apart,
#: short enough that a growing multi-turn prompt keeps its key from the first turn on.
PROMPT_KEY_CHARS = 128

# The ASGI scope entries a replica needs to run the request; the rest (the proxy's state and
# extensions) stays in the ingress process.
_SCOPE_KEYS = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "query_string",
    "root_path",
    "headers",
    "client",
    "server",
)


@final
@dataclass(frozen=True, slots=True)
class ForwardedRequest:
    """An HTTP request the ingress read, sent to a model replica to run through its app.

    ``complete`` is false when the body did not arrive in time; the replica's app then waits
    for the rest and answers 408 under its own body timeout, as ``infer serve`` does.
    """

    #: The portable part of the ASGI scope (see :func:`portable_scope`).
    scope: dict[str, Any]
    #: The body as read, at most one byte past the server's body limit.
    body: bytes
    #: Whether the client finished sending the body.
    complete: bool
    #: The routing key (:func:`prefix_key`); ``None`` routes least-loaded.
    prefix_key: str | None = field(default=None)


def portable_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """The entries of an HTTP ``scope`` that can travel to another process."""
    return {k: scope[k] for k in _SCOPE_KEYS if k in scope}


def prefix_key(body: bytes) -> str | None:
    """The routing key of an OpenAI request body, or ``None`` when it names no conversation.

    A request naming a ``prompt_cache_key`` (OpenAI's cache hint) is keyed by the model and that
    string, so requests sharing the key go to the replica holding their cached prefix whatever
    their openings. Otherwise, chat: the model and the messages up to and including the first
    user message; completions: the model and the prompt's first :data:`PROMPT_KEY_CHARS`
    characters. The replica's app validates the body; a body that is not what it expects only
    loses its key here.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    opening: Any
    messages, prompt, hint = data.get("messages"), data.get("prompt"), data.get("prompt_cache_key")
    if isinstance(hint, str) and hint:
        opening = {"prompt_cache_key": hint}
    elif isinstance(messages, list) and messages:
        users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
        opening = messages[: users[0] + 1] if users else messages[:1]
    elif isinstance(prompt, str) and prompt:
        opening = prompt[:PROMPT_KEY_CHARS]
    else:
        return None
    canonical = json.dumps([data.get("model"), opening], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _weight(key: str, replica: RunningReplica) -> int:
    digest = hashlib.blake2b(f"{key}/{replica.replica_id.unique_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class PrefixAffinityRouter(RequestRouter):
    """Routes requests sharing a conversation prefix to one replica; least-loaded otherwise.

    Configured through ``request_router_kwargs``: ``imbalanced_threshold`` (default 8) is how
    many more ongoing requests than the idlest replica the preferred one may hold before the
    request goes least-loaded instead (its queue lengths as Ray last probed them).
    """

    def initialize_state(self, imbalanced_threshold: int = 8, **kwargs: Any) -> None:
        """Read the router's options (called by Ray Serve once, after construction)."""
        if isinstance(imbalanced_threshold, bool) or not isinstance(imbalanced_threshold, int):
            raise TypeError(f"imbalanced_threshold must be an integer, got {imbalanced_threshold!r}")
        self._imbalanced_threshold = imbalanced_threshold

    def preferred(self, key: str, candidates: list[RunningReplica]) -> RunningReplica:
        """The replica that owns ``key`` among ``candidates`` (highest rendezvous weight)."""
        return max(candidates, key=lambda r: _weight(key, r))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Rank the key's replica first and the rest after; one least-loaded rank without a key."""
        key = _key_of(pending_request)
        if key is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        first = self.preferred(key, candidate_replicas)
        rest = [r for r in candidate_replicas if r is not first]
        if self._overloaded(first, rest):
            return [candidate_replicas]
        # The owner twice: a probe of its queue that misses Ray's short deadline on a busy host
        # is retried with the deadline doubled before its conversation moves elsewhere.
        return [[first], [first], rest]

    def _overloaded(self, first: RunningReplica, rest: list[RunningReplica]) -> bool:
        cache = self.replica_queue_len_cache
        mine = cache.get(first.replica_id)
        others = [n for n in (cache.get(r.replica_id) for r in rest) if n is not None]
        return mine is not None and bool(others) and mine - min(others) > self._imbalanced_threshold


def _key_of(pending: PendingRequest | None) -> str | None:
    if pending is None:
        return None
    # By attribute, not isinstance: Ray ships the router class by value (cloudpickle), so its
    # copy of ForwardedRequest is not the class the ingress built the request with.
    for arg in pending.args:
        key = getattr(arg, "prefix_key", None)
        if isinstance(key, str):
            return key
    return None
