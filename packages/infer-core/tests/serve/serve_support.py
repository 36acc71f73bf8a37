"""Helpers of the server tests: an HTTP client module, a server subprocess, raw ASGI driving, SSE parsing."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx2", reason="the server tests need httpx2 (installed with openai)")

REPO = Path(__file__).resolve().parents[4]


@functools.cache
def openai_schema(name: str) -> Any:
    """A JSON-schema validator for component ``name`` of OpenAI's OpenAPI document, as vendored
    (trimmed to the served operations) in ``tests/openapi/``."""
    import jsonschema
    import referencing.jsonschema
    from referencing import Registry, Resource

    document = json.loads((REPO / "tests" / "openapi" / "openai-served.json").read_text(encoding="utf-8"))
    resource = Resource.from_contents(
        _nullable_as_null(document), default_specification=referencing.jsonschema.DRAFT202012
    )
    registry: Registry[Any] = Registry().with_resource("urn:openai", resource)
    return jsonschema.Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{name}"}, registry=registry)


def _nullable_as_null(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` (which OpenAI's 3.1 document still uses) as JSON Schema: or null."""
    if isinstance(node, list):
        return [_nullable_as_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable_as_null(value) for key, value in node.items() if key != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") is True else out


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sse_data(text: str) -> list[Any]:
    """The ``data:`` payloads of an event stream: dicts for JSON, strings for ``[DONE]``."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream_text(events: list[Any]) -> str:
    """The generated text of a parsed stream (chat or completions)."""
    parts = []
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            choice = e["choices"][0]
            parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


class ServerProcess:
    """``python -m infer.cli serve MODEL ...`` on a free loopback port, stopped on exit (``prefix`` wraps it)."""

    def __init__(
        self,
        *args: str,
        model: str = "fake",
        backend: str = "fake",
        ready_timeout: float = 120.0,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "infer.cli", "serve", model, "--backend", backend, "--port", str(self.port), *args]
        cmd = [*prefix, *cmd]  # e.g. prlimit, to start the server under other resource limits
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"infer-serve-{self.port}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after {ready_timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        """What the server printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown)."""
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, SIGKILL if it does not go; return the exit status."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


Receive = Callable[[], Awaitable[dict[str, Any]]]


async def drive(
    app: Any,
    path: str,
    body: dict[str, Any],
    *,
    disconnect_after_chunks: int | None = None,
    disconnect_after_s: float | None = None,
    on_disconnect: Callable[[], None] | None = None,
    send_raises: bool = True,
    stall_after_chunks: int | None = None,
) -> list[dict[str, Any]]:
    """Run one POST through the ASGI ``app`` as a server would; the client may go away midway.

    The client disconnects after it has received ``disconnect_after_chunks`` body messages or
    ``disconnect_after_s`` seconds, whichever is given. After that, ``send`` raises ``OSError``
    (as ASGI 2.4 servers do) or, with ``send_raises=False``, drops the message silently (as
    older servers do). With ``stall_after_chunks`` the client stays connected but stops
    reading: every later ``send`` blocks forever, as on a full socket buffer. Returns the
    messages the app sent.
    """
    raw = json.dumps(body).encode()
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict[str, Any]:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        if on_disconnect is not None:
            on_disconnect()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            if send_raises:
                raise OSError("client disconnected")
            return
        sent.append(message)
        chunks = sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body"))
        if stall_after_chunks is not None and chunks > stall_after_chunks:
            await asyncio.Event().wait()
        if disconnect_after_chunks is not None and chunks >= disconnect_after_chunks:
            gone.set()
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }

    async def leave_later() -> None:
        assert disconnect_after_s is not None
        await asyncio.sleep(disconnect_after_s)
        gone.set()

    timer = asyncio.ensure_future(leave_later()) if disconnect_after_s is not None else None
    try:
        await app(scope, receive, send)
    finally:
        if timer is not None:
            timer.cancel()
    return sent
