"""The default sampler: sampling parameters, per-request state, and the processing chain.

One row of logits becomes one token through a fixed chain::

    logit bias -> repetition penalty -> presence/frequency penalties
        -> greedy: argmax
        -> otherwise: temperature -> top-k -> top-p -> min-p -> one draw from the row's own rng

Every request owns a :class:`SamplerState` holding its seeded :class:`numpy.random.Generator`
and the token bookkeeping the penalties need. A row draws randomness only from its own state,
exactly once per sampled token, so a seed gives the same tokens whatever else shares the batch.

The chain is written for a decode loop: on a 49k vocabulary a greedy step costs about one
``argmax`` and a top-k/top-p step avoids sorting or partitioning the whole row (see
:func:`_top_k`); ``benchmarks/bench_sampling.py`` measures it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import numpy.typing as npt

from infer.errors import BackendError, InvalidParameterError, InvalidTokenError
from infer.hookspecs import hookimpl

if TYPE_CHECKING:
    from infer.structured import Constraint

# Only what `infer` itself re-exports; sample(), logprobs() and DefaultSampler are public here,
# for the engine and for plugins, but not part of the top-level API.
__all__ = ["SamplerState", "SamplingParams"]

#: Most alternatives :func:`logprobs` reports per token (the OpenAI API's limit).
MAX_TOP_LOGPROBS = 20
#: A logit bias of exactly this value removes the token (its logit becomes -inf).
BAN_BIAS = -100.0
#: Temperatures below this sample greedily: dividing by less would overflow float32 logits.
GREEDY_TEMPERATURE = 1e-5
#: Bounds of ``repetition_penalty``: a logit divided by much less, or multiplied by much more,
#: than these leaves float32 (1e-300 turns a row into inf and NaN) and no longer ranks tokens.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0

# Rows at least this long take the column-maximum shortcut in _top_k; shorter ones are
# cheap enough to partition whole.
_FAST_TOP_K_MIN_ROW = 4096
# _top_k views a row as this many stacked slices (3,072 columns for a 49k vocabulary).
_GROUPS = 16
# Candidate-set sizes tried, in turn, when top-p runs without top-k: most LM distributions
# reach p inside the first, flat ones fall through to the whole row.
_NUCLEUS_GROWTH = (64, 1024, 8192)
# Above this many weights a draw sums blocks first, instead of a cumulative sum of every weight.
_BLOCKED_DRAW_MIN = 8192
_DRAW_BLOCK = 256
# Who reported non-finite logits: the sampler cannot know which backend produced the row.
_LOGITS_SOURCE = "unknown (reported by the sampler)"

_local = threading.local()


def _scratch(like: FloatRow, slot: int) -> FloatRow:
    """This thread's buffer shaped like the row ``like``; slot 0 holds a processed row, 1 its transforms.

    Sampling needs a row-sized copy or two per token. Allocated afresh each time, a 49,152-float
    row costs several times its copy (measured 79 us against 17 us beside a backend's fresh
    logits), so each thread keeps one per slot, vocabulary size and dtype.
    """
    buffers: dict[tuple[int, np.dtype[Any], int], FloatRow] = _local.__dict__.setdefault("buffers", {})
    key = (like.shape[0], like.dtype, slot)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = np.empty(like.shape[0], dtype=like.dtype)
    return buffer


#: A row of logits (float32 from backends; other float widths work too).
FloatRow = npt.NDArray[np.floating[Any]]


# --------------------------------------------------------------------------- parameters


def _is_int(value: object) -> TypeGuard[numbers.Integral]:
    # bool (and numpy's bool) are integers to Python but never a count or an id here.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> TypeGuard[numbers.Real]:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _int(name: str, value: object, lo: int, hi: int | None, expected: str) -> int:
    if not _is_int(value):
        raise InvalidParameterError(name, value, expected)
    number = int(value)
    if number < lo or (hi is not None and number > hi):
        raise InvalidParameterError(name, value, expected)
    return number


def _real(name: str, value: object, lo: float, hi: float, expected: str, *, lo_open: bool = False) -> float:
    if not _is_real(value):
        raise InvalidParameterError(name, value, expected)
    number = float(value)
    if not math.isfinite(number) or number > hi or number < lo or (lo_open and number == lo):
        raise InvalidParameterError(name, value, expected)
    return number


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidParameterError(name, value, "True or False")
    return bool(value)


def _stop_strings(value: object) -> tuple[str, ...]:
    expected = "a non-empty string or a list of non-empty strings"
    items: tuple[object, ...]
    if isinstance(value, str):
        items = (value,)
    elif isinstance(value, (list, tuple)):
        items = tuple(value)
    else:
        raise InvalidParameterError("stop", value, expected)
    for item in items:
        if not isinstance(item, str) or not item:
            raise InvalidParameterError("stop", item, expected)
    return items  # type: ignore[return-value]


def _stop_token_ids(value: object, vocab_size: int | None) -> tuple[int, ...]:
    expected = "a list of token ids >= 0" if vocab_size is None else f"a list of token ids in [0, {vocab_size})"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        raise InvalidParameterError("stop_token_ids", value, expected)
    hi = None if vocab_size is None else vocab_size - 1
    return tuple(_int("stop_token_ids", item, 0, hi, expected) for item in value)


def _logit_bias(value: object, vocab_size: int | None) -> Mapping[int, float]:
    where = "token ids >= 0" if vocab_size is None else f"token ids in [0, {vocab_size})"
    expected = f"a mapping of {where} to biases in [-100, 100]"
    if not isinstance(value, Mapping):
        raise InvalidParameterError("logit_bias", value, expected)
    hi = None if vocab_size is None else vocab_size - 1
    bias: dict[int, float] = {}
    for key, amount in value.items():
        token = _int("logit_bias", key, 0, hi, expected)
        bias[token] = _real("logit_bias", amount, -100.0, 100.0, expected)
    return MappingProxyType(bias)


def _constraint(value: object, ignore_eos: object) -> Constraint | None:
    if value is None:
        return None
    from infer.structured import Constraint

    if not isinstance(value, Constraint):
        raise InvalidParameterError("constraint", value, "None or a Constraint (pass response_format=)")
    if ignore_eos:
        raise InvalidParameterError("ignore_eos", ignore_eos, "False with a constraint: constrained output ends at eos")
    return value


def _no_bias() -> Mapping[int, float]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request chooses its tokens; immutable and validated on construction.

    A bad value raises :class:`~infer.errors.InvalidParameterError` naming the field, so an
    invalid instance cannot exist. :meth:`validate` adds the checks that need the model's
    vocabulary size. Numbers are normalised to Python ``int``/``float``, ``stop`` to a tuple
    and ``logit_bias`` to a read-only mapping.
    """

    #: Most tokens to generate; ``None`` generates up to the context length.
    max_tokens: int | None = 256
    #: Divides the logits before sampling; ``0`` (or below :data:`GREEDY_TEMPERATURE`) picks the
    #: most likely token (greedy).
    temperature: float = 1.0
    #: Keep only the ``top_k`` most likely tokens (ties at the k-th broken by lower id); ``0`` disables.
    top_k: int = 0
    #: Keep the smallest set of most likely tokens whose probability reaches ``top_p``, in (0, 1].
    top_p: float = 1.0
    #: Drop tokens less likely than ``min_p`` times the most likely one, in [0, 1].
    min_p: float = 0.0
    #: Over prompt and generated tokens: divides a seen token's positive logit, multiplies a
    #: negative one, in [0.01, 100] (``1`` disables; beyond those a float32 logit can overflow).
    repetition_penalty: float = 1.0
    #: Subtracted once from the logit of every token generated so far, in [-2, 2].
    presence_penalty: float = 0.0
    #: Subtracted from a generated token's logit once per time it was generated, in [-2, 2].
    frequency_penalty: float = 0.0
    #: Token id -> amount added to its logit, in [-100, 100]; exactly -100 bans the token.
    #: Excluded from the hash (a mapping is not hashable) but compared by ``==``.
    logit_bias: Mapping[int, float] = field(default_factory=_no_bias, hash=False)
    #: Seed of the request's random generator; ``None`` draws a fresh one.
    seed: int | None = None
    #: Strings that end the generation (not included in the output); a single string is accepted.
    stop: tuple[str, ...] = ()
    #: Token ids that end the generation, in addition to the model's end-of-sequence ids.
    stop_token_ids: tuple[int, ...] = ()
    #: Keep generating past the model's end-of-sequence tokens.
    ignore_eos: bool = False
    #: Report the log-probability of each generated token.
    logprobs: bool = False
    #: With ``logprobs``, also report this many most likely alternatives per token, in [0, 20].
    top_logprobs: int = 0
    #: Structured output: a compiled :class:`~infer.structured.Constraint` that limits every
    #: token to what its grammar allows next (``Model.generate(response_format=...)`` makes it).
    constraint: Constraint | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name, value in self._checked(vocab_size=None).items():
            object.__setattr__(self, name, value)

    def _checked(self, vocab_size: int | None) -> dict[str, Any]:
        """Every field checked and normalised; raises on the first bad one."""
        max_tokens = self.max_tokens
        if max_tokens is not None:
            max_tokens = _int("max_tokens", max_tokens, 1, None, "None or an integer >= 1")
        seed = self.seed
        if seed is not None:
            seed = _int("seed", seed, 0, None, "None or an integer >= 0")
        top_logprobs = _int(
            "top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS, f"an integer in [0, {MAX_TOP_LOGPROBS}]"
        )
        logprobs_flag = _flag("logprobs", self.logprobs)
        if top_logprobs and not logprobs_flag:
            raise InvalidParameterError("top_logprobs", top_logprobs, "0 unless logprobs=True")
        return {
            "max_tokens": max_tokens,
            "temperature": _real("temperature", self.temperature, 0.0, math.inf, "a finite number >= 0"),
            "top_k": _int("top_k", self.top_k, 0, None, "an integer >= 0 (0 disables top-k)"),
            "top_p": _real("top_p", self.top_p, 0.0, 1.0, "a number in (0, 1]", lo_open=True),
            "min_p": _real("min_p", self.min_p, 0.0, 1.0, "a number in [0, 1]"),
            "repetition_penalty": _real(
                "repetition_penalty",
                self.repetition_penalty,
                MIN_REPETITION_PENALTY,
                MAX_REPETITION_PENALTY,
                f"a number in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]",
            ),
            "presence_penalty": _real("presence_penalty", self.presence_penalty, -2.0, 2.0, "a number in [-2, 2]"),
            "frequency_penalty": _real("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "a number in [-2, 2]"),
            "logit_bias": _logit_bias(self.logit_bias, vocab_size),
            "seed": seed,
            "stop": _stop_strings(self.stop),
            "stop_token_ids": _stop_token_ids(self.stop_token_ids, vocab_size),
            "ignore_eos": _flag("ignore_eos", self.ignore_eos),
            "logprobs": logprobs_flag,
            "top_logprobs": top_logprobs,
            "constraint": _constraint(self.constraint, self.ignore_eos),
        }

    def validate(self, vocab_size: int | None = None) -> None:
        """Check every field; with ``vocab_size``, also that token ids fall inside the vocabulary.

        Raises :class:`~infer.errors.InvalidParameterError` naming the first bad field.
        """
        if vocab_size is not None:
            _int("vocab_size", vocab_size, 1, None, "an integer >= 1")
        self._checked(vocab_size)

    @property
    def greedy(self) -> bool:
        """Whether every step takes the most likely token (temperature ~0, or top-k of 1); draws no randomness."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def __reduce__(self) -> tuple[type[SamplingParams], tuple[Any, ...]]:
        # The read-only bias mapping cannot be pickled itself: rebuild from a plain dict, so
        # params survive pickle, copy.deepcopy and multiprocessing.
        return type(self), tuple(
            dict(self.logit_bias) if f.name == "logit_bias" else getattr(self, f.name) for f in dataclasses.fields(self)
        )

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied, validated like a new instance."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- per-request state


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


# --------------------------------------------------------------------------- the chain


def _top_k(row: FloatRow, k: int) -> tuple[npt.NDArray[np.intp], FloatRow, float]:
    """The k largest entries of ``row``, ties at the k-th broken by lower id: ascending ids, values, and the row max.

    Breaking ties by id makes every top-k set the first k of one order (value down, id up), so
    a larger set always extends a smaller one, and the set never outgrows k even on a row of
    equal (or masked, -inf) logits.

    Exact without partitioning the whole row. Viewed as ``_GROUPS`` stacked slices, the row has
    ``n / _GROUPS`` columns; one vectorised pass takes each column's maximum (and a second pass
    the maxima of groups of those). The k-th largest of k or more such maxima is a threshold
    that at least k distinct entries reach, so the k-th largest entry reaches it too, and every
    entry of the top k sits in a column whose maximum reaches it: only those columns, about
    ``k * _GROUPS`` entries, are partitioned.

    The max is returned as is; when it is not finite (NaN anywhere, +inf, all -inf) the ids are
    empty and the caller must refuse the row. (Array methods rather than ``np.`` functions
    throughout: on arrays this small the call overhead is most of the cost.)
    """
    n = row.shape[0]
    if k >= n:
        return np.arange(n), row, float(row[row.argmax()])
    width = n // _GROUPS
    if n < _FAST_TOP_K_MIN_ROW or 2 * k > width:
        top = float(row[row.argmax()])
        if not math.isfinite(top):
            return np.empty(0, dtype=np.intp), row[:0], top
        kth = row[np.argpartition(row, n - k)[n - k]]
        ids = (row >= kth).nonzero()[0]
        ids, values = _first_k(ids, row[ids], kth, k)
        return ids, values, top
    body = width * _GROUPS
    grid = row[:body].reshape(_GROUPS, width) if body < n else row.reshape(_GROUPS, width)
    tail = row[body:] if body < n else None
    column_max = grid.max(axis=0)
    # Where k is small next to the columns, the maxima of column groups give the threshold for
    # less work than partitioning every column maximum.
    if width % _GROUPS == 0 and 2 * k <= width // _GROUPS:
        coarse = column_max.reshape(_GROUPS, -1).max(axis=0)
    else:
        coarse = column_max.copy()  # partitioned in place below; column_max is read again
    top = float(coarse[coarse.argmax()])  # argmax: far less call overhead than max; finds a NaN too
    if tail is not None:
        # np.maximum keeps a NaN from either side, where Python's max() would depend on the order.
        top = float(np.maximum(top, tail.max()))
    if not math.isfinite(top):
        return np.empty(0, dtype=np.intp), row[:0], top
    pivot = coarse.shape[0] - k
    coarse.partition(pivot)
    threshold = coarse[pivot]
    columns = (column_max >= threshold).nonzero()[0]
    if 4 * columns.shape[0] > width:
        # A flat or masked row (most columns reach the threshold): gathering columns would copy
        # most of the row, and partitioning masses of equal values is numpy's slow case.
        ids, values = _top_k_above(row, threshold, k)
        return ids, values, top
    values = grid.take(columns, axis=1)
    ids = _id_grid(width).take(columns, axis=1)
    if tail is not None:
        values = np.concatenate((values.ravel(), tail))
        ids = np.concatenate((ids.ravel(), np.arange(body, n)))
    pool = values.flatten()  # a copy: the partition reorders it
    pivot = pool.shape[0] - k
    pool.partition(pivot)
    # Boolean masks walk the slices in order (then the tail), so the ids come out ascending.
    kth = pool[pivot]
    keep = values >= kth
    ids, values = _first_k(ids[keep], values[keep], kth, k)
    return ids, values, top


def _top_k_above(row: FloatRow, threshold: np.floating[Any], k: int) -> tuple[npt.NDArray[np.intp], FloatRow]:
    """Top k of ``row`` (ties by lower id, ids ascending), given that at least k entries reach ``threshold``.

    Works from the entries strictly above the threshold, so a row where most entries share one
    value (-inf after masking, say) is never partitioned as a whole.
    """
    above = (row > threshold).nonzero()[0]
    if above.shape[0] >= k:
        values = row[above]
        pivot = above.shape[0] - k
        kth = np.partition(values, pivot)[pivot]
        keep = values >= kth
        return _first_k(above[keep], values[keep], kth, k)
    # The k-th largest is the threshold itself: every entry above it, then the lowest-id ties.
    ties = (row == threshold).nonzero()[0][: k - above.shape[0]]
    ids = np.concatenate((above, ties))
    ids.sort()
    return ids, row[ids]


def _first_k(
    ids: npt.NDArray[np.intp], values: FloatRow, kth: np.floating[Any], k: int
) -> tuple[npt.NDArray[np.intp], FloatRow]:
    """From the (ascending) ids of every entry >= ``kth``, the ``k`` with ties at ``kth`` taken by lower id."""
    if ids.shape[0] == k:
        return ids, values
    ties = (values == kth).nonzero()[0]
    keep = np.ones(ids.shape[0], dtype=bool)
    keep[ties[k - (ids.shape[0] - ties.shape[0]) :]] = False
    return ids[keep], values[keep]


@functools.lru_cache(maxsize=8)
def _id_grid(width: int) -> npt.NDArray[np.intp]:
    """The token ids of a row viewed as ``_GROUPS`` stacked slices of ``width`` (read-only, cached)."""
    ids = np.arange(_GROUPS * width, dtype=np.intp).reshape(_GROUPS, width)
    ids.flags.writeable = False
    return ids


def _search(cumulative: npt.NDArray[np.float64], target: float) -> int:
    """First index whose cumulative weight exceeds ``target``; rounding past the end lands on the last positive one."""
    index = int(cumulative.searchsorted(target, side="right"))
    if index < cumulative.shape[0]:
        return index
    # target reached the total through rounding: take the last entry that adds weight.
    steps = (np.diff(cumulative, prepend=0.0) > 0).nonzero()[0]
    return int(steps[-1])


def _draw(weights: FloatRow, u: float) -> int:
    """Index drawn from unnormalised ``weights`` (>= 0, some > 0) by inverse CDF at ``u`` in [0, 1).

    Never returns a zero-weight index. A long array is searched by block sums first, so a draw
    over a whole vocabulary needs no float64 cumulative sum of every entry.
    """
    if weights.shape[0] <= _BLOCKED_DRAW_MIN:
        # np.add.accumulate: the same sums as cumsum, for a fraction of the call overhead.
        cumulative = np.add.accumulate(weights, dtype=np.float64)
        return _search(cumulative, u * cumulative[-1])
    starts = np.arange(0, weights.shape[0], _DRAW_BLOCK)
    block_cumulative = np.add.accumulate(np.add.reduceat(weights, starts, dtype=np.float64))
    target = u * block_cumulative[-1]
    block = _search(block_cumulative, target)
    start = block * _DRAW_BLOCK
    below = block_cumulative[block - 1] if block else 0.0
    within = np.add.accumulate(weights[start : start + _DRAW_BLOCK], dtype=np.float64)
    return start + _search(within, target - below)


def _weights(values: FloatRow, top: float, inv_t: float) -> npt.NDArray[np.float64]:
    """``exp((values - top) / T)`` in float64: unnormalised probabilities, the top one exactly 1."""
    weights = np.multiply(values, inv_t, dtype=np.float64)
    weights -= top * inv_t  # the top value's own product: its weight is exp(0)
    return np.exp(weights, out=weights)


def _draw_nucleus(
    ids: npt.NDArray[np.intp],
    values: FloatRow,
    *,
    top: float,
    mass: float | None,
    params: SamplingParams,
    u: float,
) -> int:
    """Token drawn from the fewest most likely of ``ids`` holding ``mass``, then min-p.

    ``values`` are the candidates' logits and ``top`` the row max. ``mass`` is top-p of the whole
    distribution's (unnormalised) weight; ``None`` when the candidates are all of it. The
    candidates are ordered most likely first, ties by lower id (``ids`` is ascending), so the
    nucleus is the same whichever candidate set it was cut from; the draw walks that order too.
    """
    inv_t = 1.0 / params.temperature
    # Minus the tempered logits: an ascending stable sort puts the most likely first, ties by lower id.
    weights = np.multiply(values, -inv_t, dtype=np.float64)
    order = weights.argsort(kind="stable")
    weights = weights[order]
    np.subtract(-top * inv_t, weights, out=weights)  # (value - top) / T, exactly 0 for the top
    np.exp(weights, out=weights)
    cumulative = np.add.accumulate(weights)
    if mass is None:
        mass = params.top_p * cumulative[-1]
    count = int(cumulative.searchsorted(mass, side="left")) + 1
    if params.min_p > 0.0:
        # Sorted, the tokens passing min-p (weight >= min_p * the top weight of 1) are a prefix.
        count = min(count, int(weights.shape[0] - weights[::-1].searchsorted(params.min_p, side="left")))
    count = min(count, order.shape[0])
    chosen = int(cumulative.searchsorted(u * cumulative[count - 1], side="right"))
    if chosen >= count:  # rounding put the target on the nucleus's total: search it alone
        chosen = _search(cumulative[:count], u * cumulative[count - 1])
    return int(ids[order[chosen]])


def _sample_row(row: FloatRow, params: SamplingParams, rng: np.random.Generator, index: int) -> int:
    """One token from ``row`` (already biased and penalised): temperature, top-k, top-p, min-p, one draw."""
    n = row.shape[0]
    k = params.top_k if params.top_k < n else 0
    if k:
        ids, values, top = _top_k(row, k)
    else:
        top = float(row[row.argmax()])
    if not math.isfinite(top):
        raise _bad_row(index, top)
    u = rng.random()
    inv_t = 1.0 / params.temperature
    top_p, min_p = params.top_p, params.min_p
    if k:
        # Temperature scales the k survivors only.
        if top_p < 1.0:
            return _draw_nucleus(ids, values, top=top, mass=None, params=params, u=u)
        weights = _weights(values, top, inv_t)
    elif top_p < 1.0:
        scaled = np.subtract(row, row.dtype.type(top), out=_scratch(row, 1))
        scaled *= row.dtype.type(inv_t)
        probs = np.exp(scaled, out=scaled)
        mass = top_p * float(np.add.reduce(probs, dtype=np.float64))
        ids, values = np.arange(n), row  # when no smaller candidate set holds the mass
        for size in _NUCLEUS_GROWTH:
            if size >= n:
                break
            candidates, candidate_values, _ = _top_k(row, size)
            if probs[candidates].sum(dtype=np.float64) >= mass:
                ids, values = candidates, candidate_values
                break
        return _draw_nucleus(ids, values, top=top, mass=mass, params=params, u=u)
    elif min_p > 0.0:
        # Only tokens within T * log(min_p) of the top can pass; the slack keeps float32 rounding
        # of the cut from dropping one, and the exact test below decides.
        cut = top + params.temperature * math.log(min_p)
        ids = (row >= cut - 1e-6 * (abs(cut) + 1.0)).nonzero()[0]
        weights = _weights(row[ids], top, inv_t)
    else:
        scaled = np.subtract(row, row.dtype.type(top), out=_scratch(row, 1))
        scaled *= row.dtype.type(inv_t)
        return _draw(np.exp(scaled, out=scaled), u)
    if min_p > 0.0:
        passing = weights >= min_p
        ids, weights = ids[passing], weights[passing]
    return int(ids[_draw(weights, u)])


def _bad_row(index: int, value: float) -> BackendError:
    return BackendError(
        f"logits row {index} has no usable maximum ({value}): the row holds NaN or +inf, or every token is -inf "
        "(banned); check the backend's output and any plugin that masks logits",
        backend=_LOGITS_SOURCE,
    )


def sample(
    logits: npt.NDArray[np.floating[Any]],
    params: Sequence[SamplingParams],
    states: Sequence[SamplerState],
    *,
    borrow_rows: bool = False,
) -> npt.NDArray[np.int64]:
    """Choose one token per row of ``logits`` (``[B, vocab]``); returns int64 ``[B]``.

    Row ``i`` uses ``params[i]`` and draws from ``states[i].rng`` only (one draw per sampled
    token, none when greedy), so its tokens depend on its seed, not on the batch. ``logits`` is
    never modified; with ``borrow_rows`` a writable row is penalised in place and restored before
    the call returns, which saves copying it (for arrays no other thread reads meanwhile, as the
    engine's own logits). Raises :class:`~infer.errors.InvalidParameterError` when the shapes disagree
    and :class:`~infer.errors.BackendError` for a row with NaN, +inf, or nothing but -inf.
    The caller records the chosen tokens with :meth:`SamplerState.append`.
    """
    if not isinstance(logits, np.ndarray) or logits.ndim != 2 or logits.dtype.kind != "f":
        raise InvalidParameterError("logits", getattr(logits, "shape", logits), "a [batch, vocab] float array")
    rows, vocab = logits.shape
    if len(params) != rows:
        raise InvalidParameterError("params", len(params), f"one SamplingParams per logits row ({rows})")
    if len(states) != rows:
        raise InvalidParameterError("states", len(states), f"one SamplerState per logits row ({rows})")
    chosen = np.empty(rows, dtype=np.int64)
    for i in range(rows):
        state, p = states[i], params[i]
        if state.vocab_size != vocab:
            raise InvalidParameterError("logits", logits.shape, f"{state.vocab_size} columns, the state's vocabulary")
        row = logits[i]
        # A masked row is processed in a copy: restoring it would mean saving most of the row anyway.
        if not (borrow_rows and row.flags.writeable and state.token_mask is None):
            row = state.process_logits(row, p, out=_scratch(row, 0))
        elif state._applies(p):
            saved = [(ids, row[ids]) for ids in state._touched()]
            try:
                state._apply(row, p)
                chosen[i] = _choose(row, p, state.rng, i)
            finally:
                for ids, values in saved:
                    row[ids] = values
            continue
        chosen[i] = _choose(row, p, state.rng, i)
    return chosen


def _choose(row: FloatRow, params: SamplingParams, rng: np.random.Generator, index: int) -> int:
    """The token for one processed row: its argmax when greedy, else a draw through the chain."""
    if params.greedy:
        token = int(row.argmax())
        if not math.isfinite(row[token]):
            raise _bad_row(index, float(row[token]))
        return token
    return _sample_row(row, params, rng, index)


def logprobs(logits_row: npt.ArrayLike, token_id: int, top_n: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """Log-probability of ``token_id`` under the raw row's softmax, and the ``top_n`` most likely tokens.

    Computed before any bias, penalty or temperature (what the model itself predicted), with a
    max-shifted log-sum-exp accumulated in float64. Alternatives are ordered most likely first,
    ties by lower id.
    """
    row = np.asarray(logits_row)
    if row.ndim != 1 or row.dtype.kind != "f" or row.size == 0:
        raise InvalidParameterError("logits_row", getattr(row, "shape", row), "a non-empty 1-D float array")
    token = _int("token_id", token_id, 0, row.shape[0] - 1, f"a token id in [0, {row.shape[0]})")
    top_n = _int("top_n", top_n, 0, MAX_TOP_LOGPROBS, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    top = float(row[row.argmax()])
    if not math.isfinite(top):
        raise _bad_row(0, top)
    shifted = np.subtract(row, row.dtype.type(top), out=_scratch(row, 1))
    log_total = top + math.log(float(np.add.reduce(np.exp(shifted, out=shifted), dtype=np.float64)))
    alternatives: tuple[tuple[int, float], ...] = ()
    if top_n:
        ids, _, _ = _top_k(row, top_n)
        best = ids[np.argsort(-row[ids], kind="stable")[:top_n]]
        alternatives = tuple((int(t), float(row[t]) - log_total) for t in best)
    return float(row[token]) - log_total, alternatives


class DefaultSampler:
    """The sampler infer-core registers as a plugin; any other ``infer_sample`` runs before it."""

    @hookimpl(trylast=True)
    def infer_sample(
        self,
        logits: npt.NDArray[np.float32],
        params: Sequence[SamplingParams],
        states: Sequence[SamplerState],
    ) -> npt.NDArray[np.int64]:
        """Sample with :func:`sample`, penalising the engine's own logits rows in place."""
        return sample(logits, params, states, borrow_rows=True)
