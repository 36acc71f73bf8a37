"""OpenAI's Responses API, the text subset: response objects, stream events, stored conversations.

A ``/v1/responses`` request is checked by :func:`infer.serve.schemas.parse_responses` into the
same :class:`~infer.serve.schemas.GenerationRequest` a chat request becomes, and runs the same
way; this module gives the answer its Responses shape. ``previous_response_id`` continues a
conversation kept by :class:`ConversationStore`: in memory, bounded (the least recently used
are forgotten first), lost on restart, as a local server's cache should be.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, final

from infer.results import Completion
from infer.serve.formats import usage_body
from infer.serve.schemas import GenerationRequest

__all__ = ["DEFAULT_STORED_CONVERSATIONS", "ConversationStore", "ResponsesFormatter", "event"]

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
    """Builds the response object and stream events of one ``/v1/responses`` request."""

    request: GenerationRequest
    id: str
    created: int
    model: str
    _sequence: int = 0
    _message_id: str = field(default="")

    def __post_init__(self) -> None:
        self._message_id = "msg_" + self.id.removeprefix("resp_")

    def response(self, completion: Completion | None) -> dict[str, Any]:
        """The response object: in progress (``completion`` None), completed or incomplete."""
        req = self.request
        sampling = req.sampling
        status, incomplete = "in_progress", None
        output: list[dict[str, Any]] = []
        usage: dict[str, Any] | None = None
        if completion is not None:
            output = [self.message(completion.text, "completed")]
            counts = usage_body(completion.usage)
            usage = {
                "input_tokens": counts["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": completion.usage.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": counts["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": counts["total_tokens"],
            }
            status = "completed" if completion.finish_reason == "stop" else "incomplete"
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
        fmt = req.response_format
        text_format: dict[str, Any] = {"type": "text"}
        if fmt is not None:
            spec = fmt.get("json_schema") or {}
            text_format = {"type": fmt["type"], **spec}
        return {
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
            "parallel_tool_calls": False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.store,
            "temperature": sampling.get("temperature", 1.0),
            "text": {"format": text_format},
            "tool_choice": "none",
            "tools": [],
            "top_p": sampling.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": req.user,
            "metadata": req.metadata or {},
        }

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
        """The events before the first text: created, in progress, the message and its part opened."""
        yield self._event("response.created", response=self.response(None))
        yield self._event("response.in_progress", response=self.response(None))
        yield self._event("response.output_item.added", output_index=0, item=self.message("", "in_progress"))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield self._event(
            "response.content_part.added", item_id=self._message_id, output_index=0, content_index=0, part=part
        )

    def delta(self, text: str) -> dict[str, Any]:
        """A piece of the output text."""
        return self._event(
            "response.output_text.delta",
            item_id=self._message_id,
            output_index=0,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def closing(self, completion: Completion) -> Iterator[dict[str, Any]]:
        """The events after the last text: text, part and item done, then completed (or incomplete)."""
        where = {"item_id": self._message_id, "output_index": 0, "content_index": 0}
        yield self._event("response.output_text.done", **where, text=completion.text, logprobs=[])
        part = {"type": "output_text", "text": completion.text, "annotations": [], "logprobs": []}
        yield self._event("response.content_part.done", **where, part=part)
        yield self._event("response.output_item.done", output_index=0, item=self.message(completion.text, "completed"))
        body = self.response(completion)
        yield self._event(f"response.{body['status']}", response=body)
