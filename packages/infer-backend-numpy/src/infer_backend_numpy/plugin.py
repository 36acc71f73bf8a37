"""The numpy backend: a backend that loads real weights, in one file, and the template to copy.

Where the fake backend makes its logits up, this one computes them from the bundle's weights, so
it passes the whole conformance suite, goldens included. The maths is the suite's own numpy
forward (:class:`infer_conformance.reference.ReferenceModel`, float64, one sequence at a time):
this file shows everything around the maths that a backend owes the core. To write your own
backend, copy this file and replace the three calls into ``ReferenceModel`` (``__init__``,
``new_cache``, ``step``) with your kernels.

What the core hands you and what you hand back (``infer.hookspecs`` has the full contract):

- ``infer_load(spec, options)``: ``spec.bundle`` is the model folder already parsed, its typed
  architecture in ``spec.bundle.spec`` and its weights, memory-mapped, in ``spec.bundle.weights``
  (a GGUF file arrives converted into the same layout). Return ``None`` for references you
  cannot open; refuse a bad option, dtype or device with ``InvalidParameterError``.
- ``new_sequence(capacity)`` makes one sequence's KV cache; prefill and decode append to it.
- ``infer_prefill`` / ``infer_decode`` get a :class:`infer.Batch` and return float32 logits of
  each row's last token, ``[rows, vocab]``, as a fresh array the caller may keep.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np
import numpy.typing as npt

import infer
from infer.errors import BackendError, InvalidParameterError
from infer_conformance.reference import ReferenceCache, ReferenceModel

NAME = "numpy"


class NumpyKV(infer.KVCache):
    """One sequence's keys and values (the reference's cache), bounded by its capacity."""

    __slots__ = ("_cache", "_capacity", "_length")

    def __init__(self, cache: ReferenceCache, capacity: int) -> None:
        self._cache: ReferenceCache | None = cache
        self._capacity = capacity
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def nbytes(self) -> int:
        if self._cache is None:
            return 0
        return sum(a.nbytes for a in (*self._cache.keys, *self._cache.values))

    @property
    def released(self) -> bool:
        return self._cache is None

    def release(self) -> None:
        self._cache = None  # the arrays go with the last reference to them

    def cache(self, adding: int) -> ReferenceCache:
        """The live cache, checked to have room for ``adding`` more tokens."""
        if self._cache is None:
            raise BackendError("numpy: step on a released cache", backend=NAME)
        if self._length + adding > self._capacity:
            raise BackendError(
                f"numpy: a cache of {self._capacity} tokens cannot take {self._length + adding}", backend=NAME
            )
        return self._cache


class NumpyModel(infer.ModelHandle):
    """A bundle loaded for the numpy forward."""

    backend = NAME

    def __init__(self, bundle: Any, context_length: int | None) -> None:
        self.reference = ReferenceModel(bundle)
        self.vocab_size = bundle.spec.vocab_size
        limit = bundle.spec.max_position_embeddings
        self.context_length = min(context_length or limit, limit)
        # Tokenizer, chat template and eos ids stay None: the core takes them from the bundle.
        self.details = {"compute": "float64", "layers": bundle.spec.num_hidden_layers}

    @classmethod
    def from_spec(cls, spec: infer.LoadSpec, options: Mapping[str, Any]) -> NumpyModel | None:
        """Load ``spec``'s bundle; ``None`` when the reference is not a bundle."""
        if spec.bundle is None:
            return None  # not ours: the core reports that no backend could load it
        if options:
            key = next(iter(options))
            raise InvalidParameterError(key, options[key], "no option: the numpy backend takes none")
        if spec.device not in (None, "cpu"):
            raise InvalidParameterError("device", spec.device, "'cpu' (the numpy backend has no other device)")
        if spec.dtype not in (None, "fp32"):
            raise InvalidParameterError("dtype", spec.dtype, "'fp32' (computed in float64, returned as float32)")
        return cls(spec.bundle, spec.context_length)

    def new_sequence(self, capacity: int) -> NumpyKV:
        return NumpyKV(self.reference.new_cache(), min(capacity, self.context_length))

    def forward(self, batch: infer.Batch) -> npt.NDArray[np.float32]:
        """Feed each row's tokens to its cache; the logits of each row's last token.

        Token ids need no check here: the core validated them against ``vocab_size``. The core
        also never runs two steps of one model at once, so the handle needs no lock; two models
        share nothing, so they may run in two threads.
        """
        out = np.empty((batch.size, self.vocab_size), np.float32)
        for row, (kv, tokens) in enumerate(zip(batch.sequences, batch.tokens, strict=True)):
            own = _own(kv)
            out[row] = self.reference.step(own.cache(len(tokens)), tokens.tolist())[-1]
            own._length += len(tokens)
        return out

    def forward_all(self, batch: infer.Batch) -> npt.NDArray[np.float32]:
        """Like :meth:`forward`, returning every position's logits, rows one after another."""
        parts = []
        for kv, tokens in zip(batch.sequences, batch.tokens, strict=True):
            own = _own(kv)
            parts.append(self.reference.step(own.cache(len(tokens)), tokens.tolist()))
            own._length += len(tokens)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def truncate(self, kv: infer.KVCache, length: int) -> bool:
        """Roll ``kv`` back to its first ``length`` tokens: keys and values are sliced."""
        own = _own(kv)
        cache = own.cache(0)
        cache.keys = [k[:, :length] for k in cache.keys]
        cache.values = [v[:, :length] for v in cache.values]
        cache.length = own._length = length
        return True

    def fork(self, kv: infer.KVCache, length: int, capacity: int) -> NumpyKV:
        """A new cache holding ``kv``'s first ``length`` tokens (copies: the two never share memory)."""
        cache = _own(kv).cache(0)
        copy = ReferenceCache(
            keys=[k[:, :length].copy() for k in cache.keys],
            values=[v[:, :length].copy() for v in cache.values],
            length=length,
        )
        forked = NumpyKV(copy, min(capacity, self.context_length))
        forked._length = length
        return forked


def _own(kv: infer.KVCache) -> NumpyKV:
    if not isinstance(kv, NumpyKV):
        raise BackendError(f"numpy: got a {type(kv).__name__}, not a cache this backend made", backend=NAME)
    return kv


# -- the hooks ------------------------------------------------------------------------------


@infer.hookimpl
def infer_backend_info() -> infer.BackendInfo:
    try:
        version = metadata.version("infer-backend-numpy")
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
                infer.Capability.TRUNCATE,
                infer.Capability.FORK,
                infer.Capability.ALL_LOGITS,
            }
        ),
        max_batch_size=16,
        # float64 maths rounded once to float32: prefill and decode, batched and alone, differ
        # by float64 summation order only (~1e-12). Against the float32 goldens the distance is
        # the goldens' own float32 rounding, up to ~1.4e-5 on the window and Gemma fixtures, so
        # the declared bound is the suite's fp32 one: it tightens nothing it cannot keep.
        logits_atol=1e-4,
        priority=-10,  # an example: never preferred over an optimised backend
    )


@infer.hookimpl
def infer_load(spec: infer.LoadSpec, options: Mapping[str, Any]) -> NumpyModel | None:
    return NumpyModel.from_spec(spec, options) if spec.backend == NAME else None


@infer.hookimpl
def infer_prefill(model: infer.ModelHandle, batch: infer.Batch) -> npt.NDArray[np.float32] | None:
    return model.forward(batch) if isinstance(model, NumpyModel) else None


@infer.hookimpl
def infer_decode(model: infer.ModelHandle, batch: infer.Batch) -> npt.NDArray[np.float32] | None:
    return model.forward(batch) if isinstance(model, NumpyModel) else None


@infer.hookimpl
def infer_prefill_all(model: infer.ModelHandle, batch: infer.Batch) -> npt.NDArray[np.float32] | None:
    return model.forward_all(batch) if isinstance(model, NumpyModel) else None


@infer.hookimpl
def infer_truncate(model: infer.ModelHandle, sequence: infer.KVCache, length: int) -> bool | None:
    return model.truncate(sequence, length) if isinstance(model, NumpyModel) else None


@infer.hookimpl
def infer_fork(model: infer.ModelHandle, sequence: infer.KVCache, length: int, capacity: int) -> NumpyKV | None:
    return model.fork(sequence, length, capacity) if isinstance(model, NumpyModel) else None
