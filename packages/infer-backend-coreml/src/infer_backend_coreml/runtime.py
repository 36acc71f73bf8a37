"""The loaded model: one Core ML state per sequence, prompts fed in fixed padded chunks.

:class:`CoreMLModel` is what ``infer_load`` returns. It drives an :class:`Executor`, which runs
one call of the package's ``prefill`` or ``decode`` function on a sequence's state. The
executor on macOS is :class:`CoreMLExecutor` (``MLModel.predict`` with ``state=``); the
stepping logic above it (chunking, padding, positions, validation) is plain Python and is
tested on every platform with an executor that evaluates the same graph in numpy.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, final

import numpy as np
import numpy.typing as npt

from infer.contract import Batch, KVCache, ModelHandle
from infer.errors import (
    BackendError,
    ContextLengthError,
    EmptyPromptError,
    InvalidParameterError,
    InvalidTokenError,
    ModelClosedError,
)
from infer_backend_coreml.builder import (
    FUNCTION_DECODE,
    FUNCTION_PREFILL,
    INPUT_IDS,
    INPUT_LAST_INDEX,
    INPUT_POSITION,
    OUTPUT_LOGITS,
)
from infer_backend_coreml.options import BuildConfig

__all__ = ["BACKEND", "CoreMLExecutor", "CoreMLModel", "CoreMLSequence", "Executor"]

#: Name of this backend (``backend=`` and the entry point).
BACKEND = "coreml"


class Executor(Protocol):
    """Runs one call of a package function on one sequence's state."""

    def new_state(self) -> Any:
        """A fresh, zero-filled KV state."""

    def prefill(
        self, state: Any, input_ids: npt.NDArray[np.int32], position: int, last_index: int
    ) -> npt.NDArray[np.float32]:
        """``input_ids`` ``[1, prefill_chunk]`` at ``position``; logits ``[1, vocab]`` of row ``last_index``."""

    def decode(self, state: Any, input_ids: npt.NDArray[np.int32], position: int) -> npt.NDArray[np.float32]:
        """``input_ids`` ``[1, 1]`` at ``position``; logits ``[1, vocab]``."""


_COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE"}


@final
class CoreMLExecutor:
    """Both functions of a built package, loaded with the chosen compute units (macOS 15+)."""

    def __init__(self, package: Path, compute_units: str) -> None:
        import coremltools as ct

        units = getattr(ct.ComputeUnit, _COMPUTE_UNITS[compute_units])
        # One MLModel per function; a state made by either serves both, as they declare the
        # same states.
        self._prefill = ct.models.MLModel(str(package), compute_units=units, function_name=FUNCTION_PREFILL)
        self._decode = ct.models.MLModel(str(package), compute_units=units, function_name=FUNCTION_DECODE)

    def new_state(self) -> Any:
        """A fresh state from the decode function (shared with prefill)."""
        return self._decode.make_state()

    def prefill(
        self, state: Any, input_ids: npt.NDArray[np.int32], position: int, last_index: int
    ) -> npt.NDArray[np.float32]:
        """One ``prefill`` call."""
        inputs = {
            INPUT_IDS: input_ids,
            INPUT_POSITION: np.array([position], dtype=np.int32),
            INPUT_LAST_INDEX: np.array([last_index], dtype=np.int32),
        }
        return np.asarray(self._prefill.predict(inputs, state=state)[OUTPUT_LOGITS], dtype=np.float32)

    def decode(self, state: Any, input_ids: npt.NDArray[np.int32], position: int) -> npt.NDArray[np.float32]:
        """One ``decode`` call."""
        inputs = {INPUT_IDS: input_ids, INPUT_POSITION: np.array([position], dtype=np.int32)}
        return np.asarray(self._decode.predict(inputs, state=state)[OUTPUT_LOGITS], dtype=np.float32)


@final
class CoreMLSequence(KVCache):
    """One sequence's KV cache: a Core ML state plus the count of tokens written to it."""

    __slots__ = ("_capacity", "_length", "_nbytes", "_owner", "state")

    def __init__(self, owner: CoreMLModel, state: Any, capacity: int, nbytes: int) -> None:
        self._owner = owner
        #: The executor's state object; ``None`` once released.
        self.state: Any = state
        self._capacity = capacity
        self._length = 0
        self._nbytes = nbytes

    @property
    def length(self) -> int:
        """Tokens whose keys and values are in the state."""
        return self._length

    @property
    def capacity(self) -> int:
        """Most tokens this sequence may hold."""
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Bytes of the state buffers (0 once released)."""
        return 0 if self.state is None else self._nbytes

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self.state is None

    def release(self) -> None:
        """Drop the state; Core ML frees its buffers with the last reference."""
        self.state = None

    def _advance(self, tokens: int) -> None:
        self._length += tokens

    def _truncate(self, length: int) -> None:
        # Nothing to erase: a query at position p attends to keys <= p only, and the next step
        # writes positions length, length + 1, ... before any query can see them.
        self._length = length


class CoreMLModel(ModelHandle):
    """A built package loaded for prediction; see :mod:`infer_backend_coreml.runtime`."""

    backend = BACKEND

    def __init__(
        self,
        executor: Executor,
        *,
        config: BuildConfig,
        vocab_size: int,
        kv_bytes: int,
        device: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self._executor: Executor | None = executor
        self.config = config
        self.vocab_size = vocab_size
        self.context_length = config.context_length
        self.device = device
        self.dtype = config.dtype
        self._kv_bytes = kv_bytes
        self.details = MappingProxyType(dict(details or {}))
        # A Core ML state must not be used by two predictions at once, and predictions on one
        # model gain nothing from running side by side on one device: one at a time.
        self._lock = threading.Lock()

    def _running(self) -> Executor:
        if self._executor is None:
            raise ModelClosedError("this Core ML model was closed; load it again to generate")
        return self._executor

    def new_sequence(self, capacity: int) -> CoreMLSequence:
        """A fresh state for up to ``capacity`` tokens (at most :attr:`context_length`)."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 0 < capacity <= self.context_length:
            raise InvalidParameterError("capacity", capacity, f"an integer in 1..{self.context_length}")
        return CoreMLSequence(self, self._running().new_state(), capacity, self._kv_bytes)

    def close(self) -> None:
        """Drop the loaded functions."""
        self._executor = None

    def _row(self, batch: Batch, i: int) -> tuple[CoreMLSequence, npt.NDArray[np.int32]]:
        """Row ``i``'s sequence and tokens, checked against this model and the sequence's room."""
        seq, tokens = batch.sequences[i], np.asarray(batch.tokens[i], dtype=np.int32).reshape(-1)
        if not isinstance(seq, CoreMLSequence) or seq._owner is not self:
            raise BackendError(f"row {i}: the sequence was not made by this Core ML model", backend=BACKEND)
        if seq.released:
            raise BackendError(f"row {i}: the sequence was released; start a new one", backend=BACKEND)
        if tokens.size == 0:
            raise EmptyPromptError(f"row {i} has no tokens; feed at least one token id")
        bad = np.flatnonzero((tokens < 0) | (tokens >= self.vocab_size))
        if bad.size:
            raise InvalidTokenError(int(tokens[bad[0]]), self.vocab_size, position=int(bad[0]))
        if seq.length + tokens.size > seq.capacity:
            raise ContextLengthError(seq.length + int(tokens.size), seq.capacity)
        return seq, tokens

    def prefill(self, batch: Batch) -> npt.NDArray[np.float32]:
        """Feed every row's tokens in chunks; logits ``[B, vocab]`` of each row's last token."""
        rows = [self._row(batch, i) for i in range(batch.size)]
        executor = self._running()
        out = np.empty((batch.size, self.vocab_size), dtype=np.float32)
        chunk = self.config.prefill_chunk
        with self._lock:
            for i, (seq, tokens) in enumerate(rows):
                for start in range(0, tokens.size, chunk):
                    piece = tokens[start : start + chunk]
                    if piece.size == 1:
                        # A lone token needs no padding: the decode function does the same work.
                        logits = executor.decode(seq.state, piece.reshape(1, 1), seq.length)
                    else:
                        ids = np.zeros((1, chunk), dtype=np.int32)
                        ids[0, : piece.size] = piece
                        logits = executor.prefill(seq.state, ids, seq.length, piece.size - 1)
                    seq._advance(piece.size)
                out[i] = logits.reshape(-1)
        return out

    def truncate(self, sequence: KVCache, length: int) -> bool:
        """Roll ``sequence`` back to its first ``length`` tokens (the ``truncate`` capability).

        The core checks ``length`` against what the cache holds (``Model.truncate``); here only
        that the cache is this model's and alive.
        """
        if not isinstance(sequence, CoreMLSequence) or sequence._owner is not self:
            raise BackendError("truncate: the sequence was not made by this Core ML model", backend=BACKEND)
        if sequence.released:
            raise BackendError("truncate: the sequence was released; start a new one", backend=BACKEND)
        with self._lock:
            sequence._truncate(length)
        return True

    def decode(self, batch: Batch) -> npt.NDArray[np.float32]:
        """Feed one token per row; logits ``[B, vocab]``."""
        rows = [self._row(batch, i) for i in range(batch.size)]
        for i, (_, tokens) in enumerate(rows):
            if tokens.size != 1:
                raise BackendError(
                    f"decode row {i} has {tokens.size} tokens; decode takes exactly one", backend=BACKEND
                )
        executor = self._running()
        out = np.empty((batch.size, self.vocab_size), dtype=np.float32)
        with self._lock:
            for i, (seq, tokens) in enumerate(rows):
                out[i] = executor.decode(seq.state, tokens.reshape(1, 1), seq.length).reshape(-1)
                seq._advance(1)
        return out
