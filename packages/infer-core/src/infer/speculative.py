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
the same tokens whether it speculates or not, as far as the backend's all-position logits equal
its decode logits (exactly on the fake and numpy backends, within 1e-4 on ONNX fp32; not at
int4, where ``"auto"`` therefore does not speculate).

The drafter adapts ``k``: it grows while drafts are accepted in full and shrinks to what was
accepted; when the running share of accepted draft tokens falls below what pays for a
verification, it stops drafting for a while (doubling each time), so open-ended text pays
almost nothing for the attempt. Of the earlier occurrences of the n-gram it copies from the one
whose match reaches furthest back, and drafts at least as many tokens as that match is long:
text copied at length (a quotation, an unchanged line of code) is drafted at length at once.

Where the backend declares draft steps (contract 1.3 ``DRAFT``: the same model at a lower
precision, on the same caches), a request also drafts through them: a few cheap decode steps
whose greedy choices are verified like a lookup draft. Each draft token is still a point mass
(the draft's argmax given the context), so the acceptance rule above stays exact. Lookup drafts
are free and are taken while they keep being accepted; draft steps take over where lookup finds
nothing or is rejected (text the model paraphrases, open-ended text). A :class:`StepDrafter`
drafts until its draft is unsure of its own next token, and adapts its length like the lookup
drafter.
"""

from __future__ import annotations

from typing import Final, Literal, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "AUTO_SPECULATION_ATOL",
    "MAX_DRAFT",
    "MAX_SPECULATIVE_BATCH",
    "MODES",
    "NgramDrafter",
    "SpeculativeMode",
    "StepDrafter",
]

#: Largest ``logits_atol`` at which ``"auto"`` speculates. Verification logits come from a
#: multi-token step and may differ from decode logits by up to the model's tolerance, which can
#: flip a near-tie: measured on SmolLM2 with the ONNX backend, fp32 (1e-4) gave the plain greedy
#: tokens on 7 of 7 prompts, int4 (1.5) on 1 of 7, and ran slower.
AUTO_SPECULATION_ATOL: Final = 1e-3

#: ``"auto"``: n-gram drafting when the backend declares truncate and all-position logits (and
#: the model's tolerance keeps the tokens those of plain decoding, see above);
#: ``"ngram"``: the same, refused at load where the backend cannot; ``"off"``: never.
SpeculativeMode = Literal["auto", "ngram", "off"]
MODES: Final = ("auto", "ngram", "off")

#: Most requests decoding together for which the engine drafts; a larger batch decodes plainly.
#: Drafting pays only where one step's cost is reading the weights, which a batch already shares
#: between its rows; and when any row drafts the whole batch takes the all-position path. Measured
#: with SmolLM2 fp32 on the ONNX backend (2 threads, loaded machine): 32 concurrent open-ended chat
#: streams of 20 tokens took 80-89 s a round with drafting at every batch size, 19-24 s without.
MAX_SPECULATIVE_BATCH: Final = 1

#: Longest and shortest n-gram looked up, longest first (a longer match predicts better).
_MAX_NGRAM: Final = 3
_MIN_NGRAM: Final = 2
#: Draft length bounds: one all-position step costs about one decode step up to a few tokens.
#: Measured on SmolLM2 fp32 with the ONNX backend on a quiet machine: verifying 8 drafted tokens
#: costs 1.4 decode steps; replaying the benchmark's greedy outputs through the drafter, drafts
#: of up to 16 tokens as long as the match gave 1.82x over the four grounded tasks where 8 gave
#: 1.73x, and no loss on open-ended text.
_K_START: Final = 4
MAX_DRAFT: Final = 16
#: Furthest back a match is followed when choosing between occurrences, and how many of the
#: latest occurrences are compared (a common bigram recurs hundreds of times in a long prompt).
_MAX_MATCH: Final = 64
_MAX_CANDIDATES: Final = 16
#: Below this share of drafted tokens accepted (a running average), drafting pauses. Measured on
#: SmolLM2 fp32 with the ONNX backend (loaded machine): verifying k = 1, 2, 4, 8 drafted tokens
#: costs 1.1, 1.2, 1.35, 1.65 decode steps, so a draft pays for itself from about a quarter of its
#: tokens accepted.
_MIN_RATE: Final = 0.25
#: Draft steps: the first draft's length, and the least probability the draft must give its own
#: next token to go on drafting. Measured on SmolLM2 fp32 drafted by its GGUF's Q4_1 blocks (ONNX
#: backend, 2 threads): a draft step costs ~0.45 decode steps and its greedy token is the model's
#: on 95-99% of positions; with these settings 76-88% of drafted tokens were accepted, 4-9 tokens
#: a model step (benchmarks/README.md, "Draft steps").
_STEP_K_START: Final = 6
_MIN_CONFIDENCE: Final = 0.3
#: Lookup drafts are taken over draft steps while at least this share of them is accepted.
NGRAM_TRUST: Final = 0.5


@final
class NgramDrafter:
    """Proposes the tokens that followed the latest earlier occurrence of the context's last n-gram."""

    __slots__ = ("_cooldown", "_misses", "accepted", "k", "proposed", "rate")

    def __init__(self) -> None:
        #: Tokens to draft next time.
        self.k = _K_START
        #: Drafted and accepted token totals (the acceptance rate).
        self.proposed = 0
        self.accepted = 0
        #: Running share of drafted tokens accepted (recent verifications weigh most).
        self.rate = 0.5
        self._misses = 0
        self._cooldown = 0

    def draft(self, context: npt.NDArray[np.int32], limit: int) -> npt.NDArray[np.int32]:
        """Tokens predicted to follow ``context`` (maybe none): ``k`` of them, or as many as the
        match found is long, at most ``limit`` and :data:`MAX_DRAFT`."""
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
                follow, matched = _longest_match(context, starts, n)
                return context[follow : follow + min(max(k, matched), limit, MAX_DRAFT)]
        return context[:0]

    def observe(self, drafted: int, accepted: int) -> None:
        """Fold into the running acceptance share a draft of ``drafted`` tokens of which the first
        ``accepted`` were right: one verified, or one scored against what another drafter's
        verification emitted (so the share stays current while draft steps are preferred)."""
        self.rate = 0.5 * self.rate + 0.5 * accepted / drafted

    def update(self, drafted: int, accepted: int) -> None:
        """Adapt ``k`` after a verification that kept ``accepted`` of ``drafted`` tokens."""
        self.proposed += drafted
        self.accepted += accepted
        self.observe(drafted, accepted)
        self.k = min(self.k + 2, MAX_DRAFT) if accepted == drafted else max(1, accepted + 1)
        if self.rate < _MIN_RATE:  # drafts now cost more than they save: stop for a while, longer each time
            self._misses += 1
            self._cooldown = 1 << min(self._misses, 6)
        elif accepted:
            self._misses = 0


@final
class StepDrafter:
    """How many draft steps (contract 1.3) to take, and when to stop early."""

    __slots__ = ("accepted", "k", "proposed")

    def __init__(self) -> None:
        #: Most draft steps to take next time.
        self.k = _STEP_K_START
        #: Drafted and accepted token totals (the acceptance rate).
        self.proposed = 0
        self.accepted = 0

    @staticmethod
    def choose(logits: npt.NDArray[np.float32]) -> tuple[int, bool]:
        """The draft's greedy token for one row of draft logits, and whether to draft past it
        (the draft gives it at least :data:`_MIN_CONFIDENCE`)."""
        token = int(np.argmax(logits))
        top = logits[token]
        confidence = 1.0 / float(np.exp(logits - top, dtype=np.float32).sum())
        return token, confidence >= _MIN_CONFIDENCE

    def update(self, drafted: int, accepted: int) -> None:
        """Adapt ``k`` after a verification that kept ``accepted`` of ``drafted`` tokens."""
        self.proposed += drafted
        self.accepted += accepted
        self.k = min(self.k + 2, MAX_DRAFT) if accepted == drafted else max(2, accepted + 1)


def _longest_match(context: npt.NDArray[np.int32], starts: npt.NDArray[np.intp], n: int) -> tuple[int, int]:
    """Of the n-gram's earlier ``starts``, the one whose preceding tokens match the context's own
    furthest back (the latest on ties): where its continuation begins, and the match's length."""
    end = len(context) - n  # the tail's own start
    history = context[max(0, end - _MAX_MATCH) : end][::-1]  # the tokens before the tail, nearest first
    best_start, best_len = int(starts[-1]), -1
    for start in starts[::-1][:_MAX_CANDIDATES]:  # latest first
        before = context[max(0, start - len(history)) : start][::-1]
        size = min(len(before), len(history))
        differs = np.flatnonzero(before[:size] != history[:size])
        extra = int(differs[0]) if len(differs) else size
        if extra > best_len:
            best_start, best_len = int(start), extra
    return best_start + n, best_len + n
