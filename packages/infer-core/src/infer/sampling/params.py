"""Sampling parameters: :class:`SamplingParams` and the checks that keep an invalid one from existing.

A request's parameters are checked once, when they are built; :meth:`SamplingParams.validate`
adds the checks that need the model's vocabulary (token ids in ``logit_bias`` and
``stop_token_ids``). Nothing here knows about logits: the chain (:mod:`infer.sampling.chain`)
reads these values, and the per-request state (:mod:`infer.sampling.state`) prepares from them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from infer.errors import InvalidParameterError

if TYPE_CHECKING:
    from infer.structured import Constraint

__all__ = [
    "BAN_BIAS",
    "GREEDY_TEMPERATURE",
    "MAX_REPETITION_PENALTY",
    "MAX_TOP_LOGPROBS",
    "MIN_REPETITION_PENALTY",
    "SamplingParams",
]

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
    # The vocabulary size validate() last passed for (not a parameter: set by validate, never compared,
    # copied or pickled). The instance cannot change, so one check per vocabulary is enough: a
    # request checked where it enters (Model.prepare) is not checked again by the engine's state.
    _valid_for: int | None = field(default=None, init=False, repr=False, compare=False)

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
        # Every field passed _checked when the instance was made and none can change since: only
        # the token ids, against this vocabulary, are left to check (once per vocabulary).
        if vocab_size is None:
            return
        vocab_size = _int("vocab_size", vocab_size, 1, None, "an integer >= 1")
        if self._valid_for != vocab_size:
            self._check_vocab(vocab_size)
            object.__setattr__(self, "_valid_for", vocab_size)

    def _check_vocab(self, vocab_size: int) -> None:
        """The checks that need the vocabulary, in :meth:`_checked`'s order: ``logit_bias``, ``stop_token_ids``."""
        _logit_bias(self.logit_bias, vocab_size)
        _stop_token_ids(self.stop_token_ids, vocab_size)

    @property
    def greedy(self) -> bool:
        """Whether every step takes the most likely token (temperature ~0, or top-k of 1); draws no randomness."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def __reduce__(self) -> tuple[type[SamplingParams], tuple[Any, ...]]:
        # The read-only bias mapping cannot be pickled itself: rebuild from a plain dict, so
        # params survive pickle, copy.deepcopy and multiprocessing.
        return type(self), tuple(
            dict(self.logit_bias) if f.name == "logit_bias" else getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init
        )

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied, validated like a new instance."""
        return dataclasses.replace(self, **changes)
