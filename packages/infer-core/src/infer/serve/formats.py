"""Response bodies in OpenAI's shapes: completions, chat completions, their stream chunks, logprobs.

Pure functions from infer's results (:class:`infer.Completion`, :class:`infer.TokenEvent`,
:class:`infer.Usage`) to JSON-ready dicts; the app decides when to send them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, final

from infer.results import Completion, TokenEvent, Usage
from infer.serve.schemas import Endpoint
from infer.tools import ToolCall, ToolFormat, parse_tool_calls

__all__ = ["Echo", "Formatter", "ToolCallHolder", "sse"]

#: Text of one token id (the model's decoder applied to that id alone).
TokenText = Callable[[int], str]


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying ``payload`` (a dict as JSON, or a literal such as ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def usage_body(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` object; ``cached_tokens``: prompt tokens taken from the prefix cache."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
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
    #: OpenAI's ``system_fingerprint``: names the build and configuration that answered.
    system_fingerprint: str = ""
    #: Choices per prompt: usage counts each prompt once, however many choices it has.
    n: int = 1
    #: Completions: each choice's running text offset (its logprobs' ``text_offset``).
    _offsets: dict[int, int] = field(default_factory=dict)

    @property
    def _object(self) -> str:
        return "chat.completion" if self.endpoint == "chat" else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return head | {"system_fingerprint": self.system_fingerprint}

    # -- whole responses --------------------------------------------------------------------

    def completion(self, completion: Completion) -> dict[str, Any]:
        """The body of a non-streaming response with one choice."""
        if self.endpoint != "chat":
            return self.completions([completion], [None], with_logprobs=completion.logprobs is not None)
        return self.chat([completion])

    def chat(self, completions: Sequence[Completion]) -> dict[str, Any]:
        """The body of a non-streaming chat response: one choice per completion, usage summed."""
        choices = [self._chat_choice(i, c) for i, c in enumerate(completions)]
        return self._head(self._object) | {"choices": choices, "usage": usage_body(self.total(completions))}

    def _chat_choice(self, index: int, completion: Completion) -> dict[str, Any]:
        events = completion.logprobs
        logprobs = self.logprobs(events) if events is not None else None
        message: dict[str, Any] = {
            "role": "assistant",
            # OpenAI's content is null for a turn that only calls tools; refusal is required (null).
            "content": completion.text if completion.text or not completion.tool_calls else None,
            "refusal": None,
        }
        if completion.tool_calls:
            message["tool_calls"] = [call.as_openai() for call in completion.tool_calls]
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": completion.finish_reason}

    def completions(
        self, completions: Sequence[Completion], echoes: Sequence[Echo | None], *, with_logprobs: bool
    ) -> dict[str, Any]:
        """The body of a ``/v1/completions`` response: one choice per prompt, usage summed.

        ``echoes[i]``: the prompt of choice ``i`` when the request asked for ``echo`` (its text
        comes before the generated text, its tokens' logprobs before theirs).
        """
        choices = []
        for index, (completion, echo) in enumerate(zip(completions, echoes, strict=True)):
            head = echo.text if echo is not None else ""
            events = [*(echo.events if echo is not None else ()), *(completion.logprobs or ())]
            choices.append(
                {
                    "index": index,
                    "text": head + completion.text,
                    "logprobs": self.logprobs(events, index) if with_logprobs else None,
                    "finish_reason": completion.finish_reason,
                }
            )
        return self._head(self._object) | {"choices": choices, "usage": usage_body(self.total(completions))}

    # -- stream chunks ----------------------------------------------------------------------

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return self._head(obj) | {"choices": [choice]}

    def opening(self, index: int = 0) -> dict[str, Any] | None:
        """A chat stream's first chunk of choice ``index`` (the assistant role); ``None`` for completions."""
        if self.endpoint != "chat":
            return None
        return self._chunk(
            {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        )

    def delta(self, events: Sequence[TokenEvent], *, with_logprobs: bool, index: int = 0) -> dict[str, Any]:
        """A chunk carrying the text of ``events`` (of choice ``index``)."""
        text = "".join(e.text for e in events)
        logprobs = self.logprobs(events, index) if with_logprobs else None
        if self.endpoint == "chat":
            return self._chunk(
                {"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}
            )
        return self._chunk({"index": index, "text": text, "logprobs": logprobs, "finish_reason": None})

    def echo_delta(self, echo: Echo, *, with_logprobs: bool, index: int) -> dict[str, Any]:
        """A completions chunk carrying the echoed prompt of choice ``index``."""
        logprobs = self.logprobs(echo.events, index) if with_logprobs else None
        return self._chunk({"index": index, "text": echo.text, "logprobs": logprobs, "finish_reason": None})

    def tool_call_deltas(self, calls: Sequence[ToolCall], index: int = 0) -> dict[str, Any]:
        """A chat chunk carrying whole ``calls`` as OpenAI's streamed ``tool_calls`` deltas."""
        deltas = [call.as_openai() | {"index": i} for i, call in enumerate(calls)]
        return self._chunk({"index": index, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None})

    def content_delta(self, text: str, index: int = 0) -> dict[str, Any]:
        """A chat chunk carrying ``text`` and no logprobs."""
        return self._chunk({"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None})

    def closing(self, completion: Completion, index: int = 0) -> dict[str, Any]:
        """The chunk that gives the finish reason (of choice ``index``)."""
        reason = completion.finish_reason
        if self.endpoint == "chat":
            return self._chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
        return self._chunk({"index": index, "text": "", "logprobs": None, "finish_reason": reason})

    def total(self, completions: Sequence[Completion]) -> Usage:
        """The usage of a response: each prompt's tokens once (choices come ``n`` per prompt), all completions'.

        A prompt's cached tokens are its first choice's: the other choices fork that choice's
        cache, which is the prompt computed once, not taken from earlier requests.
        """
        firsts = completions[:: self.n]
        prompt = sum(c.usage.prompt_tokens for c in firsts)
        cached = sum(c.usage.cached_tokens for c in firsts)
        return Usage(prompt, sum(c.usage.completion_tokens for c in completions), cached_tokens=cached)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The final chunk of a stream asked to include usage: no choices, the counts."""
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return self._head(obj) | {"choices": [], "usage": usage_body(usage)}

    # -- logprobs ---------------------------------------------------------------------------

    def logprobs(self, events: Sequence[TokenEvent], index: int = 0) -> dict[str, Any]:
        """Log-probabilities of ``events`` (of choice ``index``) in the endpoint's format.

        Completions: a token nothing predicts (an echoed prompt's first) has ``null`` logprob
        and ``null`` alternatives, as OpenAI's echo gives them.
        """
        if self.endpoint == "chat":
            return {"content": [self._chat_entry(e) for e in events], "refusal": None}
        tokens, offsets = [], []
        offset = self._offsets.get(index, 0)
        for e in events:
            tokens.append(self.token_text(e.token_id))
            offsets.append(offset)
            offset += len(e.text)
        self._offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [
                None if e.logprob is None else {self.token_text(t): lp for t, lp in e.top_logprobs} for e in events
            ],
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


@final
@dataclass(frozen=True, slots=True)
class Echo:
    """A completions prompt echoed back: its text and its tokens (with logprobs when asked)."""

    text: str
    events: tuple[TokenEvent, ...]


@final
class ToolCallHolder:
    """Streams a tool-using answer: text goes out as it comes until it may be a call, calls at the end.

    A call is sent whole (name and arguments in one delta, as vLLM's and llama.cpp's servers
    may): its arguments are not known to be a call until the block closes. In the ``hermes``
    format the text before ``<tool_call>`` streams as content, held back only while its end
    could be the start of that tag; in the ``llama3`` format the whole answer is one JSON call,
    so an answer that opens like one is held until the end.
    """

    __slots__ = ("_format", "_sent", "_text")

    _OPENERS: Final = {"hermes": ("<tool_call>",), "llama3": ("{", "<|python_tag|>")}

    def __init__(self, fmt: ToolFormat) -> None:
        self._format = fmt
        self._text = ""
        self._sent = 0

    def feed(self, text: str) -> str:
        """Take the next piece of output; return the content now safe to send (maybe "")."""
        self._text += text
        safe = self._safe_end()
        out = self._text[self._sent : safe]
        self._sent = max(self._sent, safe)
        return out

    def _safe_end(self) -> int:
        text = self._text
        if self._format == "llama3":
            head = text.lstrip()
            could_be_call = any(head.startswith(o) or o.startswith(head) for o in self._OPENERS["llama3"])
            return self._sent if could_be_call else len(text)
        opener = self._OPENERS["hermes"][0]
        found = text.find(opener, self._sent)
        if found >= 0:
            return found
        for keep in range(min(len(opener) - 1, len(text)), 0, -1):  # a tag may be arriving piece by piece
            if opener.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content still to send and the calls, once the output is complete."""
        content, calls = parse_tool_calls(self._text[self._sent :], self._format)
        if not calls:
            return self._text[self._sent :], []
        return content or "", calls
