"""Rendering chat templates: SmolLM2's template, the sandbox, helpers, and message validation."""

from __future__ import annotations

from typing import Any

import pytest

from infer.chat import render_chat, validate_messages
from infer.errors import ChatTemplateError, InvalidParameterError, RequestError

pytestmark = pytest.mark.unit

# The template shipped in SmolLM2-135M-Instruct's GGUF metadata.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_smollm2_template_adds_its_default_system_prompt_when_none_is_given() -> None:
    prompt = render_chat(SMOLLM2, [{"role": "user", "content": "What is 2+2?"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_template_keeps_a_given_system_prompt() -> None:
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    prompt = render_chat(SMOLLM2, messages, add_generation_prompt=False)
    assert prompt == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert "SmolLM" not in prompt


def test_bos_eos_and_extra_variables_reach_the_template() -> None:
    template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}|{{ greeting }}"
    assert render_chat(
        template, [{"role": "user", "content": "x"}], bos_token="<s>", eos_token="</s>", greeting="hi"
    ) == ("<s>x</s>|hi")


def test_blocks_are_trimmed_like_model_templates_expect() -> None:
    template = "{% for m in messages %}\n  {{ m['content'] }}\n{% endfor %}"
    assert render_chat(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "  a\n  b\n"


def test_tojson_keeps_unicode_and_angle_brackets() -> None:
    out = render_chat("{{ messages[0] | tojson }}", [{"role": "user", "content": "<b>café</b>"}])
    assert out == '{"role": "user", "content": "<b>café</b>"}'


def test_raise_exception_in_a_template_becomes_chat_template_error() -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}ok"
    with pytest.raises(ChatTemplateError, match="first turn must be user") as info:
        render_chat(template, [{"role": "assistant", "content": "hi"}])
    assert isinstance(info.value, RequestError)


def test_strftime_now_formats_the_current_date() -> None:
    out = render_chat("{{ strftime_now('%Y') }}", [{"role": "user", "content": "x"}])
    assert out.isdigit() and len(out) == 4


def test_loop_controls_are_available() -> None:
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}"
    assert render_chat(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a"


def test_sandbox_blocks_attribute_escapes() -> None:
    template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat(template, [{"role": "user", "content": "x"}])


def test_immutable_sandbox_refuses_to_modify_messages() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])


def test_invalid_jinja_raises_chat_template_error_with_the_line() -> None:
    with pytest.raises(ChatTemplateError, match="line 2"):
        render_chat("ok\n{% for %}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template", [None, ""])
def test_missing_template_raises_chat_template_error(template: str | None) -> None:
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(template, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "parameter"),
    [
        ([], "messages"),
        ("hello", "messages"),
        ({"role": "user", "content": "x"}, "messages"),
        (["hello"], "messages[0]"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], "messages[1].content"),
        ([{"role": "", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": None}], "messages[0].content"),
    ],
)
def test_malformed_messages_raise_invalid_parameter_naming_the_field(messages: Any, parameter: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        render_chat(SMOLLM2, messages)
    assert info.value.parameter == parameter


def test_validated_messages_are_copies() -> None:
    original = [{"role": "user", "content": "x"}]
    copies = validate_messages(original)
    copies[0]["content"] = "changed"
    assert original[0]["content"] == "x"
