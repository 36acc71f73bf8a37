"""What a generation returns: stream events and the final :class:`Completion`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, final

if TYPE_CHECKING:
    from infer.tools import ToolCall

__all__ = ["Completion", "FinishReason", "Timings", "TokenEvent", "Usage"]

#: Why generation ended: ``"stop"`` (an end-of-sequence token, a stop token or a stop string),
#: ``"length"`` (``max_tokens`` or the context length reached), ``"tool_calls"`` (the model
#: ended its turn by calling tools, see :attr:`Completion.tool_calls`).
FinishReason = Literal["stop", "length", "tool_calls"]


@final
@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token, as a stream yields it."""

    #: Position of the token among the generated ones (0 for the first).
    index: int
    #: The token's id.
    token_id: int
    #: Text this token makes visible. May be "" (a partial UTF-8 character, or text held back
    #: because it could start a stop string) and may include text of earlier tokens.
    text: str
    #: Log-probability of the token under the model's raw distribution, if asked for.
    logprob: float | None = None
    #: The most likely alternatives ``(token_id, logprob)``, if ``top_logprobs`` was asked for.
    top_logprobs: tuple[tuple[int, float], ...] = ()


@final
@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    #: Prompt tokens served from the prefix cache rather than prefilled (OpenAI's
    #: ``prompt_tokens_details.cached_tokens``); 0 when prefix caching is off or missed.
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@final
@dataclass(frozen=True, slots=True)
class Timings:
    """Wall-clock figures of a request, in seconds and tokens per second."""

    #: From submission to the first generated token (queueing and prefill included).
    time_to_first_token: float
    #: Prompt tokens per second of prefill.
    prefill_tokens_per_s: float
    #: Generated tokens per second after the first one.
    decode_tokens_per_s: float
    #: From submission to the end.
    total: float


@final
@dataclass(frozen=True, slots=True)
class Completion:
    """The result of :meth:`infer.Model.generate`, also available as ``stream.completion``."""

    #: Request id (also in the log events).
    id: str
    #: Generated text, stop string excluded.
    text: str
    #: Generated token ids, the end-of-sequence or stop token that ended generation included (it
    #: counts in ``usage.completion_tokens`` too; its text is not part of ``text``).
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    #: Per-token events with log-probabilities, when ``logprobs`` was asked for.
    logprobs: tuple[TokenEvent, ...] | None = None
    #: Tools the model called, when the request passed ``tools=`` (``text`` then holds the rest).
    tool_calls: tuple[ToolCall, ...] = ()
