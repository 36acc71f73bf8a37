"""Stop strings that may span tokens.

:class:`StopMatcher` sits between the detokenizer and the user: it holds back any text that
could be the beginning of a stop string, emits it once it cannot be, and cuts the output where
a stop string starts. The stop string itself is never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

__all__ = ["StopMatcher"]


@final
class StopMatcher:
    """Finds the first stop string in a stream of text deltas."""

    __slots__ = ("_pending", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add ``delta``; return the text now safe to emit and whether a stop string was hit."""
        if not self._stops:
            return delta, False
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return text[:cut], True
        hold = 0
        for stop in self._stops:
            # the longest tail of the text that is a proper prefix of this stop string
            for n in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:n]):
                    hold = n
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Text held back when the stream ends for another reason."""
        text, self._pending = self._pending, ""
        return text
