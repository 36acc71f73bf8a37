"""Response bodies in OpenAI's shapes: completions, chat completions, their stream chunks, logprobs.

Pure functions from infer's results (:class:`infer.Completion`, :class:`infer.TokenEvent`,
:class:`infer.Usage`) to JSON-ready dicts; the app decides when to send them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, final

from infer.results import Completion, TokenEvent, Usage
from infer.serve.schemas import Endpoint

__all__ = ["Formatter", "sse"]

#: Text of one token id (the model's decoder applied to that id alone).
TokenText = Callable[[int], str]


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying ``payload`` (a dict as JSON, or a literal such as ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def usage_body(usage: Usage) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


@final
@dataclass(slots=True)
class Formatter:
    """Builds the bodies of one response; keeps the running text offset completions logprobs need."""

    endpoint: Endpoint
    id: str
    created: int
    model: str
    token_text: TokenText
    #: Token id -> the bytes it stands for (a partial UTF-8 character included).
    token_bytes: Callable[[int], bytes]
    _offset: int = 0

    @property
    def _object(self) -> str:
        return "chat.completion" if self.endpoint == "chat" else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # -- whole responses --------------------------------------------------------------------

    def completion(self, completion: Completion) -> dict[str, Any]:
        """The body of a non-streaming response."""
        events = completion.logprobs
        logprobs = self.logprobs(events) if events is not None else None
        if self.endpoint == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": logprobs,
                "finish_reason": completion.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": completion.text,
                "logprobs": logprobs,
                "finish_reason": completion.finish_reason,
            }
        return self._head(self._object) | {"choices": [choice], "usage": usage_body(completion.usage)}

    # -- stream chunks ----------------------------------------------------------------------

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return self._head(obj) | {"choices": [choice]}

    def opening(self) -> dict[str, Any] | None:
        """The chat stream's first chunk (the assistant role); ``None`` for completions."""
        if self.endpoint != "chat":
            return None
        return self._chunk(
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        )

    def delta(self, events: Sequence[TokenEvent], *, with_logprobs: bool) -> dict[str, Any]:
        """A chunk carrying the text of ``events``."""
        text = "".join(e.text for e in events)
        logprobs = self.logprobs(events) if with_logprobs else None
        if self.endpoint == "chat":
            return self._chunk({"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None})
        return self._chunk({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": None})

    def closing(self, completion: Completion) -> dict[str, Any]:
        """The chunk that gives the finish reason."""
        reason = completion.finish_reason
        if self.endpoint == "chat":
            return self._chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason})
        return self._chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": reason})

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The final chunk of a stream asked to include usage: no choices, the counts."""
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return self._head(obj) | {"choices": [], "usage": usage_body(usage)}

    # -- logprobs ---------------------------------------------------------------------------

    def logprobs(self, events: Sequence[TokenEvent]) -> dict[str, Any]:
        """Log-probabilities of ``events`` in the endpoint's format."""
        if self.endpoint == "chat":
            return {"content": [self._chat_entry(e) for e in events]}
        tokens, offsets = [], []
        for e in events:
            tokens.append(self.token_text(e.token_id))
            offsets.append(self._offset)
            self._offset += len(e.text)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{self.token_text(t): lp for t, lp in e.top_logprobs} for e in events],
            "text_offset": offsets,
        }

    def _chat_entry(self, event: TokenEvent) -> dict[str, Any]:
        token = self.token_text(event.token_id)
        return {
            "token": token,
            "logprob": event.logprob,
            "bytes": list(self.token_bytes(event.token_id)),
            "top_logprobs": [
                {"token": self.token_text(t), "logprob": lp, "bytes": list(self.token_bytes(t))}
                for t, lp in event.top_logprobs
            ],
        }
