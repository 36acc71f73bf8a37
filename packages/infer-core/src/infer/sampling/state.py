"""Per-request sampling state: the seeded generator and the token bookkeeping the penalties need.

Every request owns a :class:`SamplerState`. A row draws randomness only from its own state,
exactly once per sampled token, so a seed gives the same tokens whatever else shares the batch.
The state also applies the first links of the chain (token mask, logit bias, penalties) to a
row, incrementally: a step costs the same at token 10 as at token 10,000.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from infer.errors import InvalidParameterError, InvalidTokenError
from infer.sampling.params import BAN_BIAS, SamplingParams

if TYPE_CHECKING:
    from infer.sampling._fast import FloatRow

__all__ = ["SamplerState"]


def _grown(buffer: npt.NDArray[Any], used: int) -> npt.NDArray[Any]:
    """``buffer`` with room for one more item (capacity doubles, so appends are O(1) amortised)."""
    if used < buffer.shape[0]:
        return buffer
    bigger = np.empty(max(16, 2 * buffer.shape[0]), dtype=buffer.dtype)
    bigger[:used] = buffer[:used]
    return bigger


class SamplerState:
    """What one request's sampling carries from step to step.

    Holds the request's seeded random generator and, for the penalties, the distinct tokens
    seen so far (prompt and generated) and how often each token was generated. The engine
    calls :meth:`append` with every chosen token; the bookkeeping is incremental, so a step
    costs the same at token 10 as at token 10,000.
    """

    __slots__ = (
        "_ban_ids",
        "_bias_ids",
        "_bias_source",
        "_bias_values",
        "_gen_counts",
        "_gen_ids",
        "_gen_slot",
        "_n_gen",
        "_n_seen",
        "_seen",
        "_seen_ids",
        "extras",
        "num_generated",
        "params",
        "rng",
        "token_mask",
        "vocab_size",
    )

    #: The request's parameters (the bias arrays are prepared from them).
    params: SamplingParams
    #: Columns of every logits row this state samples from.
    vocab_size: int
    #: The request's random generator, seeded from ``params.seed``; sampling draws only from it.
    rng: np.random.Generator
    #: How many tokens :meth:`append` has recorded.
    num_generated: int
    #: Set by a plugin for one draw: ``True`` where the next token may be chosen (bool ``[vocab]``),
    #: ``None`` when every token may. The chain bans the others before penalties and top-k/top-p;
    #: a backend that samples on its device must honour it too.
    token_mask: npt.NDArray[np.bool_] | None
    #: Per-request storage for sampling plugins, keyed by plugin name; the core never reads it.
    extras: dict[str, Any]

    def __init__(self, params: SamplingParams, prompt_ids: npt.ArrayLike, vocab_size: int) -> None:
        params.validate(vocab_size)
        prompt = np.asarray(prompt_ids)
        if prompt.ndim != 1 or (prompt.size and prompt.dtype.kind not in "iu"):
            raise InvalidParameterError("prompt_ids", prompt_ids, "a 1-D sequence of integer token ids")
        prompt = prompt.astype(np.int64, copy=False)
        bad = np.flatnonzero((prompt < 0) | (prompt >= vocab_size))
        if bad.size:
            raise InvalidTokenError(int(prompt[bad[0]]), vocab_size, position=int(bad[0]))
        self.params = params
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(params.seed)
        self.num_generated = 0
        self.token_mask = None
        self.extras = {}
        seen = np.unique(prompt)
        self._seen: set[int] = set(seen.tolist())
        self._n_seen = int(seen.size)
        self._seen_ids = np.empty(max(64, 2 * seen.size), dtype=np.int64)
        self._seen_ids[: seen.size] = seen
        self._gen_slot: dict[int, int] = {}
        self._n_gen = 0
        self._gen_ids = np.empty(64, dtype=np.int64)
        self._gen_counts = np.empty(64, dtype=np.float32)
        self._bias_source: Mapping[int, float] | None = None
        self._prepare_bias(params.logit_bias)

    def append(self, token_id: int) -> None:
        """Record a chosen token (O(1) amortised); raises InvalidTokenError outside the vocabulary."""
        token = operator.index(token_id)
        if not 0 <= token < self.vocab_size:
            raise InvalidTokenError(token, self.vocab_size)
        self.num_generated += 1
        if token not in self._seen:
            self._seen.add(token)
            self._seen_ids = _grown(self._seen_ids, self._n_seen)
            self._seen_ids[self._n_seen] = token
            self._n_seen += 1
        slot = self._gen_slot.get(token)
        if slot is None:
            slot = self._gen_slot[token] = self._n_gen
            self._gen_ids = _grown(self._gen_ids, slot)
            self._gen_counts = _grown(self._gen_counts, slot)
            self._gen_ids[slot] = token
            self._gen_counts[slot] = 0.0
            self._n_gen += 1
        self._gen_counts[slot] += 1.0

    @property
    def seen_ids(self) -> npt.NDArray[np.int64]:
        """The distinct prompt and generated token ids (read-only view, in first-seen order)."""
        view = self._seen_ids[: self._n_seen]
        view.flags.writeable = False
        return view

    @property
    def generated_counts(self) -> dict[int, int]:
        """How many times each generated token id was generated."""
        ids, counts = self._gen_ids[: self._n_gen].tolist(), self._gen_counts[: self._n_gen].tolist()
        return {token: int(count) for token, count in zip(ids, counts, strict=True)}

    def _prepare_bias(self, bias: Mapping[int, float]) -> None:
        # Kept as arrays so a step applies the bias with two fancy-index operations.
        added = {t: b for t, b in bias.items() if b != BAN_BIAS}
        self._bias_ids = np.fromiter(added.keys(), dtype=np.int64, count=len(added))
        self._bias_values = np.fromiter(added.values(), dtype=np.float32, count=len(added))
        self._ban_ids = np.fromiter((t for t, b in bias.items() if b == BAN_BIAS), dtype=np.int64)
        self._bias_source = bias

    def process_logits(
        self, row: FloatRow, params: SamplingParams | None = None, *, out: FloatRow | None = None
    ) -> FloatRow:
        """``row`` after the logit bias and the penalties of ``params`` (default: the state's).

        The first links of the chain, exposed for plugins that sample by their own rules. ``row``
        itself is never written: the result is a copy (into ``out`` when given, a row-sized
        array of the same dtype), or ``row`` itself when nothing applies.
        """
        if params is None:
            params = self.params
        if not self._applies(params):
            return row
        if out is None:
            row = row.copy()
        else:
            out[...] = row
            row = out
        self._apply(row, params)
        return row

    def _applies(self, params: SamplingParams) -> bool:
        """Whether a bias or a penalty changes any logit of a row this step."""
        if params.logit_bias is not self._bias_source:
            self._prepare_bias(params.logit_bias)
        if params.logit_bias or self.token_mask is not None:
            return True
        if self._n_seen and params.repetition_penalty != 1.0:
            return True
        return bool(self._n_gen and (params.presence_penalty or params.frequency_penalty))

    def _touched(self) -> list[npt.NDArray[np.int64]]:
        """The ids :meth:`_apply` may write (generated ids are among the seen ones)."""
        return [ids for ids in (self._seen_ids[: self._n_seen], self._bias_ids, self._ban_ids) if ids.size]

    def _apply(self, row: FloatRow, params: SamplingParams) -> None:
        """Apply the token mask, the bias and the penalties of ``params`` to ``row`` in place."""
        if self.token_mask is not None:
            np.copyto(row, row.dtype.type(-np.inf), where=~self.token_mask)
        if self._bias_ids.size:
            row[self._bias_ids] += self._bias_values
        if self._ban_ids.size:
            row[self._ban_ids] = -np.inf
        penalty = params.repetition_penalty
        if penalty != 1.0 and self._n_seen:
            # Positive logits divide by the penalty, negative ones multiply: for a penalty above 1
            # that is the smaller of the two products (the larger below 1), with no sign test.
            ids = self._seen_ids[: self._n_seen]
            seen = row[ids]
            divided = seen * row.dtype.type(1.0 / penalty)
            seen *= row.dtype.type(penalty)
            (np.minimum if penalty > 1.0 else np.maximum)(seen, divided, out=seen)
            row[ids] = seen
        presence, frequency = params.presence_penalty, params.frequency_penalty
        if (presence or frequency) and self._n_gen:
            ids = self._gen_ids[: self._n_gen]
            row[ids] -= presence + frequency * self._gen_counts[: self._n_gen]
