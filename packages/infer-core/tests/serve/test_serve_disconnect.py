"""A client that goes away cancels its request: the sequence leaves the batch within one step."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
from serve_support import drive

from infer.serve import create_app

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

LONG = {"model": "fake", "prompt": "tell me everything", "max_tokens": 300, "ignore_eos": True}


async def idle(model, timeout: float = 5.0) -> float:
    """Seconds until the model's scheduler holds no sequence."""
    started = time.monotonic()
    while model.active_requests:
        assert time.monotonic() - started < timeout, "the cancelled request is still in the scheduler"
        await asyncio.sleep(0.002)
    return time.monotonic() - started


async def check_released(app, model, steps_at_disconnect: list[int]) -> None:
    await idle(model)
    # One step may already be running when the client leaves; no further step runs for it.
    assert model.handle.steps - steps_at_disconnect[0] <= 1
    server = app.state.server
    assert server.admission.running == server.admission.waiting == 0
    metrics = server.metrics.render().decode()
    assert 'status="499"} 1.0' in metrics
    assert "infer_active_sequences 0.0" in metrics


@pytest.mark.parametrize("send_raises", [True, False], ids=["send-raises", "send-drops"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_disconnect_mid_stream_frees_the_sequence_within_one_step(make_model, path, send_raises):
    model = make_model(latency=0.01)
    app = create_app(model, model_name="fake")
    body = LONG | {"stream": True}
    if path == "/v1/chat/completions":
        body = {k: v for k, v in body.items() if k != "prompt"} | {"messages": [{"role": "user", "content": "x"}]}
    marks: list[int] = []
    sent = await drive(
        app,
        path,
        body,
        disconnect_after_chunks=4,
        on_disconnect=lambda: marks.append(model.handle.steps),
        send_raises=send_raises,
    )
    assert sent[0]["status"] == 200
    assert marks, "the app never noticed the disconnect"
    await check_released(app, model, marks)


async def test_disconnect_during_a_non_streaming_request_cancels_it(make_model):
    model = make_model(latency=0.01)
    app = create_app(model, model_name="fake")
    marks: list[int] = []
    sent = await drive(
        app, "/v1/completions", LONG, disconnect_after_s=0.15, on_disconnect=lambda: marks.append(model.handle.steps)
    )
    assert sent == []  # nothing was sent: the answer was not ready
    assert 0 < marks[0] < 100
    await check_released(app, model, marks)


async def test_disconnect_while_queued_leaves_the_queue_without_reaching_the_model(make_model):
    model = make_model(latency=0.01)
    app = create_app(model, model_name="fake", max_concurrency=1)
    server = app.state.server
    holder = asyncio.ensure_future(drive(app, "/v1/completions", LONG | {"max_tokens": 30}))
    while server.admission.running < 1:
        await asyncio.sleep(0.002)
    sent = await drive(app, "/v1/completions", LONG, disconnect_after_s=0.05)
    assert sent == []
    assert server.admission.waiting == 0
    first = await holder
    assert first[0]["status"] == 200
    await idle(model)
    assert model.handle.steps <= 31  # one prefill and 29 decodes for the holder; nothing for the one that left
