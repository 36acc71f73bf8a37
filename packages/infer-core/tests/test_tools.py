"""Tool calling helpers: validation, prompt plans, call grammars and parsing model output."""

from __future__ import annotations

import json
import re

import pytest

import infer
from infer.errors import InvalidParameterError
from infer.tools import (
    Tool,
    call_grammar,
    check_tool_choice,
    check_tools,
    detect_format,
    parse_tool_calls,
    prepare_messages,
)

pytestmark = pytest.mark.unit

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_WITH_TOOLS = "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}" + CHATML
LLAMA3_WITH_TOOLS = "{% if tools %}{{ tools | tojson }}{% endif %}<|python_tag|>ipython" + CHATML


def test_no_tools_and_an_empty_list_both_mean_no_tools():
    assert check_tools(None) == () == check_tools([])


@pytest.mark.parametrize(
    ("tools", "field"),
    [
        ("get_weather", "tools"),
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tools[0].function.parameters"),
    ],
)
def test_malformed_tools_are_refused_naming_the_field(tools, field):
    with pytest.raises(InvalidParameterError) as caught:
        check_tools(tools)
    assert caught.value.parameter == field


def test_tool_choice_defaults_to_auto_with_tools_and_must_name_a_given_tool():
    tools = check_tools([WEATHER, TIME])
    assert check_tool_choice(None, tools) == "auto"
    assert check_tool_choice(None, ()) == "none"
    named = check_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools)
    assert isinstance(named, Tool) and named.name == "get_time"
    with pytest.raises(InvalidParameterError, match="get_weather"):
        check_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)
    with pytest.raises(InvalidParameterError):
        check_tool_choice("required", ())


def test_the_format_follows_the_template():
    assert detect_format(CHATML) == ("hermes", False)
    assert detect_format(CHATML_WITH_TOOLS) == ("hermes", True)
    assert detect_format(LLAMA3_WITH_TOOLS) == ("llama3", True)


def test_a_native_template_gets_the_tools_and_untouched_messages():
    messages = [{"role": "user", "content": "weather?"}]
    plan = prepare_messages(CHATML_WITH_TOOLS, messages, check_tools([WEATHER]))
    assert plan.native and plan.messages == messages
    assert plan.template_vars["tools"][0]["function"]["name"] == "get_weather"


def test_a_template_without_tools_gets_them_in_a_system_message_and_calls_as_plain_turns():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
    ]
    plan = prepare_messages(CHATML, messages, check_tools([WEATHER]))
    assert not plan.native and plan.template_vars == {}
    assert plan.messages[0]["content"].startswith("Be brief.") and "get_weather" in plan.messages[0]["content"]
    assert plan.messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    }
    assert plan.messages[3] == {"role": "user", "content": '<tool_response>\n{"temp": 3}\n</tool_response>'}


def test_hermes_output_splits_into_content_and_calls():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, "hermes")
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert calls[0].as_openai()["id"].startswith("call_")


def test_a_malformed_call_stays_in_the_content():
    text = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(text, "hermes") == (text, [])


def test_llama3_output_with_or_without_the_python_tag_is_one_call():
    for text in ('<|python_tag|>{"name": "get_time", "parameters": {}}', '{"name": "get_time", "parameters": {}}'):
        content, calls = parse_tool_calls(text, "llama3")
        assert content is None and [c.name for c in calls] == ["get_time"]
    assert parse_tool_calls("It is noon.", "llama3") == ("It is noon.", [])


@pytest.mark.parametrize("fmt", ["hermes", "llama3"])
def test_required_choice_forces_one_valid_call_of_a_given_tool(fake, fmt):
    tools = check_tools([WEATHER, TIME])
    fmt_spec = call_grammar(tools, "required", fmt)
    assert fmt_spec is not None
    for seed in range(4):
        reply = fake.generate("x", response_format=fmt_spec, temperature=1.0, seed=seed, max_tokens=200)
        assert reply.finish_reason == "stop", reply.text
        content, calls = parse_tool_calls(reply.text, fmt)
        assert content is None and len(calls) == 1
        assert calls[0].name in {"get_weather", "get_time"}
        arguments = json.loads(calls[0].arguments)
        if calls[0].name == "get_weather":
            assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f")
        else:
            assert arguments == {}


def test_a_named_choice_calls_that_tool_only(fake):
    tools = check_tools([WEATHER, TIME])
    spec = call_grammar(
        tools, check_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools), "hermes"
    )
    reply = fake.generate("x", response_format=spec, temperature=1.0, seed=9, max_tokens=200)
    assert re.fullmatch(r'<tool_call>\n\{"name": "get_time", "arguments": \{\}\}\n</tool_call>', reply.text)


def test_auto_and_none_leave_output_free():
    tools = check_tools([WEATHER])
    assert call_grammar(tools, "auto", "hermes") is None
    assert call_grammar(tools, "none", "hermes") is None


def test_the_tool_types_are_importable_from_infer_tools():
    assert infer.tools.ToolCall is not None


# -- through Model.generate --------------------------------------------------------------------------


def test_generate_with_a_required_tool_returns_the_call_and_finish_reason_tool_calls(fake):
    reply = fake.generate(
        messages=[{"role": "user", "content": "weather in Oslo?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=1.0,
        seed=5,
        max_tokens=200,
    )
    assert reply.finish_reason == "tool_calls" and reply.text == ""
    assert len(reply.tool_calls) == 1 and reply.tool_calls[0].name in {"get_weather", "get_time"}
    json.loads(reply.tool_calls[0].arguments)


def test_a_conversation_with_earlier_calls_and_tool_results_renders_and_continues(fake):
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
    ]
    reply = fake.generate(messages=messages, tools=[TIME], temperature=0, max_tokens=4)
    assert reply.usage.prompt_tokens > 0 and reply.finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_none_sends_no_tools_and_parses_nothing(fake):
    plain = fake.generate(messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=8)
    none = fake.generate(
        messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=8
    )
    assert none.token_ids == plain.token_ids and none.tool_calls == ()


def test_tools_with_a_plain_prompt_or_a_forced_call_with_a_response_format_are_refused(fake):
    with pytest.raises(InvalidParameterError, match="messages"):
        fake.generate("hi", tools=[WEATHER])
    with pytest.raises(InvalidParameterError) as caught:
        fake.generate(
            messages=[{"role": "user", "content": "hi"}],
            tools=[WEATHER],
            tool_choice="required",
            response_format={"type": "json_object"},
        )
    assert caught.value.parameter == "response_format"


def test_an_assistant_message_with_tool_calls_must_be_an_assistant_turn(fake):
    with pytest.raises(InvalidParameterError) as caught:
        fake.generate(messages=[{"role": "user", "content": "x", "tool_calls": []}], tools=[WEATHER])
    assert caught.value.parameter == "messages[0].tool_calls"
