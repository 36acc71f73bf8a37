"""``infer serve`` as a real process on loopback, driven by the official openai client, unchanged.

Covers both endpoints streaming and not, error mapping as the client sees it, faults injected
into the fake backend (an error and a hang mid-request), hostile input over real sockets, and
SIGTERM's graceful drain.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
from serve_support import ServerProcess, httpx, sse_data

openai = pytest.importorskip("openai", reason="the client tests need the openai package")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Say something."}]


def client_of(server: ServerProcess, **options) -> openai.OpenAI:
    options.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=server.url + "/v1", max_retries=0, timeout=30, **options)


@pytest.fixture(scope="module")
def server():
    with ServerProcess("-o", "latency=0.001") as running:
        yield running


# -- the openai client, unchanged --------------------------------------------------------------


def test_openai_client_lists_the_model(server):
    with client_of(server) as client:
        assert [m.id for m in client.models.list()] == ["fake"]


def test_openai_completions_stream_and_whole_agree(server):
    with client_of(server) as client:
        whole = client.completions.create(model="fake", prompt="Once", max_tokens=12, seed=4, temperature=0.7)
        chunks = list(
            client.completions.create(
                model="fake",
                prompt="Once",
                max_tokens=12,
                seed=4,
                temperature=0.7,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_chat_stream_and_whole_agree(server):
    with client_of(server) as client:
        whole = client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=16, seed=9)
        stream = client.chat.completions.create(
            model="fake", messages=MESSAGES, max_tokens=16, seed=9, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    assert whole.choices[0].message.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_openai_chat_logprobs_parse_in_the_client(server):
    with client_of(server) as client:
        reply = client.chat.completions.create(
            model="fake", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2
        )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 for e in entries)


def test_openai_client_sees_typed_errors_naming_the_field(server):
    with client_of(server) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as many:
            client.chat.completions.create(model="fake", messages=MESSAGES, n=99)
        assert many.value.param == "n"
        with pytest.raises(openai.BadRequestError) as hot:
            client.completions.create(model="fake", prompt="x", temperature=-1)
        assert hot.value.param == "temperature"


def test_api_key_server_refuses_a_wrong_key_and_accepts_the_right_one():
    with ServerProcess("--api-key", "k-123") as running:
        with client_of(running, api_key="wrong") as client, pytest.raises(openai.AuthenticationError):
            client.models.list()
        with client_of(running, api_key="k-123") as client:
            assert client.completions.create(model="fake", prompt="a", max_tokens=2).usage.completion_tokens >= 1


# -- faults ------------------------------------------------------------------------------------


def assert_recovered(server: ServerProcess) -> None:
    """/health is ok and the next request succeeds (once the model is idle again)."""
    deadline = time.monotonic() + 15
    while True:
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        if health.json()["active_sequences"] == 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with client_of(server) as client:
        reply = client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=4)
    assert reply.usage.completion_tokens >= 1


def test_an_error_mid_stream_is_an_error_event_and_a_clean_end():
    with ServerProcess("-o", "raise_at_step=4") as running:
        body = {"model": "fake", "prompt": "x", "max_tokens": 20, "ignore_eos": True, "stream": True}
        r = httpx.post(running.url + "/v1/completions", json=body, timeout=30)
        events = sse_data(r.text)
        assert r.status_code == 200
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "backend_error"
        assert len([e for e in events if isinstance(e, dict) and "choices" in e]) >= 1  # tokens came first
        assert_recovered(running)


def test_an_error_mid_stream_raises_in_the_openai_client_then_the_server_recovers():
    with ServerProcess("-o", "raise_at_step=4") as running:
        with client_of(running) as client:
            stream = client.chat.completions.create(
                model="fake", messages=MESSAGES, max_tokens=20, stream=True, extra_body={"ignore_eos": True}
            )
            got = []
            with pytest.raises(openai.APIError, match="fault injected"):
                for chunk in stream:
                    got.append(chunk)
        assert got, "tokens before the fault reached the client"
        assert_recovered(running)


def test_a_hang_hits_the_deadline_504_or_an_error_event_then_the_server_recovers():
    with ServerProcess("-o", "hang_at_step=1", "-o", "hang_seconds=2", "--timeout", "0.5") as running:
        started = time.monotonic()
        with client_of(running) as client, pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="fake", prompt="x", max_tokens=5)
        assert info.value.status_code == 504
        assert time.monotonic() - started < 1.9  # the deadline, not the hang, ended it
        assert_recovered(running)
    with ServerProcess("-o", "hang_at_step=4", "-o", "hang_seconds=2", "--timeout", "0.5") as running:
        body = {"model": "fake", "prompt": "x", "max_tokens": 20, "ignore_eos": True, "stream": True}
        events = sse_data(httpx.post(running.url + "/v1/completions", json=body, timeout=30).text)
        assert events[-2]["error"]["code"] == "deadline_exceeded"
        assert events[-1] == "[DONE]"
        assert_recovered(running)


def test_a_client_leaving_mid_stream_frees_its_sequence_on_the_real_server():
    with ServerProcess("-o", "latency=0.02") as running:
        body = {"model": "fake", "prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            assert httpx.get(running.url + "/health", timeout=5).json()["active_sequences"] == 1
            left = time.monotonic()
        while httpx.get(running.url + "/health", timeout=5).json()["active_sequences"]:
            assert time.monotonic() - left < 2.0, "the sequence outlived its client"
            time.sleep(0.01)
        freed_after = time.monotonic() - left
        metrics = httpx.get(running.url + "/metrics", timeout=5).text
    assert freed_after < 1.0  # the ~990 steps left would take 20 s; cancellation takes about one
    assert 'infer_requests_total{endpoint="/v1/completions",status="499"} 1.0' in metrics


# -- hostile input -----------------------------------------------------------------------------


def raw_request(server: ServerProcess, payload: bytes) -> int:
    """Send raw bytes; return the HTTP status of the answer.

    A server may answer (413 on the declared length, say) and close before the body is all sent:
    the bytes go in slices, and sending stops once an answer is there or the peer has closed.
    """
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        for start in range(0, len(payload), 1 << 16):
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(payload[start : start + (1 << 16)])
            except (BrokenPipeError, ConnectionResetError):
                break
        head = s.recv(4096).decode("latin-1")
    return int(head.split(" ", 2)[1])


def post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def completion(extra: bytes) -> bytes:
    return post("/v1/completions", b'{"model": "fake", "prompt": "x", ' + extra + b"}")


HOSTILE = [
    ("invalid UTF-8", post("/v1/completions", b'{"model": "fake", "prompt": "\xff\xfe\xfa"}'), 400),
    ("deeply nested", post("/v1/chat/completions", b"[" * 200_000 + b"]" * 200_000), 400),
    ("nested in a field", post("/v1/chat/completions", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 400),
    ("truncated JSON", post("/v1/completions", b'{"model": "fake", "prompt": "x"'), 400),
    ("NaN", completion(b'"temperature": NaN'), 400),
    ("huge max_tokens", completion(b'"max_tokens": 1000000000000000000000'), 400),
    ("negative max_tokens", completion(b'"max_tokens": -3'), 400),
    ("seed past int64", completion(b'"seed": 18446744073709551616'), 400),
    ("negative penalty", completion(b'"frequency_penalty": -7'), 400),
    (
        "unknown role",
        post("/v1/chat/completions", b'{"model": "fake", "messages": [{"role": "god", "content": "x"}]}'),
        400,
    ),
    (
        "wrong type",
        post("/v1/chat/completions", b'{"model": "fake", "messages": [{"role": "user", "content": 5}]}'),
        400,
    ),
    ("lone surrogate", post("/v1/completions", b'{"model": "fake", "prompt": "\\ud800"}'), 400),
    ("huge token id", post("/v1/completions", b'{"model": "fake", "prompt": [99999999999999999999]}'), 400),
    ("huge logit_bias key", completion(b'"logit_bias": {"' + b"9" * 5000 + b'": 1}'), 400),
    ("oversized body", completion(b'"user": "' + b"a" * (3 * 1024 * 1024) + b'"'), 413),
    (
        "oversized chunked body",
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"".join(b"100000\r\n" + b" " * 0x100000 + b"\r\n" for _ in range(3))
        + b"0\r\n\r\n",
        413,
    ),
    ("lying Content-Length", post("/v1/completions", b"{}").replace(b"Length: 2", b"Length: 99999999999"), 413),
    ("bad Content-Length", post("/v1/completions", b"{}").replace(b"Length: 2", b"Length: abc"), 400),
    ("empty body", post("/v1/completions", b""), 400),
    ("not JSON at all", post("/v1/completions", b"\x00\x01\x02garbage"), 400),
    ("text/plain body (cross-site form)", completion(b'"seed": 1').replace(b"application/json", b"text/plain"), 415),
    ("no content type", completion(b'"seed": 1').replace(b"Content-Type: application/json\r\n", b""), 415),
    ("foreign Host (DNS rebinding)", completion(b'"seed": 1').replace(b"Host: localhost", b"Host: evil.example"), 421),
    ("no Host", completion(b'"seed": 1').replace(b"Host: localhost\r\n", b""), 400),
    (
        "foreign Host on /health",
        b"GET /health HTTP/1.1\r\nHost: evil.example:8000\r\nConnection: close\r\n\r\n",
        421,
    ),
]


@pytest.mark.parametrize(("name", "payload", "expected"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_a_4xx_and_the_server_stays_up(server, name, payload, expected):
    assert raw_request(server, payload) == expected, name
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_no_hostile_input_ever_produced_a_500(server):
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert 'status="500"' not in metrics
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()


# -- SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_streams_refuses_new_ones_and_exits_0():
    running = ServerProcess("-o", "latency=0.02", "--grace", "30")
    results: dict[str, object] = {}

    def consume() -> None:
        with client_of(running) as client:
            stream = client.completions.create(
                model="fake", prompt="x", max_tokens=60, stream=True, extra_body={"ignore_eos": True}
            )
            texts = []
            for chunk in stream:
                texts.append(chunk.choices[0].text)
                results.setdefault("first", time.monotonic())
            results["finish"] = chunk.choices[0].finish_reason
            results["chunks"] = len(texts)

    reader = threading.Thread(target=consume)
    reader.start()
    while "first" not in results:
        time.sleep(0.01)
    running.terminate()
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # listening has stopped
        httpx.get(running.url + "/health", timeout=2)
    reader.join(30)
    assert results.get("finish") == "length", results  # the in-flight stream ran to its end
    assert running.proc.wait(30) == 0
    running.stop()


def test_sigterm_past_the_grace_period_ends_streams_with_an_error_event_and_done_and_exits_0():
    running = ServerProcess("-o", "latency=0.05", "--grace", "0.5")
    body = {"model": "fake", "prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    streams = [httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=30) for _ in range(3)]
    responses = [s.__enter__() for s in streams]
    try:
        lines = [r.iter_lines() for r in responses]
        for it in lines:
            next(it)
        started = time.monotonic()
        running.terminate()
        for it in lines:
            events = sse_data("\n".join(it) + "\n\n")
            assert events[-1] == "[DONE]"  # every stream ends with its terminator...
            error = events[-2]["error"]  # ...right after an error event saying why
            assert (error["code"], error["type"]) == ("unavailable", "server_error")
            assert "shutting down" in error["message"]
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    assert running.proc.wait(15) == 0
    assert time.monotonic() - started < 10
    log = running.log()
    running.stop()
    assert "Traceback" not in log
    assert "Event loop is closed" not in log


@pytest.mark.security
def test_slow_headers_are_cut_off_after_the_header_timeout_and_others_are_served():
    with ServerProcess("--header-timeout", "0.5") as srv:
        slow = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(20)]
        for s in slow:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)  # sends nothing at all
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        time.sleep(1.0)
        for s in [*slow, silent]:
            assert s.recv(1024) == b""  # closed by the server
            s.close()
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        assert "Traceback" not in srv.log()


# -- structured output and tools through the openai client ---------------------------------------


def test_openai_parse_with_a_pydantic_model_returns_the_parsed_object(server):
    pydantic = pytest.importorskip("pydantic")
    pytest.importorskip("llguidance", reason="structured output needs llguidance")

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        people: int = pydantic.Field(ge=0)
        capital: bool

    with client_of(server) as client:
        reply = client.chat.completions.parse(
            model="fake", messages=MESSAGES, response_format=City, seed=5, temperature=1.0, max_tokens=200
        )
    message = reply.choices[0].message
    assert isinstance(message.parsed, City) and message.refusal is None
    assert message.parsed == City.model_validate_json(message.content)


def test_openai_client_reads_tool_calls_and_sends_tool_results_back(server):
    pytest.importorskip("llguidance", reason="structured output needs llguidance")
    tool = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]},
        },
    }
    with client_of(server) as client:
        first = client.chat.completions.create(
            model="fake", messages=MESSAGES, tools=[tool], tool_choice="required", seed=1, max_tokens=200
        )
        (call,) = first.choices[0].message.tool_calls
        assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_time"
        assert json.loads(call.function.arguments)["zone"] in ("utc", "cet")
        streamed = client.chat.completions.create(
            model="fake", messages=MESSAGES, tools=[tool], tool_choice="required", seed=1, max_tokens=200, stream=True
        )
        deltas = [d for c in streamed if c.choices for d in c.choices[0].delta.tool_calls or []]
        assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_time", call.function.arguments)]
        history = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True)]
        history.append({"role": "tool", "tool_call_id": call.id, "content": "12:00"})
        second = client.chat.completions.create(model="fake", messages=history, tools=[tool], max_tokens=5)
    assert second.choices[0].message.role == "assistant"
