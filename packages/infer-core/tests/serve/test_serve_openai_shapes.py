"""Every body and stream chunk in OpenAI's published response shapes; the headers stock clients read.

Each body is checked three ways: against OpenAI's OpenAPI document itself (vendored, trimmed,
in ``tests/openapi/``), by the pydantic types of the official ``openai`` package (generated
from that document: field types, enums such as ``finish_reason`` and ``object``), and for the
fields the document marks *required* (which those types relax to optional) by name, from
:data:`REQUIRED` below.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
pytest.importorskip("openai", reason="the shapes are the openai package's types")
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from serve_support import openai_schema, sse_data

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "seed": 1}
TEXT = {"model": "fake", "prompt": "hi", "max_tokens": 6, "seed": 1}

#: Required properties in OpenAI's OpenAPI document, by schema (path into the body -> names).
REQUIRED = {
    "chat.completion": {
        "": {"id", "object", "created", "model", "choices"},
        "choices[]": {"index", "message", "finish_reason", "logprobs"},
        "choices[].message": {"role", "content", "refusal"},
        "choices[].logprobs": {"content", "refusal"},
        "choices[].logprobs.content[]": {"token", "logprob", "bytes", "top_logprobs"},
        "choices[].message.tool_calls[]": {"id", "type", "function"},
    },
    "chat.completion.chunk": {
        "": {"id", "object", "created", "model", "choices"},
        "choices[]": {"index", "delta", "finish_reason"},
        "choices[].logprobs": {"content", "refusal"},
        "choices[].delta.tool_calls[]": {"index"},
    },
    "text_completion": {
        "": {"id", "object", "created", "model", "choices"},
        "choices[]": {"index", "text", "finish_reason", "logprobs"},
    },
}


def _at(body: object, path: str) -> list[dict]:
    """The objects at ``path`` ("choices[].message"): ``[]`` steps into every item of a list."""
    found = [body]
    for step in filter(None, path.split(".")):
        many = step.endswith("[]")
        name = step.removesuffix("[]")
        found = [item.get(name) for item in found if isinstance(item, dict)]
        found = [x for item in found if item is not None for x in (item if many else [item])]
    return [item for item in found if isinstance(item, dict)]


def check_shape(body: dict, *, chunk: bool = False) -> None:
    """Validate ``body`` with the openai types and the document's required fields.

    A completions stream chunk is a ``text_completion`` whose ``finish_reason`` is null until the
    last: so OpenAI's own streams are, though the document's enum has no null (the one place
    where the document and the service part ways, and clients follow the service).
    """
    kind = {"chat.completion": ChatCompletion, "chat.completion.chunk": ChatCompletionChunk}.get(
        body["object"], Completion
    )
    if chunk and kind is Completion:
        assert all(c["finish_reason"] in (None, "stop", "length") for c in body["choices"])
        body = body | {"choices": [c | {"finish_reason": c["finish_reason"] or "stop"} for c in body["choices"]]}
    kind.model_validate(body)
    schema = {
        "chat.completion": "CreateChatCompletionResponse",
        "chat.completion.chunk": "CreateChatCompletionStreamResponse",
        "text_completion": "CreateCompletionResponse",
    }[body["object"]]
    problems = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in openai_schema(schema).iter_errors(body)]
    assert not problems, f"{body['object']} against OpenAI's {schema}: {problems}"
    for path, names in REQUIRED[body["object"]].items():
        for item in _at(body, path):
            assert names <= set(item), f"{body['object']} {path or 'body'} lacks {sorted(names - set(item))}"


def chunks_of(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [e for e in sse_data(response.text) if e != "[DONE]"]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 2}),
        ("/v1/completions", TEXT),
        ("/v1/completions", TEXT | {"logprobs": 2}),
    ],
)
async def test_whole_and_streamed_answers_have_openais_shapes(client, route, body):
    whole = await client.post(route, json=body)
    assert whole.status_code == 200, whole.text
    check_shape(whole.json())
    stream = await client.post(route, json=body | {"stream": True, "stream_options": {"include_usage": True}})
    for chunk in chunks_of(stream):
        check_shape(chunk, chunk=True)


async def test_tool_call_answers_and_deltas_have_openais_shapes(client):
    pytest.importorskip("llguidance", reason="forced tool calls need llguidance")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    body = CHAT | {"tools": [tool], "tool_choice": "required", "max_tokens": 100}
    whole = (await client.post("/v1/chat/completions", json=body)).json()
    check_shape(whole)
    assert whole["choices"][0]["message"]["tool_calls"]
    for chunk in chunks_of(await client.post("/v1/chat/completions", json=body | {"stream": True})):
        check_shape(chunk, chunk=True)


async def test_the_chat_message_has_a_null_refusal_and_the_body_a_system_fingerprint(client):
    body = (await client.post("/v1/chat/completions", json=CHAT)).json()
    assert body["choices"][0]["message"]["refusal"] is None
    assert re.fullmatch(r"fp_[0-9a-f]{12}", body["system_fingerprint"])
    again = (await client.post("/v1/completions", json=TEXT)).json()
    assert again["system_fingerprint"] == body["system_fingerprint"]  # same server, same configuration


async def test_model_cards_have_openais_shape(client):
    listing = (await client.get("/v1/models")).json()
    for card in listing["data"]:
        Model.model_validate(card)


async def test_every_response_carries_x_request_id_echoing_the_clients(client):
    mine = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "trace-42"})
    assert mine.headers["x-request-id"] == "trace-42"
    made = [
        await client.post("/v1/chat/completions", json=CHAT),
        await client.post("/v1/completions", json=TEXT | {"stream": True}),
        await client.post("/v1/completions", json={"model": "fake"}),  # a 400
        await client.get("/v1/nothing"),  # a 404
        await client.get("/health"),
    ]
    ids = [r.headers["x-request-id"] for r in made]
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == len(ids)


async def test_an_unsafe_client_request_id_is_replaced(client):
    r = await client.get("/health", headers={"x-request-id": "x" * 500})
    assert r.headers["x-request-id"].startswith("req_")


async def test_a_405_names_the_allowed_methods(client):
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
