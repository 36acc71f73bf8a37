"""Chat templates: render a list of chat messages into the prompt text a model was trained on.

Templates are Jinja2, as model bundles ship them (``chat_template`` in tokenizer_config.json,
``chat_template.jinja`` or GGUF metadata). They come with a downloaded model, so they are
treated as untrusted code:

- they run in jinja2's immutable sandbox: a template reads what it is given and nothing else;
- every render has a **budget**: a deadline (:data:`RENDER_SECONDS`, or less when the request's
  own timeout is nearer) and a size (:data:`MAX_RENDER_CHARS` characters, for the output and
  for any string or list the template builds). The sandbox's hooks (calls, attribute and item
  access, the ``*``, ``**`` and ``%`` operators), every loop iteration, every ``~`` join and
  every filter check the budget, so a template with nested ``range`` loops, string doubling or
  ``lipsum(n=10**7)`` stops within the deadline, before it allocates past the size, with a
  :class:`~infer.errors.ChatTemplateError` instead of a hang or a ``MemoryError``;
- :func:`check_template` compiles a template and renders one small conversation under the
  budget, so a model whose template is broken or runs away is refused when it is loaded.

The environment matches the one templates are written for: blocks trimmed,
``raise_exception(msg)``, ``strftime_now(fmt)`` and a ``tojson`` that keeps non-ASCII text as is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn, final

from infer.errors import ChatTemplateError, InvalidParameterError

if TYPE_CHECKING:
    from jinja2 import Template

__all__ = ["MAX_RENDER_CHARS", "RENDER_SECONDS", "check_template", "render_chat", "validate_messages"]

#: Seconds one render may take. Real chat templates render in well under a millisecond per
#: message; a second leaves room for long conversations on a loaded machine.
RENDER_SECONDS = 1.0
#: Most characters a render may output, and the longest string or list it may build on the way.
MAX_RENDER_CHARS = 8 * 1024 * 1024
#: Widths and counts a template may ask of a filter or string method (``center(n)``, ``"%99d"``).
_MAX_WIDTH = 100_000
# Budget checks between two hand-overs of the GIL during a long render.
_YIELD_EVERY = 256
# A printf or str.format width/precision of 6+ digits would allocate past any sane prompt.
_WIDE_FORMAT = re.compile(r"%[-#0 +]*(\d{6,}|\d*\.\d{6,})|\{[^{}]*:[^{}]*\d{6,}[^{}]*\}")

_budget: ContextVar[_Budget | None] = ContextVar("infer_chat_budget", default=None)


@final
class _Budget:
    """The deadline and size limit of one render."""

    __slots__ = ("deadline", "max_chars", "seconds", "ticks")

    def __init__(self, seconds: float, max_chars: int) -> None:
        self.seconds = seconds
        self.max_chars = max_chars
        self.deadline = time.monotonic() + seconds
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if not self.ticks % _YIELD_EVERY:
            # A long render is pure Python and holds the GIL; handing it over now and then
            # keeps the server's event loop (and /health) responsive while renders run.
            time.sleep(0)
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(
                f"the chat template did not finish rendering within {self.seconds:g} s; "
                "it loops too long for these messages (fix the model's chat template)"
            )

    def size(self, value: object) -> None:
        if isinstance(value, str | bytes | list | tuple) and len(value) > self.max_chars:
            self.too_big(len(value))

    def too_big(self, size: int) -> NoReturn:
        raise ChatTemplateError(
            f"the chat template built a value of {size} items, past the limit of {self.max_chars}; "
            "it grows strings or lists without bound (fix the model's chat template)"
        )


def _current() -> _Budget:
    budget = _budget.get()
    if budget is None:  # the compiled templates are private to this module, which always sets one
        raise ChatTemplateError("chat templates render only through infer.chat.render_chat")
    return budget


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    timeout: float | None = None,
    max_chars: int = MAX_RENDER_CHARS,
    **extra: Any,
) -> str:
    """Render ``messages`` (each with string ``role`` and ``content``) with the Jinja ``template``.

    ``add_generation_prompt`` appends the opening of an assistant turn; ``bos_token`` and
    ``eos_token`` are the strings templates refer to by those names; ``extra`` reaches the
    template as further variables (``tools``, ``documents``, ``enable_thinking``...).
    The render stops after ``timeout`` seconds (at most :data:`RENDER_SECONDS`) or when it
    builds more than ``max_chars`` characters.

    Raises :class:`~infer.errors.ChatTemplateError` when there is no template, it fails or it
    runs past its budget, and :class:`~infer.errors.InvalidParameterError` naming the first
    malformed message field.
    """
    if not template:
        raise ChatTemplateError("this model has no chat template; pass a plain prompt instead of chat messages")
    checked = validate_messages(messages)
    seconds = RENDER_SECONDS if timeout is None else min(RENDER_SECONDS, timeout)
    compiled = _compile(template)
    return _render(
        compiled,
        _Budget(seconds, max_chars),
        messages=checked,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **extra,
    )


def check_template(template: str) -> None:
    """Compile ``template`` and render a one-message conversation under the render budget.

    Raises :class:`~infer.errors.ChatTemplateError` when the template is not valid Jinja, or
    runs past its budget or fails with an error of its own kind on a plain conversation. A
    template's deliberate refusal (``raise_exception``) is allowed: it judges real messages.
    """
    compiled = _compile(template)
    with contextlib.suppress(_Refused):
        _render(
            compiled,
            _Budget(RENDER_SECONDS, MAX_RENDER_CHARS),
            messages=[{"role": "user", "content": "Hello"}],
            add_generation_prompt=True,
            bos_token="",
            eos_token="",
        )


class _Refused(ChatTemplateError):
    """The template called ``raise_exception``: a refusal of these messages, not a broken template."""


def _render(compiled: Template, budget: _Budget, **variables: Any) -> str:
    from jinja2 import TemplateError

    token = _budget.set(budget)
    parts: list[str] = []
    size = 0
    try:
        for part in compiled.generate(**variables):
            size += len(part)
            if size > budget.max_chars:
                budget.too_big(size)
            budget.tick()
            parts.append(part)
    except ChatTemplateError:
        raise
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed to render: {exc}") from exc
    except RecursionError:
        raise ChatTemplateError("the chat template recursed too deeply (fix the model's chat template)") from None
    except (MemoryError, OverflowError) as exc:
        raise ChatTemplateError(
            f"the chat template ran out of room ({type(exc).__name__}: {exc}); fix the model's chat template"
        ) from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
        raise ChatTemplateError(f"the chat template failed to render: {type(exc).__name__}: {exc}") from exc
    finally:
        _budget.reset(token)
    return "".join(parts)


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check that ``messages`` is a non-empty list of mappings with string ``role`` and ``content``.

    An assistant message may carry OpenAI ``tool_calls`` (a list) with ``content`` ``None``.

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
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidParameterError(f"messages[{n}].role", role, "a non-empty string")
        calls = message.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, Sequence) or isinstance(calls, str)):
            raise InvalidParameterError(f"messages[{n}].tool_calls", calls, "a list, on assistant messages only")
        if content is None and calls:
            # An assistant turn that only calls tools: templates test content, so give them "".
            content = ""
        if not isinstance(content, str):
            raise InvalidParameterError(f"messages[{n}].content", content, "a string")
        checked.append({**message, "content": content})
    return checked


# --------------------------------------------------------------------------- the budgeted sandbox

# str methods that allocate in proportion to an integer argument.
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


@lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2 import nodes
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BudgetedEnvironment(ImmutableSandboxedEnvironment):
        """The immutable sandbox, with the render budget checked in every hook it offers."""

        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            budget = _current()
            budget.tick()
            _check_call(budget, __obj, args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
            budget.size(result)
            return result

        def getattr(self, obj: Any, attribute: str) -> Any:
            _current().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _current().tick()
            return super().getitem(obj, argument)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _current()
            budget.tick()
            _check_binop(budget, operator, left, right)
            result = super().call_binop(context, operator, left, right)
            budget.size(result)
            return result

        def wrap_str_format(self, value: Any) -> Any:
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:  # `text.format` / `text.format_map`: refuse huge widths before the call
                _check_format(value.__self__)
            return wrapped

        def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
            tree: nodes.Template = super()._parse(source, name, filename)
            # Every loop iterates through the budget and every `~` join is measured: loops and
            # joins are the template constructs that run or grow without calling anything.
            for loop in tree.find_all(nodes.For):
                loop.iter = nodes.Filter(loop.iter, "_infer_budget_iter", [], [], None, None, lineno=loop.lineno)
            for concat in list(tree.find_all(nodes.Concat)):
                inner = nodes.Concat(concat.nodes, lineno=concat.lineno)
                concat.nodes = [nodes.Filter(inner, "_infer_budget_size", [], [], None, None, lineno=concat.lineno)]
            return tree

    env = BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    for name, func in list(env.filters.items()):
        env.filters[name] = _budgeted_filter(func, formats=name == "format")
    env.filters["tojson"] = _budgeted_filter(_tojson)
    env.filters["_infer_budget_iter"] = _budget_iter
    env.filters["_infer_budget_size"] = _budget_size
    env.globals["lipsum"] = _lipsum
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(template: str) -> Template:
    from jinja2 import TemplateSyntaxError

    try:
        compiled: Template = _environment().from_string(template)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {exc.lineno}): {exc.message}") from exc
    except RecursionError:
        raise ChatTemplateError("the chat template nests too deeply to compile") from None
    return compiled


def _budget_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    budget = _current()
    for item in iterable:
        budget.tick()
        yield item


def _budget_size(value: str) -> str:
    budget = _current()
    budget.tick()
    budget.size(value)
    return value


def _budgeted_filter(func: Callable[..., Any], *, formats: bool = False) -> Callable[..., Any]:
    # Arguments after the filtered value are the ones that ask for widths and counts; a filter
    # marked pass_context/pass_environment receives that object first.
    skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marks
    def budgeted(*args: Any, **kwargs: Any) -> Any:
        budget = _current()
        budget.tick()
        _check_widths(args[skip:], kwargs)
        if formats and isinstance(args[0], str):
            _check_format(args[0])  # the `format` filter's pattern is its value
        result = func(*args, **kwargs)
        budget.size(result)
        return result

    return budgeted


def _check_widths(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_WIDTH:
            raise ChatTemplateError(
                f"the chat template asked for a width or count of {value}, past the limit of {_MAX_WIDTH}"
            )


def _check_format(text: str) -> None:
    if _WIDE_FORMAT.search(text):
        raise ChatTemplateError(f"the chat template formats with a width past {_MAX_WIDTH} characters")


def _check_call(budget: _Budget, obj: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(obj, "__name__", "")
    if name in _WIDTH_METHODS:
        _check_widths(args, kwargs)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = owner.count(args[0]) if args[0] else len(owner) + 1
        if len(owner) + count * len(args[1]) > budget.max_chars:
            budget.too_big(len(owner) + count * len(args[1]))
    elif name == "join" and args and isinstance(args[0], list | tuple):
        items = args[0]
        total = len(owner) * len(items) + sum(len(i) for i in items if isinstance(i, str))
        if total > budget.max_chars:
            budget.too_big(total)


def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > budget.max_chars:
                budget.too_big(len(seq) * n)
    elif operator == "**":
        if isinstance(right, int | float) and isinstance(left, int | float) and abs(right) > 1024 and abs(left) > 1:
            raise ChatTemplateError(f"the chat template raises {left!r} to the power {right!r}, past the limit of 1024")
    elif operator == "%":
        if isinstance(left, str):
            _check_format(left)
    elif (
        operator == "+"
        and isinstance(left, str | list | tuple)
        and isinstance(right, str | list | tuple)
        and len(left) + len(right) > budget.max_chars
    ):
        budget.too_big(len(left) + len(right))


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    from jinja2.utils import generate_lorem_ipsum

    for name, value in (("n", n), ("min", min), ("max", max)):
        if not isinstance(value, int) or not 0 <= value <= 1000:
            raise ChatTemplateError(f"lipsum({name}={value!r}) in the chat template: expected an integer in [0, 1000]")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; prompts are not HTML.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _raise_exception(message: str) -> NoReturn:
    raise _Refused(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
