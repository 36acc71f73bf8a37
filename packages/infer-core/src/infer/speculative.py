"""Speculative decoding by prompt lookup: draft tokens from n-grams already in the context.

When the text being generated repeats the prompt (summaries, rewrites, extraction, code edits),
the tokens after the latest earlier occurrence of the last few tokens are a good guess of what
comes next. The engine feeds the pending token and up to ``k`` drafted ones in one all-position
prefill (contract 1.1 ``ALL_LOGITS``), samples every position with the request's own sampler, and
keeps drafts while they equal the sampled token; the first mismatch is replaced by the sampled
token and the cache is truncated (``TRUNCATE``) to what was accepted.

Why sampling every position and comparing is exact: a lookup draft is a point mass ``q = δ(d)``,
for which rejection sampling accepts ``d`` with probability ``min(1, p(d) / q(d)) = p(d)`` and on
rejection draws from ``p`` without ``d``, renormalised. Drawing ``t ~ p`` and accepting iff
``t == d`` does exactly that, with one draw from the request's random generator per emitted
token, as plain decoding makes: greedy output is identical, and a seeded sampled request gives
the same tokens whether it speculates or not (up to the backend's all-position vs decode logits
tolerance).

The drafter adapts ``k``: it grows while drafts are accepted in full, shrinks to what was
accepted, and after repeated misses stops drafting for a while (doubling each time), so
open-ended text pays almost nothing for the attempt.
"""

from __future__ import annotations

from typing import Final, Literal, final

import numpy as np
import numpy.typing as npt

__all__ = ["MODES", "NgramDrafter", "SpeculativeMode"]

#: ``"auto"``: n-gram drafting when the backend declares truncate and all-position logits;
#: ``"ngram"``: the same, refused at load where the backend cannot; ``"off"``: never.
SpeculativeMode = Literal["auto", "ngram", "off"]
MODES: Final = ("auto", "ngram", "off")

#: Longest and shortest n-gram looked up, longest first (a longer match predicts better).
_MAX_NGRAM: Final = 3
_MIN_NGRAM: Final = 2
#: Draft length bounds: one all-position step costs about one decode step up to a few tokens.
_K_START: Final = 4
_K_MAX: Final = 8


@final
class NgramDrafter:
    """Proposes the tokens that followed the latest earlier occurrence of the context's last n-gram."""

    __slots__ = ("_cooldown", "_misses", "accepted", "k", "proposed")

    def __init__(self) -> None:
        #: Tokens to draft next time.
        self.k = _K_START
        #: Drafted and accepted token totals (the acceptance rate).
        self.proposed = 0
        self.accepted = 0
        self._misses = 0
        self._cooldown = 0

    def draft(self, context: npt.NDArray[np.int32], limit: int) -> npt.NDArray[np.int32]:
        """Up to ``min(k, limit)`` tokens predicted to follow ``context`` (maybe none)."""
        k = min(self.k, limit)
        if self._cooldown > 0:
            self._cooldown -= 1
            return context[:0]
        if k < 1:
            return context[:0]
        for n in range(_MAX_NGRAM, _MIN_NGRAM - 1, -1):
            if len(context) <= n:
                continue
            tail = context[-n:]
            # every earlier start of the n-gram, excluding the tail itself
            windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)
            starts = np.flatnonzero((windows == tail).all(axis=1))
            if len(starts):
                follow = int(starts[-1]) + n
                return context[follow : follow + k]
        return context[:0]

    def update(self, drafted: int, accepted: int) -> None:
        """Adapt ``k`` after a verification that kept ``accepted`` of ``drafted`` tokens."""
        self.proposed += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.k = min(self.k + 2, _K_MAX)
            self._misses = 0
            return
        self.k = max(1, accepted + 1)
        if accepted == 0:
            self._misses += 1
            if self._misses >= 2:  # two misses in a row: this text does not repeat its context now
                self._cooldown = 1 << min(self._misses, 6)
        else:
            self._misses = 0
