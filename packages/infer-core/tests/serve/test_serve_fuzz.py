"""No request body gets a 5xx: hypothesis-generated bodies on every JSON route (what Schemathesis checks).

Schemathesis drives the server from OpenAI's OpenAPI document (test_serve_openapi.py, tox env
clients); this test needs nothing beyond hypothesis and also covers the extension fields that
document lacks (regex, grammar...): each field is given arbitrary JSON (right types, wrong types,
nulls, huge and odd values) next to a valid base request. Every answer must be a 2xx or a 4xx
with OpenAI's error body, and the app must keep answering.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_support import httpx

import infer
from infer.serve import create_app

pytestmark = pytest.mark.integration

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
MESSAGES = [{"role": "user", "content": "hi"}]
ROUTES = {
    "/v1/chat/completions": (
        {"model": "fake", "messages": MESSAGES, "max_tokens": 4},
        [
            "messages",
            "temperature",
            "top_p",
            "n",
            "stop",
            "seed",
            "max_tokens",
            "max_completion_tokens",
            "logprobs",
            "top_logprobs",
            "tools",
            "tool_choice",
            "response_format",
            "stream",
            "stream_options",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
            "user",
            "parallel_tool_calls",
            "functions",
            "regex",
            "grammar",
        ],
    ),
    "/v1/completions": (
        {"model": "fake", "prompt": "hi", "max_tokens": 4},
        ["prompt", "echo", "logprobs", "suffix", "best_of", "max_tokens", "stop", "seed", "n", "temperature", "stream"],
    ),
    "/v1/responses": (
        {"model": "fake", "input": "hi", "max_output_tokens": 4},
        [
            "input",
            "instructions",
            "max_output_tokens",
            "previous_response_id",
            "store",
            "text",
            "tools",
            "metadata",
            "temperature",
            "stream",
            "truncation",
        ],
    ),
    "/tokenize": ({"prompt": "hi"}, ["prompt", "messages", "add_special_tokens", "chat_template_kwargs", "model"]),
    "/detokenize": ({"tokens": [1, 2]}, ["tokens", "model"]),
}
CASES = st.sampled_from(sorted(ROUTES)).flatmap(
    lambda route: st.tuples(
        st.just(route), st.dictionaries(st.sampled_from(ROUTES[route][1]), JSON, min_size=1, max_size=3)
    )
)


@pytest.fixture(scope="module")
def app():
    model = infer.load("fake", backend="fake")
    yield create_app(model, model_name="fake")
    model.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=CASES)
def test_no_body_gets_a_5xx(app, case):
    route, changes = case
    body = ROUTES[route][0] | changes

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            return await client.post(route, json=body, timeout=30)

    response = asyncio.run(post())
    assert response.status_code < 500, (route, body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert (isinstance(error["message"], str) and error["type"] == "invalid_request_error") or error["code"]
