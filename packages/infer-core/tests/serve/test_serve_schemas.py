"""Request bodies: what the schemas accept, and the field each refusal names."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")

from infer.serve.errors import APIError
from infer.serve.schemas import parse_chat, parse_completion, parse_json

pytestmark = pytest.mark.unit

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": "m", "prompt": "hi"}


def refused(parse, body) -> APIError:
    with pytest.raises(APIError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


def test_a_minimal_chat_request_generates_up_to_the_context_by_default():
    req = parse_chat(CHAT)
    assert req.endpoint == "chat"
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.sampling == {"max_tokens": None}
    assert not req.stream


def test_a_minimal_completion_request_defaults_to_16_tokens():
    req = parse_completion(TEXT)
    assert req.prompt == "hi"
    assert req.sampling["max_tokens"] == 16


def test_sampling_fields_map_onto_sampling_params_names():
    req = parse_chat(
        CHAT
        | {
            "temperature": 0.5,
            "top_p": 0.9,
            "max_completion_tokens": 7,
            "stop": "x",
            "seed": 3,
            "presence_penalty": 0.1,
            "frequency_penalty": -0.2,
            "logit_bias": {"12": -100, "7": 2.5},
            "logprobs": True,
            "top_logprobs": 2,
        }
    )
    assert req.sampling == {
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 7,
        "stop": ("x",),
        "seed": 3,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
        "logit_bias": {12: -100.0, 7: 2.5},
        "logprobs": True,
        "top_logprobs": 2,
    }
    assert req.fields["max_tokens"] == "max_completion_tokens"


def test_completions_logprobs_integer_becomes_top_logprobs():
    req = parse_completion(TEXT | {"logprobs": 3})
    assert req.sampling["logprobs"] is True
    assert req.sampling["top_logprobs"] == 3
    assert req.error_names["top_logprobs"] == "logprobs"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (CHAT | {"temperature": "hot"}, "temperature"),
        (CHAT | {"max_tokens": 1.5}, "max_tokens"),
        (CHAT | {"max_tokens": True}, "max_tokens"),
        (CHAT | {"seed": "1"}, "seed"),
        (CHAT | {"stream": "yes"}, "stream"),
        (CHAT | {"stop": 3}, "stop"),
        (CHAT | {"stop": ["a", 1]}, "stop"),
        (CHAT | {"logit_bias": [1, 2]}, "logit_bias"),
        (CHAT | {"logit_bias": {"abc": 1}}, "logit_bias"),
        (CHAT | {"logit_bias": {"1": "x"}}, "logit_bias.1"),
        (CHAT | {"n": 17}, "n"),
        (CHAT | {"n": 0}, "n"),
        (TEXT | {"prompt": ["a"] * 10, "n": 7}, "n"),
        (CHAT | {"top_logprobs": 2}, "top_logprobs"),
        (CHAT | {"logprobs": 1}, "logprobs"),
        (CHAT | {"tools": {"type": "function"}}, "tools"),
        (CHAT | {"response_format": "json"}, "response_format"),
        (CHAT | {"response_format": {"type": "xml"}}, "response_format.type"),
        (CHAT | {"regex": ""}, "regex"),
        (CHAT | {"guided_json": "{}"}, "guided_json"),
        (CHAT | {"response_format": {"type": "json_object"}, "grammar": "start: 'a'"}, "grammar"),
        (CHAT | {"seed": 2**64}, "seed"),
        (CHAT | {"seed": -(2**63) - 1}, "seed"),
        (CHAT | {"stream_options": {"include_usage": True}}, "stream_options"),
        (CHAT | {"stream": True, "stream_options": {"other": 1}}, "stream_options.other"),
        (CHAT | {"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        (CHAT | {"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
        ({"messages": CHAT["messages"]}, "model"),
        (CHAT | {"model": 7}, "model"),
        ({"model": "m"}, "messages"),
        (CHAT | {"messages": "hi"}, "messages"),
        (CHAT | {"messages": []}, "messages"),
        (CHAT | {"messages": ["hi"]}, "messages[0]"),
        (CHAT | {"messages": [{"content": "x"}]}, "messages[0].role"),
        (CHAT | {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (CHAT | {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            CHAT | {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}]},
            "messages[0].tool_calls[0].function.name",
        ),
        (
            CHAT
            | {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"function": {"name": "f", "arguments": "{"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (CHAT | {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
        (CHAT | {"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, "messages[0].tool_calls"),
        (CHAT | {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        (TEXT | {"logprobs": 6}, "logprobs"),
        (TEXT | {"logprobs": True}, "logprobs"),
        (TEXT | {"prompt": ["a", 3]}, "prompt[1]"),
        (TEXT | {"prompt": ["a"] * 65}, "prompt"),
        (TEXT | {"prompt": []}, "prompt"),
        (TEXT | {"prompt": {"a": 1}}, "prompt"),
        (TEXT | {"prompt": [1, "a"]}, "prompt[0]"),
        (TEXT | {"echo": "yes"}, "echo"),
        (TEXT | {"suffix": 3}, "suffix"),
        (TEXT | {"best_of": 3}, "best_of"),
        ({"model": "m"}, "prompt"),
    ],
)
def test_a_malformed_field_is_refused_naming_it(body, param):
    completions = "prompt" in body or param == "prompt"
    assert refused(parse_completion if completions else parse_chat, body).param == param


def test_unknown_fields_are_ignored_and_listed_unless_strict():
    req = parse_chat(CHAT | {"reasoning_effort": "low", "frobnicate": 1, "temperature": 0})
    assert req.ignored == ("reasoning_effort", "frobnicate")
    assert req.sampling["temperature"] == 0
    assert parse_completion(TEXT | {"x_vendor": True}).ignored == ("x_vendor",)
    error = refused(lambda body: parse_chat(body, strict=True), CHAT | {"frobnicate": 1})
    assert (error.param, error.code) == ("frobnicate", "unknown_parameter")
    assert refused(lambda body: parse_completion(body, strict=True), TEXT | {"x_vendor": 1}).param == "x_vendor"


def test_unsupported_openai_fields_are_refused_even_when_not_strict():
    assert refused(parse_chat, CHAT | {"functions": [{"name": "f"}]}).code == "unsupported_parameter"
    assert refused(parse_chat, CHAT | {"audio": {"voice": "x"}}).code == "unsupported_parameter"


def test_null_means_unset_for_every_field_and_an_empty_tool_list_is_no_tools():
    nulls = dict.fromkeys(
        (
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "audio",
            "response_format",
            "seed",
            "stop",
            "logit_bias",
            "n",
            "parallel_tool_calls",
            "stream_options",
        )
    )
    req = parse_chat(CHAT | nulls)
    assert (req.tools, req.tool_choice, req.response_format) == (None, None, None)
    assert req.sampling == {"max_tokens": None}
    empty = parse_chat(CHAT | {"tools": [], "tool_choice": "auto"})
    assert (empty.tools, empty.tool_choice) == (None, None)


def test_lenient_values_integral_floats_int64_seeds_top_p_zero_and_empty_stops():
    req = parse_chat(CHAT | {"max_tokens": 5.0, "n": 1.0, "seed": -1, "top_p": 0, "stop": ["", "x", ""]})
    assert req.max_tokens == 5 and isinstance(req.max_tokens, int)
    assert req.sampling["seed"] == 2**64 - 1  # read modulo 2**64: still one seed, still deterministic
    assert req.sampling["temperature"] == 0.0 and "top_p" not in req.sampling  # top_p 0 is greedy
    assert req.sampling["stop"] == ("x",)
    assert "stop" not in parse_chat(CHAT | {"stop": ""}).sampling
    assert parse_chat(CHAT | {"seed": 2**63 - 1}).sampling["seed"] == 2**63 - 1


def test_documented_openai_fields_are_accepted_without_a_warning_even_when_strict():
    documented = {
        "safety_identifier": "s",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "verbosity": "low",
        "store": False,
        "service_tier": "auto",
        "user": "u",
        "parallel_tool_calls": True,
    }
    req = parse_chat(
        CHAT | documented | {"stream": True, "stream_options": {"include_obfuscation": False}}, strict=True
    )
    assert req.ignored == () and req.user == "u"


@pytest.mark.parametrize(
    ("extra", "expected", "field"),
    [
        ({"response_format": {"type": "json_object"}}, {"type": "json_object"}, "response_format"),
        ({"response_format": {"type": "text"}}, None, None),
        ({"regex": "[ab]+"}, {"type": "regex", "pattern": "[ab]+"}, "regex"),
        ({"guided_regex": "a"}, {"type": "regex", "pattern": "a"}, "guided_regex"),
        ({"grammar": "start: 'a'"}, {"type": "grammar", "grammar": "start: 'a'"}, "grammar"),
        (
            {"guided_json": {"type": "integer"}},
            {"type": "json_schema", "json_schema": {"name": "schema", "schema": {"type": "integer"}}},
            "guided_json",
        ),
    ],
)
def test_an_output_constraint_comes_from_response_format_or_one_extension_field(extra, expected, field):
    req = parse_completion(TEXT | extra)
    assert req.response_format == expected
    assert req.fields.get("response_format") == field


def test_tool_messages_and_assistant_tool_calls_are_kept_for_the_template():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    req = parse_chat(
        CHAT
        | {
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "auto",
        }
    )
    assert req.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert req.messages[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    assert req.tool_choice == "auto" and req.tools is not None


def test_chat_template_kwargs_are_checked_and_kept():
    req = parse_chat(CHAT | {"chat_template_kwargs": {"enable_thinking": False}})
    assert req.template_kwargs == {"enable_thinking": False}
    assert refused(parse_chat, CHAT | {"chat_template_kwargs": [1]}).param == "chat_template_kwargs"
    reserved = CHAT | {"chat_template_kwargs": {"messages": []}}
    assert refused(parse_chat, reserved).param == "chat_template_kwargs.messages"
    assert refused(parse_chat, CHAT | {"chat_template_kwargs": {"a-b": 1}}).param == "chat_template_kwargs"


def test_content_parts_join_into_one_text():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = parse_chat(CHAT | {"messages": [{"role": "user", "content": parts}]})
    assert req.messages == [{"role": "user", "content": "a\nb"}]


def test_developer_role_is_a_system_message_and_null_extras_are_ignored():
    req = parse_chat(
        CHAT | {"messages": [{"role": "developer", "content": "be brief", "name": "ops", "refusal": None}]}
    )
    assert req.messages == [{"role": "system", "content": "be brief", "name": "ops"}]


def test_a_prompt_array_is_a_batch_of_prompts_strings_or_token_ids():
    req = parse_completion(TEXT | {"prompt": ["a", [1, 2], "b"]})
    assert req.prompts == ("a", [1, 2], "b")


def test_echo_with_max_tokens_zero_scores_the_prompt_only_and_suffix_is_kept():
    req = parse_completion(TEXT | {"echo": True, "max_tokens": 0, "logprobs": 1, "suffix": "end"})
    assert req.echo and req.max_tokens == 0 and req.suffix == "end"


def test_completion_prompt_forms_one_string_or_token_ids():
    assert parse_completion(TEXT | {"prompt": ["x"]}).prompt == "x"
    assert parse_completion(TEXT | {"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert parse_completion(TEXT | {"prompt": [[4, 5]]}).prompt == [4, 5]


def test_include_usage_needs_stream():
    req = parse_chat(CHAT | {"stream": True, "stream_options": {"include_usage": True}})
    assert req.stream and req.include_usage


def test_caller_description_fields_and_default_values_of_unsupported_ones_are_accepted():
    req = parse_chat(CHAT | {"user": "u1", "metadata": {"a": "b"}, "n": 1, "parallel_tool_calls": False})
    assert req.user == "u1"
    assert req.sampling == {"max_tokens": None}
    assert parse_completion(TEXT | {"echo": False, "best_of": 1, "suffix": None}).prompt == "hi"


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[1, 2]",
        b'"text"',
        b"\xff\xfe{}",
        b'{"model": NaN}',
        b'{"a": Infinity}',
        b"[" * 100_000 + b"]" * 100_000,
        b"",
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400(body):
    with pytest.raises(APIError) as info:
        parse_json(body)
    assert info.value.status == 400
    assert info.value.code == "invalid_json"


def test_parse_json_returns_the_object():
    assert parse_json(json.dumps(CHAT).encode()) == CHAT
