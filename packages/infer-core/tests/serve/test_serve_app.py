"""The app in process (httpx over ASGI): routes, OpenAI response shapes, limits and error mapping."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
from serve_support import httpx, sse_data, stream_text

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello there"}]}
TEXT = {"model": "fake", "prompt": "once upon a time"}


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


async def until_idle(client, timeout: float = 10.0) -> None:
    """Poll /health until the model's scheduler holds no sequence."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await client.get("/health")).json()["active_sequences"]:
        assert loop.time() < deadline, "the model never became idle"
        await asyncio.sleep(0.02)


# -- plain routes ------------------------------------------------------------------------------


async def test_models_lists_the_served_model(client):
    r = await client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["fake"]
    assert (await client.get("/v1/models/fake")).json()["id"] == "fake"
    assert error_of(await client.get("/v1/models/other"), 404)["code"] == "model_not_found"


async def test_health_reports_ok_and_the_load(client):
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() | {"running": 0} == {
        "status": "ok",
        "model": "fake",
        "backend": "fake",
        "running": 0,
        "queued": 0,
        "active_sequences": 0,
    }


async def test_unknown_routes_and_methods_answer_in_the_error_shape(client):
    assert error_of(await client.get("/v1/nothing"), 404)["code"] == "not_found"
    error_of(await client.get("/v1/completions"), 405)


# -- generation --------------------------------------------------------------------------------


async def test_completion_text_and_usage_equal_the_models_own_generation(client, fake_model):
    r = await client.post("/v1/completions", json=TEXT | {"max_tokens": 12, "seed": 5, "temperature": 0.8})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = fake_model.generate(TEXT["prompt"], max_tokens=12, seed=5, temperature=0.8)
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"] == {
        "prompt_tokens": expected.usage.prompt_tokens,
        "completion_tokens": expected.usage.completion_tokens,
        "total_tokens": expected.usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_chat_completion_renders_the_chat_template(client, fake_model):
    r = await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 9, "seed": 1})
    body = r.json()
    expected = fake_model.generate(messages=CHAT["messages"], max_tokens=9, seed=1)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text, "refusal": None}
    assert body["usage"]["prompt_tokens"] == expected.usage.prompt_tokens


async def test_prompt_as_token_ids_is_accepted(client, fake_model):
    ids = fake_model.encode("abc")
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": ids, "max_tokens": 3, "seed": 2})
    assert r.json()["choices"][0]["text"] == fake_model.generate(ids, max_tokens=3, seed=2).text


async def test_chat_stream_is_openai_chunks_ending_with_done_and_usage(client):
    whole = (await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 20, "seed": 7})).json()
    r = await client.post(
        "/v1/chat/completions",
        json=CHAT | {"max_tokens": 20, "seed": 7, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_data(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert stream_text(events) == whole["choices"][0]["message"]["content"]


async def test_completion_stream_without_include_usage_sends_no_usage_chunk(client):
    r = await client.post("/v1/completions", json=TEXT | {"max_tokens": 6, "seed": 3, "stream": True})
    events = sse_data(r.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    whole = (await client.post("/v1/completions", json=TEXT | {"max_tokens": 6, "seed": 3})).json()
    assert stream_text(events) == whole["choices"][0]["text"]


async def test_stop_string_ends_the_text_before_it(client, fake_model):
    full = fake_model.generate(TEXT["prompt"], max_tokens=30, seed=11, ignore_eos=True).text
    stop = full[5:7]
    r = await client.post(
        "/v1/completions", json=TEXT | {"max_tokens": 30, "seed": 11, "ignore_eos": True, "stop": [stop]}
    )
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[: full.index(stop)]


async def test_logit_bias_of_minus_100_bans_the_greedy_token(client, fake_model):
    greedy = fake_model.generate(TEXT["prompt"], max_tokens=1, temperature=0)
    body = TEXT | {"max_tokens": 1, "temperature": 0, "logit_bias": {str(greedy.token_ids[0]): -100}}
    banned = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    expected = fake_model.generate(TEXT["prompt"], max_tokens=1, temperature=0, logit_bias={greedy.token_ids[0]: -100})
    assert banned == expected.text != greedy.text


async def test_chat_logprobs_list_each_token_with_its_alternatives(client):
    r = await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 5, "logprobs": True, "top_logprobs": 3})
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        if "\ufffd" not in entry["token"]:  # a whole character: its bytes are the text's
            assert entry["bytes"] == list(entry["token"].encode())


async def test_completion_logprobs_use_the_legacy_format_in_streams_too(client):
    r = await client.post("/v1/completions", json=TEXT | {"max_tokens": 4, "logprobs": 2, "stream": True})
    chunks = [e for e in sse_data(r.text)[:-1] if e["choices"][0]["logprobs"]]
    assert len(chunks) == 4
    offsets = [c["choices"][0]["logprobs"]["text_offset"][0] for c in chunks]
    assert offsets == sorted(offsets)
    for c in chunks:
        lp = c["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 1
        assert len(lp["top_logprobs"][0]) <= 2


# -- limits and errors -------------------------------------------------------------------------


async def test_api_key_is_required_on_v1_routes_only(client_for, fake_model):
    c = client_for(fake_model, api_key="s3cret")
    assert error_of(await c.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert error_of(await c.post("/v1/completions", json=TEXT), 401)["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer s3cres"}
    assert error_of(await c.post("/v1/completions", json=TEXT, headers=wrong), 401)["message"] == "incorrect API key"
    good = {"Authorization": "Bearer s3cret"}
    assert (await c.post("/v1/completions", json=TEXT, headers=good)).status_code == 200
    assert (await c.get("/health")).status_code == 200
    assert (await c.get("/metrics")).status_code == 200


async def test_unknown_model_is_a_404(client):
    assert error_of(await client.post("/v1/chat/completions", json=CHAT | {"model": "gpt-9"}), 404)["param"] == "model"


async def test_body_over_the_limit_is_a_413_by_declared_or_streamed_size(client_for, fake_model):
    c = client_for(fake_model, max_body_bytes=1000)
    big = TEXT | {"prompt": "x" * 2000}
    assert error_of(await c.post("/v1/completions", json=big), 413)["code"] == "request_too_large"

    async def chunked():  # no Content-Length: the size is only known while reading
        for _ in range(20):
            yield b" " * 100

    error_of(await c.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)


async def test_prompt_over_max_prompt_tokens_is_a_400_naming_the_prompt(client_for, fake_model):
    c = client_for(fake_model, max_prompt_tokens=8)
    err = error_of(await c.post("/v1/completions", json=TEXT | {"prompt": "y" * 20}), 400)
    assert (err["param"], err["code"]) == ("prompt", "context_length_exceeded")
    err = error_of(await c.post("/v1/chat/completions", json=CHAT), 400)
    assert err["param"] == "messages"


async def test_prompt_over_the_context_and_max_tokens_past_it_are_400s(client_for, make_model):
    c = client_for(make_model(context_length=64))
    err = error_of(await c.post("/v1/completions", json=TEXT | {"prompt": "z" * 80}), 400)
    assert err["code"] == "context_length_exceeded"
    err = error_of(await c.post("/v1/completions", json=TEXT | {"max_tokens": 10**12}), 400)
    assert err["param"] == "max_tokens"
    err = error_of(await c.post("/v1/chat/completions", json=CHAT | {"max_completion_tokens": 60}), 400)
    assert err["param"] == "max_completion_tokens"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"seed": 2**64}, "seed"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"presence_penalty": 9}, "presence_penalty"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"logit_bias": {"3": 500}}, "logit_bias"),
        ({"logprobs": 3}, "logprobs"),
        ({"prompt": [1, 10**9]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"top_k": -1}, "top_k"),
    ],
)
async def test_values_out_of_range_are_400s_naming_the_field(client, change, param):
    r = await client.post("/v1/completions", json=TEXT | change)
    if param == "logprobs":  # in range for completions (0..5): accepted
        assert r.status_code == 200
        return
    assert error_of(r, 400)["param"] == param


async def test_queue_full_is_a_429_with_retry_after(client_for, make_model):
    c = client_for(make_model(latency=0.02), max_concurrency=1, max_queue=1)
    admission = c.app.state.server.admission
    body = TEXT | {"max_tokens": 40, "ignore_eos": True}
    running = asyncio.ensure_future(c.post("/v1/completions", json=body))
    queued = asyncio.ensure_future(c.post("/v1/completions", json=body))
    while admission.running + admission.waiting < 2:
        await asyncio.sleep(0.005)
    r = await c.post("/v1/completions", json=body)
    assert error_of(r, 429)["code"] == "queue_full"
    assert r.headers["retry-after"] == "1"
    assert (await running).status_code == 200
    assert (await queued).status_code == 200
    assert admission.running == admission.waiting == 0


async def test_a_hang_hits_the_deadline_as_504_then_the_server_recovers(client_for, make_model):
    c = client_for(make_model(hang_at_step=1, hang_seconds=1.0), request_timeout=0.3)
    r = await c.post("/v1/completions", json=TEXT)
    assert error_of(r, 504)["code"] == "deadline_exceeded"
    assert (await c.get("/health")).json()["status"] == "ok"
    await until_idle(c)  # the hung step returns; the expired request leaves the scheduler
    assert (await c.post("/v1/completions", json=TEXT)).status_code == 200


async def test_a_hang_mid_stream_ends_it_with_an_error_event_and_done(client_for, make_model):
    c = client_for(make_model(hang_at_step=4, hang_seconds=1.0), request_timeout=0.4)
    r = await c.post("/v1/completions", json=TEXT | {"stream": True, "max_tokens": 10, "ignore_eos": True})
    assert r.status_code == 200
    events = sse_data(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "deadline_exceeded"
    await until_idle(c)
    assert (await c.post("/v1/completions", json=TEXT | {"stream": True})).status_code == 200


async def test_a_backend_failure_is_a_500_with_a_clean_message_then_the_server_recovers(client_for, make_model):
    c = client_for(make_model(raise_at_step=1))
    err = error_of(await c.post("/v1/chat/completions", json=CHAT), 500)
    assert err["code"] == "backend_error"
    assert "fault injected" in err["message"]
    assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_a_backend_failure_mid_stream_is_an_error_event_then_done(client_for, make_model):
    c = client_for(make_model(raise_at_step=3))
    r = await c.post("/v1/chat/completions", json=CHAT | {"stream": True, "max_tokens": 10, "ignore_eos": True})
    events = sse_data(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error"
    assert "fault injected" in events[-2]["error"]["message"]
    assert (await c.get("/health")).status_code == 200


async def test_metrics_count_requests_tokens_and_latencies(client):
    await client.post("/v1/completions", json=TEXT | {"max_tokens": 5, "ignore_eos": True})
    await client.post("/v1/completions", json=TEXT | {"max_tokens": 5, "ignore_eos": True, "stream": True})
    await client.post("/v1/completions", json=TEXT | {"model": "nope"})
    text = (await client.get("/metrics")).text
    assert 'infer_requests_total{endpoint="/v1/completions",status="200"} 2.0' in text
    assert 'infer_requests_total{endpoint="/v1/completions",status="404"} 1.0' in text
    assert "infer_completion_tokens_total 10.0" in text
    assert "infer_time_to_first_token_seconds_count 2.0" in text
    assert "infer_time_per_output_token_seconds_count 8.0" in text
    assert "infer_queue_depth 0.0" in text
    assert "infer_active_sequences 0.0" in text


def test_create_app_refuses_bad_limits(fake_model):
    from infer.errors import InvalidParameterError
    from infer.serve import create_app

    for options in ({"max_concurrency": 0}, {"max_queue": -1}, {"request_timeout": 0}, {"model_name": ""}):
        with pytest.raises(InvalidParameterError):
            create_app(fake_model, **({"model_name": "m"} | options))
    assert httpx is not None
