"""Chat templates: render a list of chat messages into the prompt text a model was trained on.

Templates are Jinja2, as model bundles ship them (``chat_template`` in tokenizer_config.json or
``chat_template.jinja``). They come with the model, so they run in jinja2's immutable sandbox:
a template can read what it is given and nothing else. The environment matches the one
templates are written for: blocks trimmed, ``raise_exception(msg)``, ``strftime_now(fmt)`` and
a ``tojson`` that keeps non-ASCII text as is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn

from infer.errors import ChatTemplateError, InvalidParameterError

if TYPE_CHECKING:
    from jinja2 import Template

__all__ = ["render_chat", "validate_messages"]


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render ``messages`` (each with string ``role`` and ``content``) with the Jinja ``template``.

    ``add_generation_prompt`` appends the opening of an assistant turn; ``bos_token`` and
    ``eos_token`` are the strings templates refer to by those names; ``extra`` reaches the
    template as further variables (``tools``, ``documents``...).

    Raises :class:`~infer.errors.ChatTemplateError` when there is no template or it fails, and
    :class:`~infer.errors.InvalidParameterError` naming the first malformed message field.
    """
    if not template:
        raise ChatTemplateError("this model has no chat template; pass a plain prompt instead of chat messages")
    checked = validate_messages(messages)
    from jinja2 import TemplateError

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=checked,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except ChatTemplateError:
        raise
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed to render: {exc}") from exc


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check that ``messages`` is a non-empty list of mappings with string ``role`` and ``content``.

    Returns plain-dict copies (templates may not mutate what the caller passed). Raises
    :class:`~infer.errors.InvalidParameterError` naming the bad field, e.g. ``messages[2].content``.
    """
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise InvalidParameterError("messages", messages, "a list of {'role': str, 'content': str} mappings")
    if not messages:
        raise InvalidParameterError("messages", messages, "at least one message")
    checked = []
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidParameterError(f"messages[{n}]", message, "a mapping with 'role' and 'content'")
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str):
                raise InvalidParameterError(f"messages[{n}].{key}", value, "a string")
        if not message["role"]:
            raise InvalidParameterError(f"messages[{n}].role", message["role"], "a non-empty string")
        checked.append(dict(message))
    return checked


@lru_cache(maxsize=16)
def _compile(template: str) -> Template:
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {exc.lineno}): {exc.message}") from exc


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; prompts are not HTML.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
