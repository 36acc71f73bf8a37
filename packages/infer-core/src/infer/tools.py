"""Tool calling: OpenAI ``tools`` into the prompt, the model's calls back out as structured calls.

Two call formats, chosen from the model's chat template:

* ``hermes`` — ChatML-style models (Qwen 2/2.5/3, Hermes, SmolLM3 and others) write each call as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
* ``llama3`` — Llama 3.1+ templates ask for one JSON object ``{"name": ..., "parameters": {...}}``,
  sometimes after ``<|python_tag|>``.

A template that renders ``tools`` itself gets them as the ``tools`` variable (the Hugging Face
convention) and its messages untouched. A template that never mentions tools (SmolLM2's, for
one) cannot describe them, so :func:`prepare_messages` says so in the returned plan and writes
the tool list into a system message in the ``hermes`` format, turning earlier calls and
``role: "tool"`` results into plain turns the template can render. Callers learn which path was
taken from :attr:`ToolPlan.native`.

With ``tool_choice`` ``"required"`` or a named function, :func:`call_grammar` gives the grammar
that makes the output exactly one valid call of the allowed tools (arguments validated against
their JSON schemas); ``"auto"`` leaves the model free and :func:`parse_tool_calls` finds any calls
it wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, final

from infer.errors import InvalidParameterError
from infer.results import Completion
from infer.structured import strict_schema

__all__ = [
    "Tool",
    "ToolCall",
    "ToolPlan",
    "call_grammar",
    "check_tool_choice",
    "check_tools",
    "detect_format",
    "parse_tool_calls",
    "plan_tools",
    "prepare_messages",
    "with_tool_calls",
]

ToolFormat = Literal["hermes", "llama3"]
ToolChoice = Literal["none", "auto", "required"]

_CALL_OPEN: Final = "<tool_call>"
_CALL_CLOSE: Final = "</tool_call>"
_HERMES_CALL: Final = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PYTHON_TAG: Final = "<|python_tag|>"
#: Compact JSON inside calls: small models wander when whitespace is free.
_COMPACT: Final = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@final
@dataclass(frozen=True, slots=True)
class Tool:
    """One function the model may call (OpenAI's ``{"type": "function", "function": {...}}``)."""

    name: str
    description: str
    #: JSON schema of the arguments object.
    parameters: Mapping[str, Any]

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI shape, as templates expect ``tools`` entries."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }


@final
@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model wrote: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's ``tool_calls`` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@final
@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How a request's tools reach the prompt and how its output is read back."""

    #: The call format the output is parsed with.
    format: ToolFormat
    #: Whether the template renders the tools itself (False: a system message describes them).
    native: bool
    #: Messages to render (rewritten when the template has no tool support).
    messages: list[dict[str, Any]]
    #: Extra template variables (``tools`` for native templates).
    template_vars: dict[str, Any]


def check_tools(tools: object) -> tuple[Tool, ...]:
    """Validate OpenAI ``tools``; ``None`` or ``[]`` mean no tools. Raises InvalidParameterError naming the field."""
    if tools is None:
        return ()
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise InvalidParameterError("tools", tools, "a list of {'type': 'function', 'function': {...}} objects")
    checked: list[Tool] = []
    for n, entry in enumerate(tools):
        where = f"tools[{n}]"
        if not isinstance(entry, Mapping) or entry.get("type", "function") != "function":
            raise InvalidParameterError(f"{where}.type", entry, "'function'")
        function = entry.get("function")
        if not isinstance(function, Mapping):
            raise InvalidParameterError(f"{where}.function", function, "an object with name, description, parameters")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise InvalidParameterError(f"{where}.function.name", name, "1-64 letters, digits, '_', '.' or '-'")
        if any(t.name == name for t in checked):
            raise InvalidParameterError(f"{where}.function.name", name, "a name no other tool has")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise InvalidParameterError(f"{where}.function.description", description, "a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise InvalidParameterError(f"{where}.function.parameters", parameters, "a JSON schema object")
        checked.append(Tool(name, description, dict(parameters)))
    return tuple(checked)


def check_tool_choice(choice: object, tools: Sequence[Tool]) -> ToolChoice | Tool:
    """Validate OpenAI ``tool_choice`` against ``tools``: a mode, or the one tool it names."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise InvalidParameterError("tool_choice", choice, "'none' when no tools are given")
        return choice
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    for tool in tools:
        if tool.name == name:
            return tool
    raise InvalidParameterError(
        "tool_choice",
        choice,
        f"'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': N}}}} "
        f"with N one of {[t.name for t in tools]}",
    )


def detect_format(template: str | None) -> tuple[ToolFormat, bool]:
    """The call format a chat template asks for, and whether it renders ``tools`` itself."""
    if not template or "tools" not in template:
        return "hermes", False
    if _PYTHON_TAG in template or "ipython" in template:
        return "llama3", True
    return "hermes", True


def prepare_messages(template: str | None, messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool]) -> ToolPlan:
    """Messages and template variables that put ``tools`` (and earlier calls and results) in the prompt."""
    fmt, native = detect_format(template)
    if native:
        return ToolPlan(fmt, True, [dict(m) for m in messages], {"tools": [t.as_openai() for t in tools]})
    rewritten: list[dict[str, Any]] = []
    system = _describe(tools) if tools else ""
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role == "system" and system and not rewritten:
            rewritten.append({"role": "system", "content": f"{content}\n\n{system}"})
            system = ""
        elif role == "tool":
            rewritten.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        elif role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(_hermes_call(call) for call in message["tool_calls"])
            rewritten.append({"role": "assistant", "content": f"{content or ''}{calls}"})
        else:
            rewritten.append(dict(message))
    if system:
        rewritten.insert(0, {"role": "system", "content": system})
    return ToolPlan("hermes", False, rewritten, {})


def plan_tools(
    template: str | None,
    messages: Sequence[Mapping[str, Any]] | None,
    tools: object,
    tool_choice: object,
    response_format: object,
) -> tuple[Sequence[Mapping[str, Any]] | None, ToolFormat | None, dict[str, Any], object]:
    """Check a request's ``tools`` and ``tool_choice`` and plan its prompt and output.

    Returns the messages to render, the call format to parse the output with (``None``: no
    tools in play), the template variables to add, and the ``response_format`` to compile (the
    call grammar when ``tool_choice`` forces a call). Raises
    :class:`~infer.errors.InvalidParameterError` naming the field at fault. Both
    :meth:`infer.Model.generate` and ``infer serve`` plan their requests here.
    """
    checked = check_tools(tools)
    choice = check_tool_choice(tool_choice, checked)
    if choice == "none":
        return messages, None, {}, response_format
    if messages is None:
        raise InvalidParameterError(
            "tools", [t.name for t in checked], "chat messages (tools go through the chat template)"
        )
    from infer.chat import validate_messages

    # Checked as the caller wrote them, so errors name the caller's indices, not the rewrite's.
    plan = prepare_messages(template, validate_messages(messages), checked)
    if not plan.native:
        from infer.log import get_logger

        get_logger().info("tools.described_in_system_message", reason="the chat template does not render tools")
    grammar = call_grammar(checked, choice, plan.format)
    if grammar is not None:
        if response_format is not None:
            raise InvalidParameterError("response_format", response_format, "unset when tool_choice forces a tool call")
        response_format = grammar
    return plan.messages, plan.format, plan.template_vars, response_format


def with_tool_calls(completion: Completion, fmt: ToolFormat | None) -> Completion:
    """``completion`` with the tool calls its text makes split out (finish reason ``tool_calls``)."""
    if fmt is None:
        return completion
    content, calls = parse_tool_calls(completion.text, fmt)
    if not calls:
        return completion
    return replace(completion, text=content or "", tool_calls=tuple(calls), finish_reason="tool_calls")


def _describe(tools: Sequence[Tool]) -> str:
    listing = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    return (
        "You can use the functions listed between <tools> and </tools> when they help to answer.\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To use one, answer with its name and a JSON object of arguments between <tool_call> and </tool_call>:\n"
        '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>\n'
        "Results come back between <tool_response> and </tool_response>."
    )


def _hermes_call(call: Mapping[str, Any]) -> str:
    function = call.get("function", {})
    arguments = function.get("arguments", "{}")
    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    body = json.dumps({"name": function.get("name"), "arguments": parsed}, ensure_ascii=False)
    return f"{_CALL_OPEN}\n{body}\n{_CALL_CLOSE}"


def call_grammar(tools: Sequence[Tool], choice: ToolChoice | Tool, fmt: ToolFormat) -> dict[str, Any] | None:
    """The ``response_format`` forcing one valid call, for ``"required"`` or a named tool; else ``None``.

    Argument objects admit only the keys their schema lists (OpenAI's strict function calling).
    """
    if choice in ("none", "auto"):
        return None
    allowed = [choice] if isinstance(choice, Tool) else list(tools)
    key = "arguments" if fmt == "hermes" else "parameters"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, key: strict_schema(t.parameters)},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for t in allowed
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": _COMPACT}
    if fmt == "llama3":
        return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}
    grammar = f'start: "{_CALL_OPEN}\\n" call "\\n{_CALL_CLOSE}"\ncall: %json {json.dumps(schema)}'
    return {"type": "grammar", "grammar": grammar}


def parse_tool_calls(text: str, fmt: ToolFormat) -> tuple[str | None, list[ToolCall]]:
    """Split model output into its text content (``None`` when only calls) and the calls it makes.

    A block that is not a JSON object with a string ``name`` is left in the content, untouched:
    a model's malformed attempt is shown to the caller rather than dropped.
    """
    calls: list[ToolCall] = []
    if fmt == "hermes":
        kept: list[str] = []
        last = 0
        for match in _HERMES_CALL.finditer(text):
            call = _call(match.group(1), "arguments")
            if call is None:
                continue
            kept.append(text[last : match.start()])
            last = match.end()
            calls.append(call)
        kept.append(text[last:])
        content = "".join(kept).strip()
    else:
        body = text.strip().removeprefix(_PYTHON_TAG).strip()
        call = _call(body, "parameters") or _call(body, "arguments")
        if call is not None:
            calls.append(call)
        content = "" if call is not None else text.strip()
    return (content or None), calls


def _call(body: str, key: str) -> ToolCall | None:
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str) or key not in parsed:
        return None
    arguments = parsed[key]
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(parsed["name"], text, f"call_{uuid.uuid4().hex[:24]}")
