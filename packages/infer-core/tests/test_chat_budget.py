"""Chat templates are untrusted code: every render runs under a time and size budget."""

from __future__ import annotations

import time

import pytest

import infer.chat
from infer.chat import check_template, render_chat
from infer.errors import ChatTemplateError

pytestmark = [pytest.mark.unit, pytest.mark.security]

USER = [{"role": "user", "content": "hi"}]

# Each of these hangs, eats GiBs or crashes an unbudgeted jinja2 sandbox.
HOSTILE = {
    "nested_range_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string_doubling_by_concat": (
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    ),
    "string_doubling_by_plus": (
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
    ),
    "string_multiplication": "{{ 'a' * 10**10 }}",
    "list_multiplication": "{{ ([1] * 100000) * 100000 }}",
    "lipsum": "{{ lipsum(n=10**7) }}",
    "huge_power": "{{ 2 ** (10 ** 7) }}",
    "recursive_macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "recursive_loop": "{% for i in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    "center_filter_width": "{{ 'a' | center(10**9) }}",
    "printf_width": "{{ '%0999999999d' % 1 }}",
    "format_filter_width": "{{ '%0999999999d' | format(1) }}",
    "str_format_width": "{{ '{:>999999999}'.format(1) }}",
    "str_method_width": "{{ 'a'.ljust(10**9) }}",
    "join_blowup": "{{ ('a' * 1000000).join(['a'] * 1000) }}",
    "replace_blowup": "{{ ('a' * 100000).replace('', 'b' * 100) }}",
    "output_flood": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("template", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_template_fails_with_a_typed_error_within_the_budget(template: str) -> None:
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match="chat template"):
        render_chat(template, USER)
    assert time.monotonic() - started < infer.chat.RENDER_SECONDS + 2.0


def test_time_budget_follows_the_requests_own_timeout_when_it_is_nearer() -> None:
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match=r"within 0\.2 s"):
        render_chat(HOSTILE["nested_range_loops"], USER, timeout=0.2)
    assert time.monotonic() - started < 1.0


def test_output_past_max_chars_is_refused_before_it_is_joined() -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert render_chat(template, [{"role": "user", "content": "x" * 100}], max_chars=100) == "x" * 100
    with pytest.raises(ChatTemplateError, match="past the limit of 100"):
        render_chat(template, [{"role": "user", "content": "x" * 101}], max_chars=100)


def test_budget_checks_leave_ordinary_template_features_working() -> None:
    template = (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m.role | upper }}: "
        "{{ '%s!' % m.content }} {{ '{}?'.format(m.content) }} {{ m.content | center(7) }}"
        "{{ ' ' ~ (m.content * 2) }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
        "{% for k, v in {'a': 1}.items() %} {{ k }}={{ v }}{% endfor %}{{ ' ' ~ 2 ** 10 }}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_chat(template, messages) == (
        "1/2 USER: hi! hi?    hi   hihi\n2/2 ASSISTANT: yo! yo?    yo   yoyo a=1 1024"
    )


def test_user_content_that_looks_like_a_format_width_is_rendered_as_text() -> None:
    content = "%0999999999d {:>999999999}"
    assert render_chat("{{ messages[0].content | trim }}", [{"role": "user", "content": content}]) == content


def test_check_template_refuses_invalid_or_runaway_templates() -> None:
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        check_template("{% for %}")
    with pytest.raises(ChatTemplateError, match="did not finish rendering"):
        check_template(HOSTILE["nested_range_loops"])


def test_check_template_accepts_a_template_that_refuses_some_conversations() -> None:
    check_template("{% if messages | length < 2 %}{{ raise_exception('needs two turns') }}{% endif %}ok")


def test_a_render_after_a_failed_one_has_a_fresh_budget() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(HOSTILE["nested_range_loops"], USER, timeout=0.1)
    assert render_chat("{% for i in range(1000) %}{% endfor %}{{ messages[0].content }}", USER) == "hi"
