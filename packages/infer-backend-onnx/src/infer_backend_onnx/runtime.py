"""Running a built decoder graph: model handle, KV caches on the device, batched steps.

KV memory lives in blocks placed by :class:`~infer_backend_onnx.kv_pool.KVPool` (see that module
for which sequence goes where, and why): per layer one key and one value tensor of shape
``[rows, kv_heads, capacity, head_dim]`` on the session's device. The graph's
``GroupQueryAttention`` gets the same tensor bound as past input and present output, so each
step writes its new positions in place: nothing is copied per token, and nothing crosses to
numpy except the inputs (a few ints) and the logits.

Contract 1.1: truncation only moves a sequence's length back (the attention reads each row up to
its ``seqlens_k``, so positions past it are dead and the next step overwrites them); a fork gets a
block of its own with the prefix copied in (a row copy, as when a newcomer joins a block); and
all-position logits ask the graph's final ``Gather`` for every real position of the chunk instead
of each row's last one, so no second graph is built.

Contract 1.3: a model built with a draft (the same weights at a lower precision, e.g. a GGUF's
own 4-bit blocks under a float32 model) holds both in one graph, and a step's ``use_draft`` input
chooses which computes it (see graph._with_draft). Draft steps run on the very same KV blocks,
so drafting needs no prefill and no copy of the prompt's cache, and sees the full-precision keys
and values of every verified position; the positions a draft step writes are rewritten by the
verification step that follows.

Long contexts: a block's capacity costs memory, not time. The attention op reads each row's own
``seqlens_k + 1`` keys, so capacity beyond them is never read, and a short row batched with a
long one does not pay for it (measured on SmolLM2 native, one thread: a decode step with 6,000
and 16 cached tokens 42.0 ms, 6,000 alone 43.9, 16 alone 12.9). At 6,000 tokens attention is
~70% of the step; the cache's element type is the model's ``kv_dtype`` (see loading.kv_precision
for why float32 stays the CPU default).
"""

from __future__ import annotations

import abc
import threading
import weakref
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from infer.contract import Batch, KVCache, ModelHandle
from infer.errors import BackendError, ContextLengthError, EmptyPromptError, InvalidTokenError
from infer_backend_onnx.graph import USE_DRAFT
from infer_backend_onnx.kv_pool import KVBlock, KVLayout, KVPool, OnnxKVCache, host_zeros

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["LOGITS_ATOL", "OnnxHandle", "OnnxModel", "check_row"]

_Logits = npt.NDArray[np.float32]
#: The ``use_draft`` input of every step but a draft step (a graph built with a draft).
_MODEL_STEP: Final = np.array(False)
#: Largest ratio of padded to real tokens for which first prompts share one padded run.
_MAX_PADDING = 1.25


class OnnxHandle(ModelHandle):
    """Base of every handle this backend returns; the step hooks answer only for these."""

    backend = "onnx"

    @abc.abstractmethod
    def prefill(self, batch: Batch) -> _Logits:
        """Feed each row's tokens; logits of each row's last token, ``[B, vocab]``."""

    @abc.abstractmethod
    def decode(self, batch: Batch) -> _Logits:
        """Feed one token per row; next-token logits ``[B, vocab]``."""

    def prefill_all(self, batch: Batch) -> _Logits:
        """Feed each row's tokens; logits of every position, rows one after another (contract 1.1)."""
        raise BackendError(f"{type(self).__name__} cannot return all-position logits", backend="onnx")

    def truncate(self, seq: KVCache, length: int) -> bool:
        """Roll ``seq`` back to ``length`` tokens (contract 1.1)."""
        raise BackendError(f"{type(self).__name__} cannot truncate a cache", backend="onnx")

    def fork(self, seq: KVCache, length: int, capacity: int) -> KVCache:
        """A new cache holding ``seq``'s first ``length`` tokens (contract 1.1)."""
        raise BackendError(f"{type(self).__name__} cannot fork a cache", backend="onnx")

    def draft(self, batch: Batch) -> _Logits:
        """A decode step through the draft graph (contract 1.3)."""
        raise BackendError(
            f"{type(self).__name__} has no draft graph: load it with draft='native' or 'int4'", backend="onnx"
        )


class _DecodeBinding:
    """An IO binding for one-token steps on a block, bound once and reused every step.

    Inputs and the logits output are numpy arrays wrapped without copy; a step writes the
    new token ids and lengths into them and runs.
    """

    def __init__(self, model: OnnxModel, block: KVBlock, *, draft: bool = False) -> None:
        import onnxruntime as ort

        rows = block.rows
        self.input_ids = np.zeros((rows, 1), np.int64)
        self.seqlens = np.zeros(rows, np.int32)
        self.total = np.zeros((), np.int32)
        self.last = np.arange(rows, dtype=np.int64)
        self.io = model.session.io_binding()
        self._keep = [self.input_ids, self.seqlens, self.total, self.last]
        names = ["input_ids", "seqlens_k", "total_sequence_length", "last_token_index"]
        if model.drafted:
            self._keep.append(np.array(draft))
            names.append(USE_DRAFT)
        for name, array in zip(names, self._keep, strict=True):
            self.io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        self.logits: np.ndarray[Any, Any] | None = None
        if model.ort_device == "cpu":
            self.logits = host_zeros((rows, model.vocab_size), np.float32)
            self.io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        else:
            self.io.bind_output("logits", "cpu")
        block.bind(self.io)


#: Declared tolerance per precision (fp32 uses the backend-wide 1e-4 of ``infer_backend_info``).
LOGITS_ATOL: Final = {"fp16": 0.1, "int4": 1.5, "native": 1.5}


class OnnxModel(OnnxHandle):
    """A decoder graph built by this backend, loaded in an ONNX Runtime session."""

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        vocab_size: int,
        context_length: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        kv_dtype: type[np.floating[Any]],
        device: str,
        dtype: str,
        details: Mapping[str, Any],
        pad_single_rows: bool = False,
    ) -> None:
        from infer_backend_onnx.devices import ort_device

        self.session = session
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.layers = layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.kv_dtype = kv_dtype
        self.device = device
        self.dtype = dtype
        self.ort_device = ort_device(device)
        self.details = MappingProxyType(dict(details))
        self._lock = threading.Lock()
        self._closed = False
        #: Places this model's sequences in KV blocks.
        self.kv = KVPool(
            KVLayout(layers, kv_heads, head_dim, kv_dtype, self.ort_device, context_length),
            pad_single_rows=pad_single_rows,
        )
        #: The one-token binding of each live block, made at the block's first decode step.
        self._decode_io: weakref.WeakKeyDictionary[KVBlock, _DecodeBinding] = weakref.WeakKeyDictionary()
        #: Whether the graph holds a draft (contract 1.3), and the draft steps' bindings.
        self.drafted = USE_DRAFT in {i.name for i in session.get_inputs()}
        self._draft_io: weakref.WeakKeyDictionary[KVBlock, _DecodeBinding] = weakref.WeakKeyDictionary()
        #: Measured on SmolLM2 (logits up to ~28): prefill vs prefill+decode differ by 2.9e-5 at
        #: fp32, 0.032 at fp16 and 0.67 at int4 (one-row and many-row kernels round differently).
        self.logits_atol = LOGITS_ATOL.get(dtype)

    @property
    def pad_single_rows(self) -> bool:
        """Whether a one-row, one-token step runs beside a free row.

        int4 MatMulNBits takes another kernel path for a single row (logits move by ~0.8 on
        SmolLM2), while every row of a run of two or more rows gets bit-identical results whatever
        the other rows are. A lone row runs beside a free row, so a request's tokens never depend
        on what else is batched with it.
        """
        return self.kv.min_decode_rows > 1

    # -- contract ----------------------------------------------------------------------------
    def new_sequence(self, capacity: int) -> OnnxKVCache:
        """An empty cache for up to ``capacity`` tokens (memory is taken at the first step)."""
        if capacity < 1:
            raise BackendError(f"a sequence needs a capacity of at least 1 token, got {capacity}", backend="onnx")
        return self.kv.new_sequence(capacity)

    def close(self) -> None:
        """Drop the session; caches made from this model must not be used afterwards."""
        self._closed = True
        self.session = None

    def prefill(self, batch: Batch) -> _Logits:
        """Feed each row's tokens; logits of each row's last token, ``[B, vocab]``."""
        return self._forward(batch, decode=False)

    def decode(self, batch: Batch) -> _Logits:
        """Feed one token per row; next-token logits ``[B, vocab]``."""
        return self._forward(batch, decode=True)

    def draft(self, batch: Batch) -> _Logits:
        """One token a row through the draft graph, on the same caches: approximate next-token logits."""
        if not self.drafted:
            return super().draft(batch)
        return self._forward(batch, decode=True, draft=True)

    def prefill_all(self, batch: Batch) -> _Logits:
        """Feed each row's tokens; logits of every position, ``[sum of row lengths, vocab]``."""
        with self._lock:
            seqs = self._check(batch, decode=False)
            sizes = [t.size for t in batch.tokens]
            starts = np.concatenate(([0], np.cumsum(sizes)))
            out = np.empty((int(starts[-1]), self.vocab_size), np.float32)
            for rows in _groups(seqs, sizes):
                got = self._run([seqs[r] for r in rows], [batch.tokens[r] for r in rows], every=True)
                at = 0
                for r in rows:
                    out[starts[r] : starts[r + 1]] = got[at : at + sizes[r]]
                    at += sizes[r]
            return out

    def truncate(self, seq: KVCache, length: int) -> bool:
        """Roll ``seq`` back to ``length`` tokens: positions past it are never read again."""
        with self._lock:
            self._own(seq).rewind(length)
            return True

    def fork(self, seq: KVCache, length: int, capacity: int) -> OnnxKVCache:
        """A cache in a block of its own, holding a copy of ``seq``'s first ``length`` tokens."""
        with self._lock:
            return self.kv.fork(self._own(seq), length, capacity)

    def _own(self, seq: KVCache) -> OnnxKVCache:
        if not isinstance(seq, OnnxKVCache) or seq.pool is not self.kv or seq.released:
            raise BackendError("the cache was not made by this onnx model, or was released", backend="onnx")
        return seq

    # -- steps -------------------------------------------------------------------------------
    def _check(self, batch: Batch, decode: bool) -> list[OnnxKVCache]:
        if self._closed:
            from infer.errors import ModelClosedError

            raise ModelClosedError("this onnx model was closed; load it again")
        seqs: list[OnnxKVCache] = []
        for i, (seq, tokens) in enumerate(zip(batch.sequences, batch.tokens, strict=True)):
            if not isinstance(seq, OnnxKVCache) or seq.pool is not self.kv:
                raise BackendError(f"row {i}: the cache was not made by this onnx model", backend="onnx")
            if seq.released:
                raise BackendError(f"row {i}: the cache was released; start a new sequence", backend="onnx")
            check_row(i, tokens, seq.length, self.vocab_size, self.context_length, decode=decode)
            seqs.append(seq)
        if len({id(s) for s in seqs}) != len(seqs):
            raise BackendError("a sequence appears twice in one batch", backend="onnx")
        return seqs

    def _forward(self, batch: Batch, *, decode: bool, draft: bool = False) -> _Logits:
        with self._lock:
            seqs = self._check(batch, decode)
            sizes = [t.size for t in batch.tokens]
            out = np.empty((batch.size, self.vocab_size), np.float32)
            for rows in _groups(seqs, sizes):
                out[rows] = self._run([seqs[r] for r in rows], [batch.tokens[r] for r in rows], draft=draft)
            return out

    def _run(
        self, seqs: list[OnnxKVCache], tokens: list[npt.NDArray[np.int32]], *, every: bool = False, draft: bool = False
    ) -> _Logits:
        sizes = np.array([t.size for t in tokens])
        totals = np.array([s.length for s in seqs]) + sizes
        need = int(totals.max())
        if sizes.max() == 1:  # one token a row: its last position is its every position
            logits = self._run_decode(self.kv.for_decode(seqs, need), seqs, tokens, totals, draft=draft)
        else:
            logits = self._run_prefill(self.kv.for_prefill(seqs, need), tokens, sizes, totals, every=every)
        for seq, n in zip(seqs, sizes, strict=True):
            seq.advance(int(n))
        return logits

    def _run_decode(
        self,
        block: KVBlock,
        seqs: list[OnnxKVCache],
        tokens: list[npt.NDArray[np.int32]],
        totals: npt.NDArray[np.int64],
        *,
        draft: bool = False,
    ) -> _Logits:
        bindings = self._draft_io if draft else self._decode_io
        d = bindings.get(block)
        if d is None:
            d = bindings[block] = _DecodeBinding(self, block, draft=draft)
        rows = [s.row for s in seqs]
        ordered = len(rows) == block.rows and rows == list(range(block.rows))
        if not ordered:
            # free rows compute a token 0 at position 0 of their own row, which nobody reads
            d.input_ids[:] = 0
            d.seqlens[:] = 0
        d.input_ids[rows, 0] = [int(t[0]) for t in tokens]
        d.seqlens[rows] = totals - 1
        d.total[()] = totals.max()
        self.session.run_with_iobinding(d.io)
        logits: _Logits = d.logits if d.logits is not None else d.io.get_outputs()[0].numpy()
        return logits.copy() if ordered else logits[rows]

    def _run_prefill(
        self,
        block: KVBlock,
        tokens: list[npt.NDArray[np.int32]],
        sizes: npt.NDArray[np.int64],
        totals: npt.NDArray[np.int64],
        *,
        every: bool = False,
    ) -> _Logits:
        rows, width = len(tokens), int(sizes.max())
        # Rows shorter than the widest are right-padded: only first prompts are grouped that way
        # (see _groups), and the attention masks each row to its own length.
        ids = np.zeros((rows, width), np.int64)
        for r, t in enumerate(tokens):
            ids[r, : t.size] = t
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("seqlens_k", (totals - 1).astype(np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(totals.max(), np.int32))
        if every:  # the graph gathers the positions named here: name every real one
            picked = np.concatenate([r * width + np.arange(n) for r, n in enumerate(sizes)]).astype(np.int64)
        else:
            picked = (np.arange(rows) * width + sizes - 1).astype(np.int64)
        io.bind_cpu_input("last_token_index", picked)
        if self.drafted:
            io.bind_cpu_input(USE_DRAFT, _MODEL_STEP)
        io.bind_output("logits", "cpu")
        block.bind(io)
        self.session.run_with_iobinding(io)
        logits: _Logits = io.get_outputs()[0].numpy()
        return logits


def check_row(
    row: int, tokens: npt.NDArray[np.int32], length: int, vocab_size: int, context_length: int, *, decode: bool
) -> None:
    """Raise the typed error for a row that cannot run: empty, too many tokens for a decode,
    an id outside the vocabulary, or more tokens than the context holds."""
    if tokens.size == 0:
        raise EmptyPromptError(f"row {row} has no tokens; feed at least one")
    if decode and tokens.size != 1:
        raise BackendError(f"row {row}: decode takes one token per row, got {tokens.size}", backend="onnx")
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        raise InvalidTokenError(int(tokens[bad[0]]), vocab_size, position=length + int(bad[0]))
    if length + tokens.size > context_length:
        raise ContextLengthError(length + int(tokens.size), context_length)


def _groups(seqs: Sequence[OnnxKVCache], sizes: Sequence[int]) -> list[list[int]]:
    """Split a batch's rows into runs: equal new lengths share a run; so do first prompts of
    different lengths, right-padded, when padding adds at most a quarter more tokens.

    Prefill is compute-bound, so padding costs what it adds (measured on SmolLM2 int4: eight
    prompts of 9 to 64 tokens padded into one run went at 2/3 the speed of one run per length).
    The attention op masks right padding only when no row has a past, which is why rows with
    history are always grouped by length; and it takes a past for one row only when that row
    feeds several tokens (a later prefill chunk), so such rows run alone.
    """
    if max(sizes) > 1 and any(s.length for s in seqs):
        fresh = [r for r, s in enumerate(seqs) if s.length == 0]
        first = _groups([seqs[r] for r in fresh], [sizes[r] for r in fresh]) if fresh else []
        return [[fresh[i] for i in group] for group in first] + [[r] for r, s in enumerate(seqs) if s.length]
    if len(set(sizes)) == 1:
        return [list(range(len(seqs)))]
    if all(s.length == 0 for s in seqs) and len(sizes) * max(sizes) <= _MAX_PADDING * sum(sizes):
        return [list(range(len(seqs)))]
    by_size: dict[int, list[int]] = {}
    for r, n in enumerate(sizes):
        by_size.setdefault(n, []).append(r)
    return list(by_size.values())
