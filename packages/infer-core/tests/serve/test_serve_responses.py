"""``/v1/responses``, the text subset: bodies and events in the openai package's types, conversations kept."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
pytest.importorskip("openai", reason="the shapes are the openai package's types")
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from serve_support import httpx, openai_schema
from test_serve_structured import TIME as CHAT_TIME
from test_serve_structured import WEATHER as CHAT_WEATHER

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

BASE = {"model": "fake", "max_output_tokens": 12, "temperature": 0.7, "seed": 3}


def events_of(text: str) -> list[dict]:
    """The (event name, data) pairs of a Responses stream, checked to agree."""
    out = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        out.append(payload)
    return out


async def test_a_string_input_answers_a_response_object_as_chat_would(client, fake_model):
    r = await client.post("/v1/responses", json=BASE | {"input": "Say hi", "instructions": "Be brief."})
    assert r.status_code == 200, r.text
    body = r.json()
    Response.model_validate(body)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    expected = fake_model.generate(messages=messages, max_tokens=12, temperature=0.7, seed=3)
    assert body["output"][0]["content"][0]["text"] == expected.text
    assert body["usage"]["input_tokens"] == expected.usage.prompt_tokens
    assert body["usage"]["output_tokens"] == expected.usage.completion_tokens
    assert body["status"] == ("incomplete" if expected.finish_reason == "length" else "completed")
    assert body["id"].startswith("resp_") and body["instructions"] == "Be brief."


async def test_message_items_with_text_parts_are_the_conversation(client, fake_model):
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
        {"role": "user", "content": "again"},
    ]
    body = (await client.post("/v1/responses", json=BASE | {"input": items})).json()
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "again"},
    ]
    expected = fake_model.generate(messages=messages, max_tokens=12, temperature=0.7, seed=3)
    assert body["output"][0]["content"][0]["text"] == expected.text


async def test_previous_response_id_continues_the_stored_conversation(client, fake_model):
    first = (await client.post("/v1/responses", json=BASE | {"input": "one"})).json()
    answer = first["output"][0]["content"][0]["text"]
    second = await client.post("/v1/responses", json=BASE | {"input": "two", "previous_response_id": first["id"]})
    assert second.status_code == 200, second.text
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "two"},
    ]
    expected = fake_model.generate(messages=messages, max_tokens=12, temperature=0.7, seed=3)
    assert second.json()["usage"]["input_tokens"] == expected.usage.prompt_tokens
    assert second.json()["previous_response_id"] == first["id"]


async def test_an_unstored_or_unknown_previous_response_is_a_404_naming_the_field(client):
    unstored = (await client.post("/v1/responses", json=BASE | {"input": "x", "store": False})).json()
    for missing in (unstored["id"], "resp_nope"):
        r = await client.post("/v1/responses", json=BASE | {"input": "y", "previous_response_id": missing})
        assert r.status_code == 404
        assert r.json()["error"]["param"] == "previous_response_id"


async def test_the_store_forgets_the_least_recently_used_past_its_bound():
    from infer.serve.responses import ConversationStore

    store = ConversationStore(capacity=2)
    store.put("a", [{"role": "user", "content": "1"}])
    store.put("b", [])
    assert store.get("a") is not None  # a is now the most recent
    store.put("c", [])
    assert (store.get("a") is not None, store.get("b"), len(store)) == (True, None, 2)


async def test_a_stream_sends_the_responses_event_sequence_with_the_same_text(client):
    whole = (await client.post("/v1/responses", json=BASE | {"input": "Say hi"})).json()
    r = await client.post("/v1/responses", json=BASE | {"input": "Say hi", "stream": True})
    assert r.status_code == 200
    events = events_of(r.text)
    adapter = TypeAdapter(ResponseStreamEvent)
    for payload in events:
        adapter.validate_python(payload)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == whole["output"][0]["content"][0]["text"] == events[-1]["response"]["output"][0]["content"][0]["text"]


async def test_a_json_schema_text_format_constrains_the_output(client):
    pytest.importorskip("llguidance", reason="structured output needs llguidance")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    text = {"format": {"type": "json_schema", "name": "flag", "schema": schema, "strict": True}}
    body = (
        await client.post("/v1/responses", json=BASE | {"input": "ok?", "text": text, "max_output_tokens": 40})
    ).json()
    assert json.loads(body["output"][0]["content"][0]["text"]) in ({"ok": True}, {"ok": False})
    assert body["text"]["format"]["type"] == "json_schema"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
        (
            {
                "input": "x",
                "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "function", "name": "g"},
            },
            "tool_choice",
        ),
        ({"input": "x", "max_output_tokens": "many"}, "max_output_tokens"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
        # a part whose type is an object (found by Schemathesis: it was a 500)
        ({"input": [{"role": "user", "content": [{"type": {}, "text": "x"}]}]}, "input[0].content[0]"),
    ],
)
async def test_bad_responses_requests_are_400s_naming_the_field(client, extra, param):
    r = await client.post("/v1/responses", json={"model": "fake"} | extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_the_openai_client_creates_and_streams_responses(client_for, fake_model):
    import openai

    app = client_for(fake_model).app
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")
    async with openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="x", http_client=http) as oa:
        reply = await oa.responses.create(model="fake", input="hi", max_output_tokens=8, temperature=0)
        assert reply.output_text and reply.usage.output_tokens >= 1
        follow = await oa.responses.create(
            model="fake", input="more", previous_response_id=reply.id, max_output_tokens=4
        )
        assert follow.previous_response_id == reply.id
        stream = await oa.responses.create(model="fake", input="hi", max_output_tokens=8, temperature=0, stream=True)
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == reply.output_text


# -- function tools -------------------------------------------------------------------------------

# The chat tests' tools, in the Responses shape (flat: no "function" object).
WEATHER, TIME = ({"type": "function", **tool["function"]} for tool in (CHAT_WEATHER, CHAT_TIME))
CALLS = BASE | {"input": "Weather?", "tools": [WEATHER, TIME], "tool_choice": "required", "max_output_tokens": 120}


async def test_a_required_tool_call_is_a_function_call_output_item_as_chat_would_call(client, fake_model):
    pytest.importorskip("llguidance", reason="forced tool calls need llguidance")
    r = await client.post("/v1/responses", json=CALLS)
    assert r.status_code == 200, r.text
    body = r.json()
    Response.model_validate(body)
    (call,) = body["output"]  # the answer is the call alone: no message item
    assert call["type"] == "function_call" and call["status"] == "completed"
    assert call["call_id"].startswith("call_") and call["id"].startswith("fc_")
    json.loads(call["arguments"])
    expected = fake_model.generate(
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[CHAT_WEATHER, CHAT_TIME],
        tool_choice="required",
        max_tokens=120,
        temperature=0.7,
        seed=3,
    )
    assert (call["name"], call["arguments"]) == (expected.tool_calls[0].name, expected.tool_calls[0].arguments)
    assert body["status"] == "completed" and body["tool_choice"] == "required"
    assert [t["name"] for t in body["tools"]] == ["get_weather", "get_time"]


async def test_a_named_tool_choice_calls_that_function(client):
    pytest.importorskip("llguidance", reason="forced tool calls need llguidance")
    body = (
        await client.post("/v1/responses", json=CALLS | {"tool_choice": {"type": "function", "name": "get_time"}})
    ).json()
    assert [item["name"] for item in body["output"]] == ["get_time"]
    assert body["tool_choice"] == {"type": "function", "name": "get_time"}


async def test_a_streamed_function_call_sends_the_responses_call_events_with_the_whole_answers_call(client):
    pytest.importorskip("llguidance", reason="forced tool calls need llguidance")
    whole = (await client.post("/v1/responses", json=CALLS)).json()
    r = await client.post("/v1/responses", json=CALLS | {"stream": True})
    assert r.status_code == 200, r.text
    events = events_of(r.text)
    adapter = TypeAdapter(ResponseStreamEvent)
    for payload in events:
        adapter.validate_python(payload)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[2]["item"]["status"] == "in_progress" and events[2]["item"]["arguments"] == ""
    expected = whole["output"][0]
    assert events[3]["delta"] == events[4]["arguments"] == expected["arguments"]
    done = events[5]["item"]
    assert (done["name"], done["arguments"], done["status"]) == (expected["name"], expected["arguments"], "completed")
    assert events[-1]["response"]["output"] == [done]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


async def test_function_call_outputs_continue_the_conversation_as_tool_messages(client, fake_model):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": "{}"}
    answer = {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}
    request = BASE | {"input": [{"role": "user", "content": "Time?"}, call, answer], "tools": [TIME]}
    body = (await client.post("/v1/responses", json=request)).json()
    messages = [
        {"role": "user", "content": "Time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    expected = fake_model.generate(
        messages=messages,
        tools=[CHAT_TIME],
        max_tokens=12,
        temperature=0.7,
        seed=3,
    )
    assert body["usage"]["input_tokens"] == expected.usage.prompt_tokens
    assert body["output"][0]["content"][0]["text"] == expected.text


async def test_a_stored_call_and_its_output_by_previous_response_id_are_the_next_turns_history(client):
    pytest.importorskip("llguidance", reason="forced tool calls need llguidance")
    first = (
        await client.post("/v1/responses", json=CALLS | {"tool_choice": {"type": "function", "name": "get_time"}})
    ).json()
    (call,) = first["output"]
    answer = {"type": "function_call_output", "call_id": call["call_id"], "output": "12:00"}
    follow = BASE | {"input": [answer], "previous_response_id": first["id"], "tools": [TIME]}
    r = await client.post("/v1/responses", json=follow)
    assert r.status_code == 200, r.text  # the tool message answers a call the stored turn holds
    Response.model_validate(r.json())


async def test_with_tools_on_auto_a_text_answer_streams_as_a_message_equal_to_the_whole_answer(client):
    request = BASE | {"input": "Weather?", "tools": [WEATHER]}  # the fake writes no call: text comes back
    whole = (await client.post("/v1/responses", json=request)).json()
    events = events_of((await client.post("/v1/responses", json=request | {"stream": True})).text)
    for payload in events:
        TypeAdapter(ResponseStreamEvent).validate_python(payload)
    assert [item["type"] for item in whole["output"]] == ["message"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == whole["output"][0]["content"][0]["text"] == events[-1]["response"]["output"][0]["content"][0]["text"]
    assert events[2]["type"] == "response.output_item.added" and events[2]["item"]["type"] == "message"


# -- against OpenAI's own schemas (the vendored OpenAPI document) -----------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"input": "Say hi"},
        {"input": "", "temperature": 0, "user": "u-1"},  # an empty answer: Schemathesis found nulls here
        {"input": "Weather?", "tools": [WEATHER], "tool_choice": "required", "max_output_tokens": 120},
    ],
    ids=["text", "empty", "function-call"],
)
async def test_bodies_and_every_stream_event_validate_against_openais_response_schemas(client, extra):
    if "tools" in extra:
        pytest.importorskip("llguidance", reason="forced tool calls need llguidance")
    body = (await client.post("/v1/responses", json=BASE | extra)).json()
    problems = [e.message for e in openai_schema("Response").iter_errors(body)]
    assert not problems, problems
    events = events_of((await client.post("/v1/responses", json=BASE | extra | {"stream": True})).text)
    stream_event = openai_schema("ResponseStreamEvent")
    for event in events:
        assert stream_event.is_valid(event), event["type"]
