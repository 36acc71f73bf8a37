"""KV memory in the server: bytes per token in /metrics, and admission against a KV budget."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

TEXT = {"model": "fake", "prompt": "once upon a time"}
#: The fake backend caches one int32 per token.
FAKE_BYTES_PER_TOKEN = 4


async def test_metrics_report_kv_bytes_per_token_and_the_budget(client_for, fake_model):
    c = client_for(fake_model, max_kv_bytes=4096)
    text = (await c.get("/metrics")).text
    assert f"infer_kv_bytes_per_token {float(FAKE_BYTES_PER_TOKEN)}" in text
    assert "infer_kv_budget_bytes 4096.0" in text
    assert "infer_kv_reserved_bytes 0.0" in text


async def test_a_request_larger_than_the_whole_kv_budget_is_refused_with_both_sizes(client_for, fake_model):
    c = client_for(fake_model, max_kv_bytes=64 * FAKE_BYTES_PER_TOKEN)
    r = await c.post("/v1/completions", json=TEXT | {"max_tokens": 100})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "KV cache" in error["message"] and "KV budget" in error["message"]
    # a request that fits is served
    assert (await c.post("/v1/completions", json=TEXT | {"max_tokens": 8})).status_code == 200


async def test_requests_that_do_not_fit_beside_the_running_one_wait_for_its_kv_bytes(client_for, make_model):
    # Room for one request's sequence (prompt + 40 tokens), not two: the second waits, then runs.
    budget = 60 * FAKE_BYTES_PER_TOKEN
    c = client_for(make_model(latency=0.01), max_concurrency=4, max_kv_bytes=budget)
    admission = c.app.state.server.admission
    body = TEXT | {"max_tokens": 40, "ignore_eos": True}
    first = asyncio.ensure_future(c.post("/v1/completions", json=body))
    second = asyncio.ensure_future(c.post("/v1/completions", json=body))
    while admission.running + admission.waiting < 2:
        await asyncio.sleep(0.005)
    most_reserved = 0
    while not (first.done() and second.done()):
        assert admission.running <= 1, "two requests ran although their KV bytes exceed the budget"
        most_reserved = max(most_reserved, admission.kv_reserved_bytes)
        await asyncio.sleep(0.005)
    assert (await first).status_code == 200 and (await second).status_code == 200
    assert 0 < most_reserved <= budget
    assert admission.kv_reserved_bytes == 0 and admission.running == admission.waiting == 0


async def test_without_a_budget_requests_reserve_nothing_and_run_together(client_for, make_model):
    c = client_for(make_model(latency=0.01), max_concurrency=4)
    admission = c.app.state.server.admission
    body = TEXT | {"max_tokens": 20, "ignore_eos": True}
    runs = [asyncio.ensure_future(c.post("/v1/completions", json=body)) for _ in range(2)]
    while admission.running < 2 and not all(r.done() for r in runs):
        await asyncio.sleep(0.002)
    assert admission.running == 2 and admission.kv_reserved_bytes == 0
    assert [(await r).status_code for r in runs] == [200, 200]


def test_create_app_refuses_a_kv_budget_that_is_not_positive(fake_model):
    from infer.errors import InvalidParameterError
    from infer.serve import create_app

    with pytest.raises(InvalidParameterError):
        create_app(fake_model, model_name="m", max_kv_bytes=0)
