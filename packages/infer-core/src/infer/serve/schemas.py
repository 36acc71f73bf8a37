"""Request bodies: JSON in, a checked :class:`GenerationRequest` out, or a 400 naming the field.

The server checks the *shape* of a request here (JSON types, which fields exist, the features
it does not offer); the *ranges* of sampling values are checked by
:class:`infer.SamplingParams`, whose errors the app maps back onto the request's field names.
Fields OpenAI's API accepts but this server cannot honour (``tools``, ``n`` > 1, ``echo``...)
are refused by name rather than ignored. Fields no API here knows (extensions of other servers,
such as ``reasoning_effort``) are ignored and listed in :attr:`GenerationRequest.ignored`, so
the app can log them; with ``strict=True`` they are refused, as OpenAI does.
``chat_template_kwargs`` (vLLM's and llama.cpp's extension) reaches the chat template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn, final

from infer.serve.errors import APIError

__all__ = ["GenerationRequest", "parse_chat", "parse_completion", "parse_json"]

Endpoint = Literal["chat", "completions"]

#: Most stop strings one request may give (OpenAI allows 4; more only costs the matcher).
MAX_STOP_STRINGS = 16
#: Most ``logprobs`` alternatives of the completions API (OpenAI's limit).
MAX_COMPLETION_LOGPROBS = 5
#: Chat roles the server accepts; ``developer`` is OpenAI's newer name for ``system``.
ROLES = frozenset({"system", "developer", "user", "assistant"})

# Fields accepted and deliberately without effect: they describe the caller, not the generation.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier"})
# Fields of OpenAI's API this server does not implement; refused by name.
_UNSUPPORTED = frozenset(
    {
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        "best_of",
        "echo",
        "suffix",
    }
)
# SamplingParams fields reachable as request fields of the same name, and their JSON types.
_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty")
_COMMON = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "n",
        "seed",
        "stop",
        "logit_bias",
        "top_k",
        "ignore_eos",
        "response_format",
        *_NUMBERS,
    }
)
_CHAT = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "chat_template_kwargs"}
# Variables the server itself gives a chat template; chat_template_kwargs may not replace them.
_TEMPLATE_RESERVED = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token"})
_COMPLETIONS = _COMMON | {"prompt", "logprobs"}


@final
@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A checked request of either generation endpoint."""

    #: Which endpoint it came to (decides the response format).
    endpoint: Endpoint
    #: The model the client asked for.
    model: str
    #: Completions: prompt text or token ids. ``None`` for chat.
    prompt: str | list[int] | None
    #: Chat: messages with string ``role`` and ``content``. ``None`` for completions.
    messages: list[dict[str, str]] | None
    #: Keyword arguments for :class:`infer.SamplingParams`.
    sampling: dict[str, Any]
    #: Answer as server-sent events.
    stream: bool = False
    #: Send a final usage chunk in a stream.
    include_usage: bool = False
    #: The ``max_tokens`` the client asked for, under whichever field name (``None``: not given).
    max_tokens: int | None = None
    #: Core parameter name -> the request field that set it, for error messages.
    fields: dict[str, str] = field(default_factory=dict)
    #: Chat: extra variables for the chat template (``chat_template_kwargs``).
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Unknown top-level fields that were ignored (not strict), in request order.
    ignored: tuple[str, ...] = ()

    @property
    def prompt_field(self) -> str:
        """The request field holding the prompt."""
        return "messages" if self.endpoint == "chat" else "prompt"

    @property
    def error_names(self) -> dict[str, str]:
        """Core parameter name -> request field, for mapping the core's errors (the prompt included)."""
        return {"prompt": self.prompt_field, **self.fields}


def parse_json(body: bytes) -> dict[str, Any]:
    """Decode a request body; a 400 for anything but a UTF-8 JSON object."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_json") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {_kind(data)}", code="invalid_json")
    return data


def parse_chat(data: Mapping[str, Any], *, strict: bool = False) -> GenerationRequest:
    """Check a ``/v1/chat/completions`` body; ``strict`` refuses unknown fields instead of ignoring them."""
    ignored = _check_fields(data, _CHAT, strict=strict)
    sampling, names = _sampling(data)
    messages = _messages(data.get("messages", _MISSING))
    max_tokens = _max_tokens(data, names)
    sampling["max_tokens"] = max_tokens  # None: up to the context length, as OpenAI's chat API does
    if _get(data, "logprobs", bool, False):
        sampling["logprobs"] = True
        top = _get(data, "top_logprobs", int, None)
        if top is not None:
            sampling["top_logprobs"] = top
    elif data.get("top_logprobs") is not None:
        _fail("top_logprobs", "top_logprobs needs logprobs: true")
    request = _request(
        "chat", data, prompt=None, messages=messages, sampling=sampling, names=names, max_tokens=max_tokens
    )
    return replace(request, template_kwargs=_template_kwargs(data.get("chat_template_kwargs")), ignored=ignored)


def parse_completion(data: Mapping[str, Any], *, strict: bool = False) -> GenerationRequest:
    """Check a ``/v1/completions`` body; ``strict`` refuses unknown fields instead of ignoring them."""
    ignored = _check_fields(data, _COMPLETIONS, strict=strict)
    sampling, names = _sampling(data)
    prompt = _prompt(data.get("prompt", _MISSING))
    max_tokens = _max_tokens(data, names)
    sampling["max_tokens"] = 16 if max_tokens is None else max_tokens  # 16: the completions API's default
    logprobs = _get(data, "logprobs", int, None)
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            _fail("logprobs", f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]")
        sampling["logprobs"] = True
        sampling["top_logprobs"] = logprobs
        names["top_logprobs"] = "logprobs"
    request = _request(
        "completions", data, prompt=prompt, messages=None, sampling=sampling, names=names, max_tokens=max_tokens
    )
    return replace(request, ignored=ignored)


# --------------------------------------------------------------------------- pieces


class _Missing:
    pass


_MISSING: Any = _Missing()


def _request(
    endpoint: Endpoint,
    data: Mapping[str, Any],
    *,
    prompt: str | list[int] | None,
    messages: list[dict[str, str]] | None,
    sampling: dict[str, Any],
    names: dict[str, str],
    max_tokens: int | None,
) -> GenerationRequest:
    model = _get(data, "model", str, _MISSING)
    if model is _MISSING:
        _fail("model", "model is required: the name GET /v1/models lists", code="missing_required_parameter")
    stream = _get(data, "stream", bool, False)
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not stream:
            _fail("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict):
            _type_error("stream_options", "an object", options)
        for key in options:
            if key != "include_usage":
                _fail(f"stream_options.{key}", f"unrecognized stream option {key!r}")
        include_usage = _get(options, "include_usage", bool, False, prefix="stream_options.")
    return GenerationRequest(
        endpoint=endpoint,
        model=model,
        prompt=prompt,
        messages=messages,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        fields=names,
    )


def _check_fields(data: Mapping[str, Any], known: frozenset[str], *, strict: bool) -> tuple[str, ...]:
    ignored = []
    for key in data:
        if key in known or key in _IGNORED:
            continue
        if key in _UNSUPPORTED:
            if key == "best_of" and data[key] in (None, 1):
                continue
            if key in ("echo", "parallel_tool_calls") and data[key] in (None, False):
                continue
            if key == "suffix" and data[key] is None:
                continue
            _fail(key, f"{key} is not supported by this server", code="unsupported_parameter")
        if strict:
            _fail(key, f"unrecognized request argument supplied: {key}", code="unknown_parameter")
        ignored.append(key)
    return tuple(ignored)


def _template_kwargs(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _type_error("chat_template_kwargs", "an object of template variables", value)
    for key in value:
        if key in _TEMPLATE_RESERVED:
            _fail(f"chat_template_kwargs.{key}", f"{key} is set by the server and cannot be replaced")
        if not key.isidentifier():
            _fail("chat_template_kwargs", f"template variable names are identifiers, got {key[:40]!r}")
    return dict(value)


def _sampling(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    sampling: dict[str, Any] = {}
    names: dict[str, str] = {}
    for name in _NUMBERS:
        value = _get(data, name, float, None)
        if value is not None:
            sampling[name] = value
    for name, kind in (("seed", int), ("top_k", int), ("ignore_eos", bool)):
        value = _get(data, name, kind, None)
        if value is not None:
            sampling[name] = value
    n = _get(data, "n", int, None)
    if n is not None and n != 1:
        _fail("n", f"n={n} is not supported: this server returns one choice per request (n=1)")
    stop = data.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            _type_error("stop", "a string or a list of strings", stop)
        if len(stops) > MAX_STOP_STRINGS:
            _fail("stop", f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        for s in stops:
            _utf8("stop", s)
        if stops:
            sampling["stop"] = tuple(stops)
    bias = data.get("logit_bias")
    if bias is not None:
        sampling["logit_bias"] = _logit_bias(bias)
    response_format = data.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        _fail("response_format", "only response_format {'type': 'text'} is supported", code="unsupported_parameter")
    return sampling, names


def _logit_bias(value: object) -> dict[int, float]:
    if not isinstance(value, dict):
        _type_error("logit_bias", "an object mapping token ids (as strings) to numbers", value)
    bias: dict[int, float] = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except ValueError:
            _fail("logit_bias", f"logit_bias keys must be token ids written as decimal strings, got {key[:40]!r}")
        if not _is_number(amount):
            _type_error(f"logit_bias.{key}", "a number", amount)
        bias[token] = float(amount)
    return bias


def _max_tokens(data: Mapping[str, Any], names: dict[str, str]) -> int | None:
    legacy: int | None = _get(data, "max_tokens", int, None)
    current: int | None = _get(data, "max_completion_tokens", int, None)
    if legacy is not None and current is not None and legacy != current:
        _fail("max_tokens", "give max_tokens or max_completion_tokens, not two different values")
    if current is not None:
        names["max_tokens"] = "max_completion_tokens"
    return current if current is not None else legacy


def _messages(value: object) -> list[dict[str, str]]:
    if value is _MISSING:
        _fail("messages", "messages is required", code="missing_required_parameter")
    if not isinstance(value, list):
        _type_error("messages", "a list of message objects", value)
    if not value:
        _fail("messages", "messages must hold at least one message")
    checked = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            _type_error(where, "an object with role and content", message)
        role = message.get("role", _MISSING)
        if role is _MISSING:
            _fail(f"{where}.role", "each message needs a role", code="missing_required_parameter")
        if not isinstance(role, str) or role not in ROLES:
            _fail(f"{where}.role", f"unsupported role {role!r}: expected one of {sorted(ROLES)}")
        entry = {"role": "system" if role == "developer" else role, "content": _content(message.get("content"), where)}
        for key, extra in message.items():
            if key in ("role", "content") or extra is None:
                continue
            if key != "name":
                _fail(f"{where}.{key}", f"message field {key!r} is not supported", code="unsupported_parameter")
            if not isinstance(extra, str):
                _type_error(f"{where}.name", "a string", extra)
            entry["name"] = _utf8(f"{where}.name", extra)
        checked.append(entry)
    return checked


def _content(value: object, where: str) -> str:
    if isinstance(value, str):
        return _utf8(f"{where}.content", value)
    if not isinstance(value, list):
        _type_error(f"{where}.content", "a string or a list of text parts", value)
    texts = []
    for j, part in enumerate(value):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            _type_error(at, "an object {'type': 'text', 'text': ...}", part)
        if part.get("type") != "text":
            _fail(f"{at}.type", f"content part type {part.get('type')!r} is not supported: only 'text'")
        text = part.get("text")
        if not isinstance(text, str):
            _type_error(f"{at}.text", "a string", text)
        texts.append(_utf8(f"{at}.text", text))
    return "\n".join(texts)


def _prompt(value: object) -> str | list[int]:
    if value is _MISSING:
        _fail("prompt", "prompt is required", code="missing_required_parameter")
    if isinstance(value, str):
        return _utf8("prompt", value)
    if isinstance(value, list):
        if value and all(_is_int(t) for t in value):
            return list(value)
        if len(value) == 1 and isinstance(value[0], str):
            return _utf8("prompt", value[0])
        if len(value) == 1 and isinstance(value[0], list) and all(_is_int(t) for t in value[0]):
            return list(value[0])
        if len(value) > 1 and all(isinstance(v, (str, list)) for v in value):
            _fail("prompt", "only one prompt per request is supported (a batch of prompts needs n choices)")
    _type_error("prompt", "a string, a list of token ids, or a list holding one of those", value)


def _get(data: Mapping[str, Any], name: str, kind: type, default: Any, *, prefix: str = "") -> Any:
    value = data.get(name, default)
    if value is default or value is None:
        return default
    if kind is float:
        ok = _is_number(value)
    elif kind is int:
        ok = _is_int(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        _type_error(
            prefix + name, {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[kind], value
        )
    if kind is str:
        _utf8(prefix + name, value)
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _utf8(name: str, text: str) -> str:
    # JSON escapes can spell lone surrogates ("\ud800"), which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        _fail(
            name, f"{name} holds an unpaired surrogate (\\u{ord(text[_first_surrogate(text)]):04x}): not valid Unicode"
        )
    return text


def _first_surrogate(text: str) -> int:
    return next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF)


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _type_error(name: str, expected: str, value: object) -> NoReturn:
    raise APIError(400, f"{name} must be {expected}, not {_kind(value)}", param=name, code="invalid_type")


def _fail(name: str, message: str, *, code: str = "invalid_value") -> NoReturn:
    raise APIError(400, message, param=name, code=code)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")
