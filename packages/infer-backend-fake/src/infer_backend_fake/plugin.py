"""The fake backend: a complete infer backend in one file, and the template for a test double.

A backend is a module with four hook functions (see ``infer.hookspecs``):

- ``infer_backend_info`` says who it is and what it can do;
- ``infer_load`` turns a :class:`infer.LoadSpec` into a :class:`infer.ModelHandle` (or ``None``
  when the reference is not for this backend);
- ``infer_prefill`` / ``infer_decode`` run a :class:`infer.Batch` on a handle it made and
  return float32 logits ``[batch, vocab]``;
- optionally (contract 1.1, each behind its declared capability) ``infer_truncate``,
  ``infer_fork`` and ``infer_prefill_all``, which prefix caching and speculative decoding use.

Here the "model" is a fixed random table: the logits of a context are the table row picked by a
rolling hash of all its tokens, so any split of the same tokens into prefill and decode steps
gives the same logits. The KV cache stores the tokens and the hash, bounded by its capacity.
It reads no weight, so it declares ``Capability.SYNTHETIC`` (for a backend that computes real
logits, copy ``infer_backend_numpy`` instead).

Fault injection (load options): ``latency`` seconds per step, ``hang_at_step`` N (blocks
``hang_seconds``), ``raise_at_step`` N, ``corrupt_cache_at_step`` N. Steps count every prefill
and decode call on the model, from 1.
"""

from __future__ import annotations

import itertools
import string
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from importlib import metadata
from typing import Any

import numpy as np
import numpy.typing as npt

import infer
from infer.errors import BackendError, InvalidParameterError

NAME = "fake"
_ROWS = 97  # distinct logit rows; prime, so hashes spread over all of them
_MASK = (1 << 64) - 1
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True, slots=True)
class FakeOptions:
    """Load options of the fake backend."""

    #: Number of logits per token (at least 259: 256 bytes and 3 special tokens).
    vocab_size: int = 512
    #: Most tokens per sequence.
    context_length: int = 4096
    #: Seed of the logit table.
    seed: int = 0
    #: Seconds every step sleeps.
    latency: float = 0.0
    #: Step number that blocks for ``hang_seconds`` (or until the model is closed).
    hang_at_step: int | None = None
    hang_seconds: float = 30.0
    #: Step number that raises a RuntimeError.
    raise_at_step: int | None = None
    #: Step number after which every cache's hash is scrambled.
    corrupt_cache_at_step: int | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> FakeOptions:
        """Validate user options into a :class:`FakeOptions`; name the bad key or value."""
        known = {f.name: f for f in fields(cls)}
        for key, value in options.items():
            if key not in known:
                raise InvalidParameterError(key, value, f"a fake backend option, one of {sorted(known)}")
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and (not is_number or value < 0):
                raise InvalidParameterError(key, value, "a non-negative number")
        return cls(**options)


class FakeKV(infer.KVCache):
    """Tokens seen so far and their rolling hash: an honest, bounded, append-only cache."""

    __slots__ = ("_hash", "_length", "_tokens")

    def __init__(self, capacity: int) -> None:
        self._tokens: npt.NDArray[np.int32] | None = np.zeros(capacity, dtype=np.int32)
        self._length = 0
        self._hash = 1469598103934665603

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return 0 if self._tokens is None else len(self._tokens)

    @property
    def nbytes(self) -> int:
        return 0 if self._tokens is None else self._tokens.nbytes

    @property
    def released(self) -> bool:
        return self._tokens is None

    def release(self) -> None:
        self._tokens = None

    def append(self, ids: npt.NDArray[np.int32]) -> int:
        """Append ``ids``; return the new hash of the whole context."""
        if self._tokens is None:
            raise BackendError("fake: step on a released cache", backend=NAME)
        end = self._length + len(ids)
        if end > len(self._tokens):
            raise BackendError(f"fake: cache of {len(self._tokens)} tokens cannot take {end}", backend=NAME)
        self._tokens[self._length : end] = ids
        self._length = end
        h = self._hash
        for token in ids.tolist():
            h = ((h ^ (token + 1)) * 1099511628211) & _MASK
        self._hash = h
        return h

    def hashes(self, ids: npt.NDArray[np.int32]) -> list[int]:
        """Append ``ids``; return the context's hash after each of them (all-position logits)."""
        return [self.append(ids[i : i + 1]) for i in range(len(ids))]

    def truncate(self, length: int) -> None:
        """Forget every token after the first ``length``: the hash is recomputed from them."""
        if self._tokens is None:
            raise BackendError("fake: truncate of a released cache", backend=NAME)
        kept = self._tokens[:length].copy()
        self._length, self._hash = 0, FakeKV(0)._hash
        self.append(kept)

    def fork(self, length: int, capacity: int) -> FakeKV:
        """A new cache of ``capacity`` tokens holding this one's first ``length``."""
        if self._tokens is None:
            raise BackendError("fake: fork of a released cache", backend=NAME)
        other = FakeKV(capacity)
        other.append(self._tokens[:length])
        return other


class FakeModel(infer.ModelHandle):
    """The fake's model handle."""

    backend = NAME

    def __init__(self, options: FakeOptions, *, tokenizer: bool = True) -> None:
        self.options = options
        self.vocab_size = options.vocab_size
        self.context_length = options.context_length
        rng = np.random.default_rng(options.seed)
        self.table = (rng.standard_normal((_ROWS, options.vocab_size)) * 4.0).astype(np.float32)
        self.table.flags.writeable = False  # rows are handed out as views: nobody may write to them
        if tokenizer:
            if options.vocab_size < 256 + len(_SPECIALS):
                raise InvalidParameterError("vocab_size", options.vocab_size, f">= {256 + len(_SPECIALS)}")
            self.tokenizer = build_tokenizer(options.vocab_size)
            self.eos_token_ids = (options.vocab_size - 1, options.vocab_size - 3)  # <|im_end|>, <|endoftext|>
            self.chat_template = _CHAT_TEMPLATE
        self.details = {"rows": _ROWS, "seed": options.seed}
        self.steps = 0
        self._unhang = threading.Event()
        self._caches: list[FakeKV] = []

    @classmethod
    def from_spec(cls, spec: infer.LoadSpec, options: Mapping[str, Any]) -> FakeModel | None:
        """Load ``spec`` (the ref ``"fake"`` or ``"fake:..."``, or any bundle); ``None`` for other refs."""
        if spec.device not in (None, "cpu"):
            raise InvalidParameterError("device", spec.device, "'cpu' (the fake backend has no other device)")
        if spec.dtype not in (None, "fp32"):
            raise InvalidParameterError("dtype", spec.dtype, "'fp32'")
        if spec.bundle is not None:  # mimic a real model's vocabulary; the core uses its tokenizer
            arch = spec.bundle.spec
            defaults = {"vocab_size": arch.vocab_size, "context_length": arch.max_position_embeddings}
            parsed = FakeOptions.parse(defaults | dict(options))
            tokenizer = False
        elif spec.path is None and (spec.ref == NAME or spec.ref.startswith(NAME + ":")):
            parsed = FakeOptions.parse(options)
            tokenizer = True
        else:
            return None
        if spec.context_length is not None:
            parsed = replace(parsed, context_length=spec.context_length)
        return cls(parsed, tokenizer=tokenizer)

    def new_sequence(self, capacity: int) -> FakeKV:
        cache = FakeKV(min(capacity, self.context_length))
        if self.options.corrupt_cache_at_step is not None:
            self._caches.append(cache)
        return cache

    def forward(self, batch: infer.Batch) -> npt.NDArray[np.float32]:
        """Append every row's tokens to its cache and return the last-token logits."""
        self._fault_injection()
        hashes = [_own(kv).append(ids) for kv, ids in zip(batch.sequences, batch.tokens, strict=True)]
        # A fresh array per step, as a real backend returns: the caller may keep or modify it,
        # and it is hot in cache for the sampler, as a just-computed output would be.
        return self.table[[h % _ROWS for h in hashes]]

    def forward_all(self, batch: infer.Batch) -> npt.NDArray[np.float32]:
        """Like :meth:`forward`, with the logits of every position, rows one after another."""
        self._fault_injection()
        hashes = [h for kv, ids in zip(batch.sequences, batch.tokens, strict=True) for h in _own(kv).hashes(ids)]
        return self.table[[h % _ROWS for h in hashes]]

    def draft(self, batch: infer.Batch) -> npt.NDArray[np.float32]:
        """A draft step (the ``draft`` capability): one token a row appended like decode, with the
        logits of a cheaper, imperfect approximation: the model's own on four contexts in five,
        another row's on the fifth (so drafts are sometimes rejected, deterministically)."""
        self._fault_injection()
        hashes = [_own(kv).append(ids) for kv, ids in zip(batch.sequences, batch.tokens, strict=True)]
        return self.table[[(h if h % 5 else h + 1) % _ROWS for h in hashes]]

    def truncate(self, kv: infer.KVCache, length: int) -> bool:
        """Roll ``kv`` back to ``length`` tokens (the ``truncate`` capability)."""
        _own(kv).truncate(length)
        return True

    def fork(self, kv: infer.KVCache, length: int, capacity: int) -> FakeKV:
        """A new cache with ``kv``'s first ``length`` tokens (the ``fork`` capability)."""
        return _own(kv).fork(length, min(capacity, self.context_length))

    def _fault_injection(self) -> None:
        self.steps += 1
        o = self.options
        if o.latency:
            time.sleep(o.latency)
        if self.steps == o.hang_at_step:
            self._unhang.wait(o.hang_seconds)
        if self.steps == o.raise_at_step:
            raise RuntimeError(f"fake: fault injected at step {self.steps}")
        if o.corrupt_cache_at_step is not None and self.steps >= o.corrupt_cache_at_step:
            for cache in self._caches:
                cache._hash ^= 0x5DEECE66D

    def close(self) -> None:
        self._unhang.set()  # a hung step returns at once


def _own(kv: infer.KVCache) -> FakeKV:
    if not isinstance(kv, FakeKV):
        raise BackendError(f"fake: got a {type(kv).__name__}, not a cache this backend made", backend=NAME)
    return kv


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer: 256 byte tokens, filler words up to the vocab, 3 specials last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    fillers = ("".join(p) for n in itertools.count(2) for p in itertools.product(string.ascii_lowercase, repeat=n))
    while len(vocab) < vocab_size - len(_SPECIALS):
        vocab.setdefault(next(fillers), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_SPECIALS))
    return tok


# -- the hooks ------------------------------------------------------------------------------


@infer.hookimpl
def infer_backend_info() -> infer.BackendInfo:
    try:
        version = metadata.version("infer-backend-fake")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    return infer.BackendInfo(
        name=NAME,
        version=version,
        contract_version=infer.CONTRACT_VERSION,
        devices=("cpu",),
        dtypes=("fp32",),
        capabilities=frozenset(
            {
                infer.Capability.BATCH,
                infer.Capability.DETERMINISTIC,
                infer.Capability.FAULT_INJECTION,
                infer.Capability.SYNTHETIC,  # reads no weight: the suite does not grade it against goldens
                infer.Capability.TRUNCATE,
                infer.Capability.FORK,
                infer.Capability.ALL_LOGITS,
                infer.Capability.DRAFT,
            }
        ),
        max_batch_size=64,
        logits_atol=0.0,
        priority=-100,  # never the default when a real backend is installed
    )


@infer.hookimpl
def infer_load(spec: infer.LoadSpec, options: Mapping[str, Any]) -> FakeModel | None:
    return FakeModel.from_spec(spec, options) if spec.backend == NAME else None


@infer.hookimpl
def infer_prefill(model: infer.ModelHandle, batch: infer.Batch) -> npt.NDArray[np.float32] | None:
    return model.forward(batch) if isinstance(model, FakeModel) else None


@infer.hookimpl
def infer_decode(model: infer.ModelHandle, batch: infer.Batch) -> npt.NDArray[np.float32] | None:
    return model.forward(batch) if isinstance(model, FakeModel) else None


@infer.hookimpl
def infer_prefill_all(model: infer.ModelHandle, batch: infer.Batch) -> npt.NDArray[np.float32] | None:
    return model.forward_all(batch) if isinstance(model, FakeModel) else None


@infer.hookimpl
def infer_draft(model: infer.ModelHandle, batch: infer.Batch) -> npt.NDArray[np.float32] | None:
    return model.draft(batch) if isinstance(model, FakeModel) else None


@infer.hookimpl
def infer_truncate(model: infer.ModelHandle, sequence: infer.KVCache, length: int) -> bool | None:
    return model.truncate(sequence, length) if isinstance(model, FakeModel) else None


@infer.hookimpl
def infer_fork(model: infer.ModelHandle, sequence: infer.KVCache, length: int, capacity: int) -> FakeKV | None:
    return model.fork(sequence, length, capacity) if isinstance(model, FakeModel) else None
