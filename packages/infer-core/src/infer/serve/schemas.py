"""Request bodies: JSON in, a checked :class:`GenerationRequest` out, or a 400 naming the field.

The server checks the *shape* of a request here (JSON types, which fields exist, the features
it does not offer); the *ranges* of sampling values are checked by
:class:`infer.SamplingParams`, whose errors the app maps back onto the request's field names.
Fields OpenAI's API accepts but this server cannot honour (``audio``, ``best_of`` > 1...) are refused
by name rather than ignored; an explicit ``null`` means "not set" for every field. Fields no
API here knows (extensions of other servers, such as ``reasoning_effort``) are ignored and
listed in :attr:`GenerationRequest.ignored`, so the app can log them; with ``strict=True`` they
are refused, as OpenAI does.
``chat_template_kwargs`` (vLLM's and llama.cpp's extension) reaches the chat template.

Structured output: ``response_format`` takes OpenAI's ``text``, ``json_object`` and
``json_schema`` (with ``strict``), plus two extension types, ``{"type": "regex", "pattern": ...}``
and ``{"type": "grammar", "grammar": ...}`` (Lark or GBNF). The same constraints may come as the
extension fields other servers use: ``regex`` and ``grammar`` (llama.cpp's name), ``guided_json``,
``guided_regex`` and ``guided_grammar`` (vLLM's). One constraint per request.

Lenient where OpenAI's API allows it and nothing is lost: integers written as ``5.0``, any
int64 ``seed`` (a negative one is read modulo 2**64), ``top_p: 0`` as greedy decoding, empty stop
strings dropped, and the documented fields that describe the caller or the account
(``user``, ``safety_identifier``, ``store``, ``service_tier``, ``prompt_cache_key``...) accepted
without effect.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn, final

from infer.serve.errors import APIError
from infer.speculative import MODES

__all__ = [
    "GenerationRequest",
    "TokenizeRequest",
    "parse_chat",
    "parse_completion",
    "parse_detokenize",
    "parse_json",
    "parse_responses",
    "parse_tokenize",
]

Endpoint = Literal["chat", "completions", "responses"]

#: Most stop strings one request may give (OpenAI allows 4; more only costs the matcher).
MAX_STOP_STRINGS = 16
#: Most ``logprobs`` alternatives of the completions API (OpenAI's limit).
MAX_COMPLETION_LOGPROBS = 5
#: Chat roles the server accepts; ``developer`` is OpenAI's newer name for ``system``.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
#: ``response_format`` types: OpenAI's three, and the two extensions of :mod:`infer.structured`.
RESPONSE_FORMAT_TYPES = frozenset({"text", "json_object", "json_schema", "regex", "grammar"})
#: Extension fields naming a constraint -> the ``response_format`` each stands for.
_CONSTRAINT_FIELDS = {
    "regex": ("regex", "pattern"),
    "grammar": ("grammar", "grammar"),
    "guided_regex": ("regex", "pattern"),
    "guided_grammar": ("grammar", "grammar"),
    "guided_json": ("json_schema", "json_schema"),
}
#: The largest seed OpenAI's API admits (int64); negative ones are read modulo 2**64.
_SEED_RANGE = (-(2**63), 2**64 - 1)

# Fields accepted and deliberately without effect on the generation: they describe the caller,
# the account or OpenAI's own storage. (``prompt_cache_key`` routes requests to the replica that
# holds their cached prefix on Ray Serve, see infer.serve.routing; one server's prefix cache is
# found by the prompt's tokens alone.)
_IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "verbosity",
        "parallel_tool_calls",
    }
)
# Fields of OpenAI's API this server does not implement; refused by name.
_UNSUPPORTED = frozenset(
    {
        "functions",
        "function_call",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        "best_of",
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
        "speculative",
        *_CONSTRAINT_FIELDS,
        *_NUMBERS,
    }
)
_CHAT = _COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "chat_template_kwargs",
    "tools",
    "tool_choice",
}
# Variables the server itself gives a chat template; chat_template_kwargs may not replace them.
_TEMPLATE_RESERVED = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "tools"})
_COMPLETIONS = _COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}
#: Most prompts one ``/v1/completions`` request may batch (each is a choice).
MAX_PROMPTS = 64
#: Most choices per prompt (``n``).
MAX_N = 16


@final
@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A checked request of either generation endpoint."""

    #: Which endpoint it came to (decides the response format).
    endpoint: Endpoint
    #: The model the client asked for.
    model: str
    #: Completions: the prompts (text or token ids), one choice each. Empty for chat.
    prompts: tuple[str | list[int], ...]
    #: Chat: messages with string ``role`` and ``content`` (and ``tool_calls``, ``tool_call_id``).
    #: ``None`` for completions.
    messages: list[dict[str, Any]] | None
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
    #: The output constraint (a ``response_format`` value), compiled against the model by the app.
    response_format: dict[str, Any] | None = None
    #: Chat and Responses: ``tools`` and ``tool_choice`` in the chat shape (checked by :func:`infer.tools.plan_tools`).
    tools: list[Any] | None = None
    tool_choice: Any = None
    #: The ``user`` field, for the server's log.
    user: str | None = None
    #: Completions: answer with the prompt before the generated text (and its logprobs).
    echo: bool = False
    #: Completions: text after the insertion point (fill-in-the-middle).
    suffix: str | None = None
    #: Responses: the system text put before the conversation (``instructions``).
    instructions: str | None = None
    #: Responses: the stored response whose conversation this request continues.
    previous_response_id: str | None = None
    #: Responses: keep this response's conversation for later ``previous_response_id``.
    store: bool = True
    #: Choices per prompt (``n``).
    n: int = 1
    #: Responses: the caller's ``metadata``, returned in the response object.
    metadata: dict[str, str] | None = None
    #: The ``speculative`` extension (``"auto"``, ``"ngram"``, ``"off"``): this request's
    #: speculative decoding instead of the server's ``--speculative``; ``None``: the server's.
    speculative: str | None = None

    @property
    def engine_options(self) -> dict[str, Any]:
        """Per-request options of :meth:`infer.Model.astream` beyond sampling (``speculative``)."""
        return {} if self.speculative is None else {"speculative": self.speculative}

    @property
    def prompt(self) -> str | list[int] | None:
        """Completions: the first prompt. ``None`` for chat."""
        return self.prompts[0] if self.prompts else None

    @property
    def prompt_field(self) -> str:
        """The request field holding the prompt."""
        return {"chat": "messages", "completions": "prompt", "responses": "input"}[self.endpoint]

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
        "chat", data, prompts=(), messages=messages, sampling=sampling, names=names, max_tokens=max_tokens
    )
    tools = data.get("tools")
    if tools is not None and not isinstance(tools, list):
        _type_error("tools", "a list of tool objects", tools)
    return replace(
        request,
        template_kwargs=_template_kwargs(data.get("chat_template_kwargs")),
        ignored=ignored,
        tools=tools or None,  # [] means no tools, as null does
        tool_choice=data.get("tool_choice") if tools else None,
    )


def parse_completion(data: Mapping[str, Any], *, strict: bool = False) -> GenerationRequest:
    """Check a ``/v1/completions`` body; ``strict`` refuses unknown fields instead of ignoring them."""
    ignored = _check_fields(data, _COMPLETIONS, strict=strict)
    sampling, names = _sampling(data)
    prompts = _prompts(data.get("prompt", _MISSING))
    max_tokens = _max_tokens(data, names)
    echo = _get(data, "echo", bool, False)
    sampling["max_tokens"] = 16 if max_tokens is None else max_tokens  # 16: the completions API's default
    if max_tokens == 0 and echo:
        # Scoring the prompt alone (evaluation harnesses): nothing is generated, so no value
        # reaches the sampler; SamplingParams still needs a valid one.
        sampling["max_tokens"] = 1
    suffix = _get(data, "suffix", str, None) or None
    best_of = _get(data, "best_of", int, None)
    if best_of not in (None, 1):
        _fail(
            "best_of",
            "best_of > 1 is not supported: ask for the choices you want with n, and rank them yourself",
            code="unsupported_parameter",
        )
    logprobs = _get(data, "logprobs", int, None)
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            _fail("logprobs", f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]")
        sampling["logprobs"] = True
        sampling["top_logprobs"] = logprobs
        names["top_logprobs"] = "logprobs"
    request = _request(
        "completions", data, prompts=prompts, messages=None, sampling=sampling, names=names, max_tokens=max_tokens
    )
    return replace(request, ignored=ignored, echo=echo, suffix=suffix)


_RESPONSES = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "stream",
        "previous_response_id",
        "store",
        "metadata",
        "text",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "truncation",
        "include",
        "seed",
        "top_k",
        "speculative",
        *_NUMBERS,
    }
)
#: Responses input content part types that carry text.
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def parse_responses(data: Mapping[str, Any], *, strict: bool = False) -> GenerationRequest:
    """Check a ``/v1/responses`` body (text, function tools, ``text.format``); ``strict`` refuses unknown fields."""
    ignored = _check_fields(data, _RESPONSES, strict=strict)
    sampling, names = _sampling(data)
    max_tokens = _get(data, "max_output_tokens", int, None)
    sampling["max_tokens"] = max_tokens
    names["max_tokens"] = "max_output_tokens"
    messages = _response_input(data.get("input", _MISSING))
    tools = _response_tools(data.get("tools"))
    for i in range(len(tools)):  # the core checks the chat shape; errors name the Responses fields
        names[f"tools[{i}].function"] = f"tools[{i}]"
        for key in ("name", "description", "parameters"):
            names[f"tools[{i}].function.{key}"] = f"tools[{i}].{key}"
    truncation = data.get("truncation")
    if truncation not in (None, "disabled"):
        _fail("truncation", "only truncation 'disabled' is supported: a prompt too long for the context is a 400")
    metadata = data.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()) or len(metadata) > 16
    ):
        _type_error("metadata", "an object of at most 16 string values", metadata)
    names["response_format"] = "text.format"  # where a schema that does not compile came from
    request = _request(
        "responses",
        {"model": data.get("model", _MISSING), "stream": data.get("stream"), "speculative": data.get("speculative")},
        prompts=(),
        messages=messages,
        sampling=sampling,
        names=names,
        max_tokens=max_tokens,
    )
    return replace(
        request,
        ignored=ignored,
        response_format=_text_format(data.get("text")),
        instructions=_get(data, "instructions", str, None),
        previous_response_id=_get(data, "previous_response_id", str, None),
        store=_get(data, "store", bool, True),
        metadata=metadata,
        user=data["user"][:64] if isinstance(data.get("user"), str) else None,
        tools=tools or None,
        tool_choice=_response_tool_choice(data.get("tool_choice")) if tools else None,
    )


def _response_tools(value: object) -> list[dict[str, Any]]:
    """Responses ``tools`` (flat function tools) in the chat shape :func:`infer.tools.plan_tools` checks."""
    if value is None:
        return []
    if not isinstance(value, list):
        _type_error("tools", "a list of function tools", value)
    out = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            _unsupported_type(
                f"tools[{i}]", kind, "only function tools are served here: hosted tools run on OpenAI's servers"
            )
        assert isinstance(tool, dict)
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _response_tool_choice(value: object) -> object:
    """Responses ``tool_choice`` in the chat shape: ``{"type": "function", "name": N}`` names a function."""
    if isinstance(value, dict) and value.get("type") == "function" and "function" not in value:
        return {"type": "function", "function": {"name": value.get("name")}}
    return value


def _response_input(value: object) -> list[dict[str, Any]]:
    """Responses ``input`` (a string, or message items) as chat messages."""
    if value is _MISSING:
        _fail("input", "input is required: a string or a list of messages", code="missing_required_parameter")
    if isinstance(value, str):
        return [{"role": "user", "content": _utf8("input", value)}]
    if not isinstance(value, list) or not value:
        _type_error("input", "a string or a non-empty list of messages", value)
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            _type_error(where, "a message object with role and content", item)
        kind = item.get("type", "message")
        if kind == "function_call":
            _function_call_item(item, where, messages)
            continue
        if kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                _type_error(f"{where}.call_id", "the call_id of the function_call it answers", item.get("call_id"))
            output = _response_text(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
            continue
        if kind != "message":
            _unsupported_type(
                where, kind, "only message, function_call and function_call_output input items are served"
            )
        content = _response_text(item.get("content"), f"{where}.content")
        messages.append({"role": item.get("role"), "content": content})
    return _messages(messages)


def _unsupported_type(where: str, kind: object, served: str) -> NoReturn:
    """A 400 naming ``where.type``, quoting the type sent (cut short) and what is served instead."""
    shown = kind[:40] if isinstance(kind, str) else _kind(kind)
    _fail(f"{where}.type", f"type {shown!r} is not supported: {served}", code="unsupported_parameter")


def _response_text(value: object, where: str) -> object:
    """Text parts (``input_text``, ``output_text``) joined by newlines; a string or other value as it is."""
    if not isinstance(value, list):
        return value
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str) or kind not in _TEXT_PARTS:  # a dict "type" is unhashable
            _fail(
                f"{where}[{j}]",
                "only text content parts (input_text, output_text) are supported",
                code="unsupported_parameter",
            )
        texts.append(part.get("text"))
    return "\n".join(t if isinstance(t, str) else "" for t in texts)


def _function_call_item(item: dict[str, Any], where: str, messages: list[dict[str, Any]]) -> None:
    """A Responses ``function_call`` input item: a call on the assistant turn before it (or a new turn)."""
    call = {
        "id": _get(item, "call_id", str, None, prefix=f"{where}."),
        "type": "function",
        "function": {
            "name": _get(item, "name", str, None, prefix=f"{where}."),
            "arguments": _get(item, "arguments", str, None, prefix=f"{where}."),
        },
    }
    missing = [key for key in ("call_id", "name", "arguments") if item.get(key) is None]
    if missing:
        _fail(f"{where}.{missing[0]}", f"a function_call item needs {missing[0]}", code="missing_required_parameter")
    last = messages[-1] if messages else None
    if last is not None and last.get("role") == "assistant":
        last.setdefault("tool_calls", []).append(call)  # parallel calls, or text then calls: one turn
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _text_format(value: object) -> dict[str, Any] | None:
    """Responses ``text.format`` as a chat ``response_format``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        _type_error("text", "an object such as {'format': {'type': 'text'}}", value)
    fmt = value.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        _fail("text.format", "text.format.type must be 'text', 'json_object' or 'json_schema'")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    spec = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}


@final
@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    """A checked ``/tokenize`` body (vLLM's shape): text, or chat messages rendered by the template."""

    #: The model named, if any.
    model: str | None
    prompt: str | None
    messages: list[dict[str, Any]] | None
    #: Text: add the tokenizer's special tokens (BOS...). Chat: end with the assistant's opening.
    add_special_tokens: bool
    add_generation_prompt: bool
    template_kwargs: dict[str, Any]


def parse_tokenize(data: Mapping[str, Any]) -> TokenizeRequest:
    """Check a ``/tokenize`` body: ``prompt`` or ``messages``, and the options vLLM takes."""
    known = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "chat_template_kwargs"}
    _check_fields(data, frozenset(known), strict=False)
    has_prompt, has_messages = data.get("prompt") is not None, data.get("messages") is not None
    if has_prompt == has_messages:
        _fail("prompt", "give exactly one of prompt (text) and messages (chat)", code="missing_required_parameter")
    return TokenizeRequest(
        model=_get(data, "model", str, None),
        prompt=_get(data, "prompt", str, None),
        messages=_messages(data["messages"]) if has_messages else None,
        add_special_tokens=_get(data, "add_special_tokens", bool, True),
        add_generation_prompt=_get(data, "add_generation_prompt", bool, True),
        template_kwargs=_template_kwargs(data.get("chat_template_kwargs")),
    )


def parse_detokenize(data: Mapping[str, Any]) -> tuple[str | None, list[int]]:
    """Check a ``/detokenize`` body: the model named (if any) and the token ids."""
    _check_fields(data, frozenset({"model", "tokens"}), strict=False)
    tokens = data.get("tokens", _MISSING)
    if tokens is _MISSING:
        _fail("tokens", "tokens is required: a list of token ids", code="missing_required_parameter")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        _type_error("tokens", "a list of token ids", tokens)
    return _get(data, "model", str, None), list(tokens)


# --------------------------------------------------------------------------- pieces


class _Missing:
    pass


_MISSING: Any = _Missing()


def _request(
    endpoint: Endpoint,
    data: Mapping[str, Any],
    *,
    prompts: tuple[str | list[int], ...],
    messages: list[dict[str, Any]] | None,
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
            if key not in ("include_usage", "include_obfuscation"):
                _fail(f"stream_options.{key}", f"unrecognized stream option {key!r}")
        include_usage = _get(options, "include_usage", bool, False, prefix="stream_options.")
    user = data.get("user")
    n = _get(data, "n", int, 1)
    if not 1 <= n <= MAX_N:
        _fail("n", f"n must be an integer in [1, {MAX_N}], got {n}")
    if endpoint == "completions" and n * len(prompts) > MAX_PROMPTS:
        _fail("n", f"n={n} choices for each of {len(prompts)} prompts is more than {MAX_PROMPTS} in one request")
    constraint_field, response_format = _response_format(data)
    if constraint_field is not None:
        names["response_format"] = constraint_field
    speculative = _get(data, "speculative", str, None)
    if speculative not in (None, *MODES):
        _fail("speculative", f"speculative must be one of {list(MODES)}, got {speculative[:40]!r}")
    return GenerationRequest(
        speculative=speculative,
        user=user[:64] if isinstance(user, str) else None,
        n=n,
        response_format=response_format,
        endpoint=endpoint,
        model=model,
        prompts=prompts,
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
            if data[key] is None:
                continue  # null means unset
            if key == "best_of" and data[key] == 1:
                continue
            if key in ("functions", "function_call"):
                _fail(
                    key,
                    f"{key} is OpenAI's deprecated form of tools; send tools and tool_choice instead",
                    code="unsupported_parameter",
                )
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
    if sampling.get("top_p") == 0:
        # OpenAI reads top_p 0 as "only the most likely token": greedy decoding.
        del sampling["top_p"]
        sampling["temperature"] = 0.0
    for name, kind in (("seed", int), ("top_k", int), ("ignore_eos", bool)):
        value = _get(data, name, kind, None)
        if value is not None:
            sampling[name] = value
    seed = sampling.get("seed")
    if seed is not None:
        if not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
            _fail("seed", f"seed must be a 64-bit integer, got {seed}")
        sampling["seed"] = seed % 2**64  # a seed still picks one stream; -1 is as good as any
    stop = data.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            _type_error("stop", "a string or a list of strings", stop)
        if len(stops) > MAX_STOP_STRINGS:
            _fail("stop", f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        for s in stops:
            _utf8("stop", s)
        stops = [s for s in stops if s]  # an empty stop string can never end anything
        if stops:
            sampling["stop"] = tuple(stops)
    bias = data.get("logit_bias")
    if bias is not None:
        sampling["logit_bias"] = _logit_bias(bias)
    return sampling, names


def _response_format(data: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The request's one output constraint and the field that gave it (``None``, ``None``: none)."""
    given: list[tuple[str, dict[str, Any]]] = []
    value = data.get("response_format")
    if value is not None:
        if not isinstance(value, dict):
            _type_error("response_format", "an object such as {'type': 'json_object'}", value)
        kind = value.get("type")
        if kind not in RESPONSE_FORMAT_TYPES:
            _fail(
                "response_format.type",
                f"response_format.type must be one of {sorted(RESPONSE_FORMAT_TYPES)}, not {kind!r}",
            )
        if kind != "text":
            given.append(("response_format", value))
    for name, (kind, key) in _CONSTRAINT_FIELDS.items():
        text = data.get(name)
        if text is None:
            continue
        if kind == "json_schema":
            if not isinstance(text, dict):
                _type_error(name, "a JSON schema object", text)
            given.append((name, {"type": kind, key: {"name": "schema", "schema": text}}))
        else:
            if not isinstance(text, str) or not text:
                _type_error(name, "a non-empty string", text)
            given.append((name, {"type": kind, key: _utf8(name, text)}))
    if len(given) > 1:
        _fail(given[1][0], f"give one output constraint per request, not both {given[0][0]} and {given[1][0]}")
    return given[0] if given else (None, None)


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


def _messages(value: object) -> list[dict[str, Any]]:
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
        calls = message.get("tool_calls") or None  # null and [] both mean no calls
        content = message.get("content")
        entry: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            # An assistant turn that only calls tools has no content (OpenAI sends null).
            "content": "" if content is None and calls and role == "assistant" else _content(content, where),
        }
        for key, extra in message.items():
            if key in ("role", "content") or extra is None:
                continue
            if key in ("name", "tool_call_id"):
                if not isinstance(extra, str):
                    _type_error(f"{where}.{key}", "a string", extra)
                entry[key] = _utf8(f"{where}.{key}", extra)
            elif key == "tool_calls":
                if role != "assistant":
                    _fail(f"{where}.tool_calls", "only assistant messages carry tool_calls")
                if calls:
                    entry["tool_calls"] = _tool_calls(extra, f"{where}.tool_calls")
            elif key == "refusal" and role == "assistant":
                continue  # the model's own earlier refusal text: nothing to render
            else:
                _fail(f"{where}.{key}", f"message field {key!r} is not supported", code="unsupported_parameter")
        if role == "tool" and "tool_call_id" not in entry:
            _fail(
                f"{where}.tool_call_id",
                "a tool message needs the tool_call_id it answers",
                code="missing_required_parameter",
            )
        checked.append(entry)
    return checked


def _tool_calls(value: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        _type_error(where, "a list of tool calls", value)
    calls = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            _type_error(f"{at}.function", "an object with name and arguments", function)
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str):
            _type_error(f"{at}.function.name", "a string", name)
        if not isinstance(arguments, str):
            _type_error(f"{at}.function.arguments", "a string of JSON", arguments)
        try:
            json.loads(arguments)
        except ValueError:
            _fail(f"{at}.function.arguments", "function.arguments must be a JSON text (the model's own output)")
        call_id = call.get("id")
        calls.append(
            {
                "id": call_id if isinstance(call_id, str) else f"call_{j}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return calls


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


def _prompts(value: object) -> tuple[str | list[int], ...]:
    """A prompt, or a batch of them: a string, token ids, or a list of either."""
    if value is _MISSING:
        _fail("prompt", "prompt is required", code="missing_required_parameter")
    if isinstance(value, str):
        return (_utf8("prompt", value),)
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return (list(value),)
    if isinstance(value, list) and value:
        if len(value) > MAX_PROMPTS:
            _fail("prompt", f"a request may batch at most {MAX_PROMPTS} prompts, got {len(value)}")
        prompts: list[str | list[int]] = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                prompts.append(_utf8(f"prompt[{i}]", item))
            elif isinstance(item, list) and all(_is_int(t) for t in item):
                prompts.append(list(item))
            else:
                _type_error(f"prompt[{i}]", "a string or a list of token ids", item)
        return tuple(prompts)
    _type_error("prompt", "a string, a list of token ids, or a list of those", value)


def _get(data: Mapping[str, Any], name: str, kind: type, default: Any, *, prefix: str = "") -> Any:
    value = data.get(name, default)
    if value is default or value is None:
        return default
    if kind is float:
        ok = _is_number(value)
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 5.0: JSON has one number type, and some clients write every number so
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
