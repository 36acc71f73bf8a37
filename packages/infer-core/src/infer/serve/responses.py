"""OpenAI's Responses API: response objects, stream events (function calls too), stored conversations.

A ``/v1/responses`` request is checked by :func:`infer.serve.schemas.parse_responses` into the
same :class:`~infer.serve.schemas.GenerationRequest` a chat request becomes, and runs the same
way (function tools included: the chat path's tool planning and call parsing); this module gives
the answer its Responses shape. ``previous_response_id`` continues a conversation kept by
:class:`ConversationStore`: in memory, bounded (the least recently used are forgotten first),
lost on restart, as a local server's cache should be.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, final

from infer.results import Completion
from infer.serve.formats import usage_body
from infer.serve.schemas import GenerationRequest

if TYPE_CHECKING:
    from infer.tools import ToolCall

__all__ = ["DEFAULT_STORED_CONVERSATIONS", "ConversationStore", "ResponsesFormatter", "event", "function_call"]

#: Conversations kept for ``previous_response_id`` by default.
DEFAULT_STORED_CONVERSATIONS: Final = 1024


def event(payload: dict[str, Any]) -> bytes:
    """One Responses stream event: its ``type`` as the SSE event name, the payload as data."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {payload['type']}\ndata: {data}\n\n".encode()


@final
class ConversationStore:
    """Messages of stored responses by id, at most ``capacity`` of them (least recently used go first)."""

    def __init__(self, capacity: int = DEFAULT_STORED_CONVERSATIONS) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        """The conversation up to and including ``response_id``'s answer, or ``None`` if not kept."""
        with self._lock:
            messages = self._items.get(response_id)
            if messages is not None:
                self._items.move_to_end(response_id)
            return None if messages is None else list(messages)

    def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        """Keep ``messages`` under ``response_id``, forgetting the oldest past the capacity."""
        with self._lock:
            self._items[response_id] = messages
            self._items.move_to_end(response_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@final
@dataclass(slots=True)
class ResponsesFormatter:
    """Builds the response object and stream events of one ``/v1/responses`` request.

    The output is a message item (the text) and one ``function_call`` item per tool call, in that
    order; a stream opens each item as it comes: the message when its first text is sent (at
    once when no tools are in play), each call whole at the end, as the chat stream sends it.
    """

    request: GenerationRequest
    id: str
    created: int
    model: str
    _sequence: int = 0
    _message_id: str = field(default="")
    #: Output items a stream has opened so far.
    _opened: int = 0
    #: Output index of the message item once a stream opened it.
    _message_index: int | None = None

    def __post_init__(self) -> None:
        self._message_id = "msg_" + self.id.removeprefix("resp_")

    def response(self, completion: Completion | None) -> dict[str, Any]:
        """The response object: in progress (``completion`` None), completed or incomplete.

        ``completion`` carries its tool calls split out of its text (:func:`infer.tools.with_tool_calls`).
        """
        req = self.request
        sampling = req.sampling
        status, incomplete = "in_progress", None
        output: list[dict[str, Any]] = []
        usage: dict[str, Any] | None = None
        if completion is not None:
            output = self.output(completion)
            counts = usage_body(completion.usage)
            usage = {
                "input_tokens": counts["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": completion.usage.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": counts["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": counts["total_tokens"],
            }
            if completion.finish_reason == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
            else:
                status = "completed"
        fmt = req.response_format
        text_format: dict[str, Any] = {"type": "text"}
        if fmt is not None:
            spec = fmt.get("json_schema") or {}
            text_format = {"type": fmt["type"], **spec}
        tools = [_function_tool(t) for t in req.tools or ()]
        body = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": bool(tools),
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.store,
            "temperature": sampling.get("temperature", 1.0),
            "text": {"format": text_format},
            "tool_choice": _tool_choice(req.tool_choice, tools),
            "tools": tools,
            "top_p": sampling.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": req.user,
            "metadata": req.metadata or {},
        }
        # OpenAI's schema types both as non-null: absent, not null, until there is one.
        return {key: value for key, value in body.items() if value is not None or key not in ("usage", "user")}

    def output(self, completion: Completion) -> list[dict[str, Any]]:
        """The output items: the message (unless the answer is calls alone), then each call."""
        items = [self.message(completion.text, "completed")] if completion.text or not completion.tool_calls else []
        return items + [function_call(call, "completed") for call in completion.tool_calls]

    def message(self, text: str, status: str) -> dict[str, Any]:
        """The assistant's output message item."""
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {
            "id": self._message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content if status == "completed" else [],
        }

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return payload

    def opening(self) -> Iterator[dict[str, Any]]:
        """The events a stream starts with: the response created and in progress."""
        yield self._event("response.created", response=self.response(None))
        yield self._event("response.in_progress", response=self.response(None))

    def open_message(self) -> Iterator[dict[str, Any]]:
        """The message item and its text part opened (once; nothing the second time)."""
        if self._message_index is not None:
            return
        self._message_index = self._opened
        self._opened += 1
        yield self._event(
            "response.output_item.added", output_index=self._message_index, item=self.message("", "in_progress")
        )
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield self._event(
            "response.content_part.added",
            item_id=self._message_id,
            output_index=self._message_index,
            content_index=0,
            part=part,
        )

    def delta(self, text: str) -> dict[str, Any]:
        """A piece of the output text (after :meth:`open_message`)."""
        return self._event(
            "response.output_text.delta",
            item_id=self._message_id,
            output_index=self._message_index,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def closing(self, completion: Completion) -> Iterator[dict[str, Any]]:
        """The events after the last text: the message closed, each call, then completed (or incomplete)."""
        if completion.text or not completion.tool_calls:
            yield from self.open_message()  # an empty answer still has its (empty) message
        if self._message_index is not None:
            where = {"item_id": self._message_id, "output_index": self._message_index, "content_index": 0}
            yield self._event("response.output_text.done", **where, text=completion.text, logprobs=[])
            part = {"type": "output_text", "text": completion.text, "annotations": [], "logprobs": []}
            yield self._event("response.content_part.done", **where, part=part)
            item = self.message(completion.text, "completed")
            yield self._event("response.output_item.done", output_index=self._message_index, item=item)
        for call in completion.tool_calls:
            index, item = self._opened, function_call(call, "completed")
            self._opened += 1
            yield self._event("response.output_item.added", output_index=index, item=function_call(call, "in_progress"))
            where = {"item_id": item["id"], "output_index": index}
            yield self._event("response.function_call_arguments.delta", **where, delta=call.arguments)
            yield self._event(
                "response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments
            )
            yield self._event("response.output_item.done", output_index=index, item=item)
        body = self.response(completion)
        yield self._event(f"response.{body['status']}", response=body)


def function_call(call: ToolCall, status: str) -> dict[str, Any]:
    """A ``function_call`` output item (its arguments empty until it is completed)."""
    return {
        "id": "fc_" + call.id.removeprefix("call_"),
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


def _function_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A chat-shaped tool (as the request was checked) in the Responses shape."""
    function = tool.get("function") or {}
    return {
        "type": "function",
        "name": function.get("name"),
        "description": function.get("description"),
        "parameters": function.get("parameters"),
        "strict": None,
    }


def _tool_choice(choice: Any, tools: list[dict[str, Any]]) -> Any:
    """The request's ``tool_choice`` as the Responses object reports it (default ``auto`` with tools)."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, dict):
        return {"type": "function", "name": (choice.get("function") or {}).get("name")}
    return choice
