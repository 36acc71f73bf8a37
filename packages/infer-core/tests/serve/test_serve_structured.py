"""Structured output and tool calling over HTTP: ``response_format``, the extension fields, ``tools``.

The server plans tools and compiles constraints with the core's own code, so each answer is
compared with what :meth:`infer.Model.generate` gives for the same request (same seed).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
pytest.importorskip("llguidance", reason="structured output needs llguidance")
from serve_support import sse_data

from infer.serve.formats import ToolCallHolder

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

MESSAGES = [{"role": "user", "content": "Describe a city."}]
CHAT = {"model": "fake", "messages": MESSAGES, "max_tokens": 120, "seed": 3}
CITY = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "people": {"type": "integer", "minimum": 0}},
    "required": ["name", "people"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def chunks_of(response) -> list[dict]:
    assert response.status_code == 200, response.text
    events = sse_data(response.text)
    assert events[-1] == "[DONE]"
    return events[:-1]


# -- response_format ----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_a_strict_json_schema_answer_validates_and_equals_the_python_api(client, fake_model, temperature):
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    body = ok(
        await client.post(
            "/v1/chat/completions", json=CHAT | {"response_format": response_format, "temperature": temperature}
        )
    )
    content = body["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), CITY | {"additionalProperties": False})
    expected = fake_model.generate(
        messages=MESSAGES, max_tokens=120, seed=3, temperature=temperature, response_format=response_format
    )
    assert content == expected.text
    assert body["usage"]["completion_tokens"] == expected.usage.completion_tokens  # usage counts as ever
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_json_object_mode_answers_an_object(client):
    # Seed 1 closes its object within the budget; other seeds wander in one long string (length).
    request = CHAT | {"response_format": {"type": "json_object"}, "seed": 1, "temperature": 1.0, "max_tokens": 400}
    choice = ok(await client.post("/v1/chat/completions", json=request))["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)


@pytest.mark.parametrize("field", ["regex", "guided_regex"])
async def test_the_regex_extension_field_constrains_completions(client, field):
    prompt = {"model": "fake", "prompt": "Code:", "max_tokens": 30, "seed": 1, "temperature": 1.0}
    body = ok(await client.post("/v1/completions", json=prompt | {field: "[A-Z]{3}-[0-9]{2,4}"}))
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2,4}", body["choices"][0]["text"])


async def test_a_lark_grammar_as_a_response_format_extension_type(client):
    grammar = 'start: "yes" | "no"'
    body = ok(
        await client.post(
            "/v1/chat/completions", json=CHAT | {"response_format": {"type": "grammar", "grammar": grammar}}
        )
    )
    assert body["choices"][0]["message"]["content"] in ("yes", "no")


async def test_a_constrained_stream_sends_the_same_text_as_the_whole_answer(client):
    request = CHAT | {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}}
    whole = ok(await client.post("/v1/chat/completions", json=request))
    chunks = chunks_of(await client.post("/v1/chat/completions", json=request | {"stream": True}))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wizard"}}}},
            "response_format",
        ),
        ({"grammar": "start: ("}, "grammar"),
        ({"regex": "(unclosed"}, "regex"),
    ],
)
async def test_a_constraint_that_does_not_compile_is_a_400_naming_its_field(client, extra, param):
    r = await client.post("/v1/chat/completions", json=CHAT | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]


# -- tools --------------------------------------------------------------------------------------


async def test_a_required_tool_call_comes_back_as_openai_tool_calls(client, fake_model):
    request = CHAT | {"tools": [WEATHER, TIME], "tool_choice": "required", "temperature": 1.0}
    body = ok(await client.post("/v1/chat/completions", json=request))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["refusal"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    expected = fake_model.generate(
        messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120, seed=3, temperature=1.0
    )
    assert (call["function"]["name"], call["function"]["arguments"]) == (
        expected.tool_calls[0].name,
        expected.tool_calls[0].arguments,
    )
    assert body["usage"]["prompt_tokens"] == expected.usage.prompt_tokens  # the tools are in the prompt
    tool = WEATHER if call["function"]["name"] == "get_weather" else TIME
    schema = tool["function"]["parameters"] | {"additionalProperties": False}
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


async def test_a_named_tool_choice_calls_that_tool(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    body = ok(await client.post("/v1/chat/completions", json=CHAT | {"tools": [WEATHER, TIME], "tool_choice": choice}))
    assert [c["function"]["name"] for c in body["choices"][0]["message"]["tool_calls"]] == ["get_time"]


async def test_a_streamed_tool_call_arrives_as_deltas_that_assemble_into_the_whole_answer(client):
    request = CHAT | {"tools": [WEATHER], "tool_choice": "required", "temperature": 1.0}
    whole = ok(await client.post("/v1/chat/completions", json=request))["choices"][0]
    chunks = chunks_of(await client.post("/v1/chat/completions", json=request | {"stream": True}))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk["choices"][0]["delta"].get("tool_calls") or []:
            entry = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
            entry["name"] += delta.get("function", {}).get("name") or ""
            entry["arguments"] += delta.get("function", {}).get("arguments") or ""
    expected = whole["message"]["tool_calls"]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in expected
    ]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_results_come_back_as_tool_messages(client, fake_model):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    request = {"model": "fake", "messages": messages, "tools": [TIME], "max_tokens": 5, "seed": 2}
    body = ok(await client.post("/v1/chat/completions", json=request))
    expected = fake_model.generate(messages=messages, tools=[TIME], max_tokens=5, seed=2)
    assert body["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    assert body["choices"][0]["message"]["content"] == expected.text


async def test_tool_choice_none_and_empty_or_null_tools_answer_as_plain_chat(client):
    plain = ok(await client.post("/v1/chat/completions", json=CHAT))["choices"][0]["message"]
    for extra in ({"tools": [WEATHER], "tool_choice": "none"}, {"tools": []}, {"tools": None, "tool_choice": None}):
        assert ok(await client.post("/v1/chat/completions", json=CHAT | extra))["choices"][0]["message"] == plain


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
async def test_bad_tools_are_400s_naming_the_field(client, extra, param):
    r = await client.post("/v1/chat/completions", json=CHAT | extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- holding back streamed text that may be a call ------------------------------------------------


def test_hermes_text_before_a_call_streams_and_a_partial_tag_is_held():
    holder = ToolCallHolder("hermes")
    assert holder.feed("Let me check. <tool") == "Let me check. "
    assert holder.feed("_call>") == ""
    assert holder.feed('{"name": "f", "arguments": {"a": 1}}</tool_call>') == ""
    content, calls = holder.finish()
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]


def test_hermes_text_that_only_looked_like_a_tag_is_released():
    holder = ToolCallHolder("hermes")
    assert holder.feed("a <to") == "a "
    assert holder.feed("ol> b") == "<tool> b"
    assert holder.finish() == ("", [])


def test_a_malformed_call_is_sent_as_content_at_the_end():
    holder = ToolCallHolder("hermes")
    holder.feed("<tool_call>not json</tool_call>")
    assert holder.finish() == ("<tool_call>not json</tool_call>", [])


def test_llama3_answers_that_open_like_a_call_are_held_and_others_stream():
    call = ToolCallHolder("llama3")
    assert call.feed(' {"name": "f", ') == ""
    assert call.feed('"parameters": {}}') == ""
    assert [c.name for c in call.finish()[1]] == ["f"]
    prose = ToolCallHolder("llama3")
    assert prose.feed("Hello") == "Hello"
    assert prose.feed(" {x}") == " {x}"
