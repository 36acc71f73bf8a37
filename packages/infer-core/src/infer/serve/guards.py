"""Connection-level defences of the server: the Host check, slow-header timeout, log-flood damping.

- :class:`HostCheck` (ASGI middleware) answers 421 to a request whose ``Host`` header is not
  an allowed name. A web page can make a browser send requests to ``localhost``, and DNS
  rebinding can point a page's own name at ``127.0.0.1`` and read the answers; both arrive
  with a foreign ``Host``. Loopback names only by default; ``--allowed-hosts`` widens it.
- :class:`HeaderTimeoutH11` (uvicorn's h11 protocol plus one timer) closes a connection that
  has not finished sending a request's headers ``header_timeout`` seconds after it opened, or
  after the first byte of a later request on it (slowloris). uvicorn's own keep-alive timer
  covers only the idle time between requests.
- :class:`RepeatFilter` lets one log record per (logger, message) through per interval: at
  the descriptor limit asyncio logs an ``accept`` failure per attempt, which at thousands of
  attempts a second turns into megabytes of identical tracebacks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, final

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from infer.serve.defaults import DEFAULT_HEADER_TIMEOUT
from infer.serve.errors import APIError

__all__ = ["DEFAULT_ALLOWED_HOSTS", "HeaderTimeoutH11", "HostCheck", "RepeatFilter", "host_name"]

#: Host names served by default: the loopback ones.
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without port or IPv6 brackets, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@final
class HostCheck:
    """ASGI middleware: HTTP requests must name an allowed host (``"*"`` allows any)."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        names = {host_name(h) for h in allowed}
        self.any = "*" in names
        self.allowed = frozenset(names - {"*"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.any:
            raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(raw) not in self.allowed:
                shown = raw[:60] or "(none)"
                err = APIError(
                    421,
                    f"this server does not answer for host {shown!r}; start it with --allowed-hosts to add names",
                    code="invalid_host",
                )
                body = err.encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 421, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol that drops connections whose request headers arrive too slowly."""

    #: Seconds from a request's first byte to the end of its headers (set by the server's CLI).
    header_timeout = DEFAULT_HEADER_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if not waiting_for_headers:
            self._disarm()
        elif self._header_timer is None:
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle now: uvicorn's keep-alive timer takes over until the next byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


@final
class RepeatFilter(logging.Filter):
    """Pass the first record of each (logger, first message line) per ``interval`` seconds; count the rest."""

    def __init__(self, interval: float = 10.0, *, brief: bool = False) -> None:
        super().__init__()
        self.interval = interval
        #: Log a passing record's exception as one line instead of a traceback (for asyncio's
        #: own errors: a full accept() or a retry timer firing after shutdown, not bugs here).
        self.brief = brief
        self._last: dict[tuple[str, str], float] = {}
        #: Records dropped so far.
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is logged."""
        # The first line only: asyncio's handler appends the failing socket (fd, addresses) below it.
        key = (record.name, str(record.msg).split("\n", 1)[0][:200])
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self.dropped += 1
            return False
        if len(self._last) > 1024:  # bounded: forget everything rather than grow
            self._last.clear()
        self._last[key] = now
        if self.brief and record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{key[1]} ({type(error).__name__}: {error})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True
