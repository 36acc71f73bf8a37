"""Where each sequence's keys and values live: KV blocks, the rows sequences hold in them, and moves.

A :class:`KVBlock` is per layer one key and one value tensor of shape
``[rows, kv_heads, capacity, head_dim]`` on the model's device; an :class:`OnnxKVCache` (one
sequence) is a row of a block. A :class:`KVPool` places the sequences of each step:

A sequence starts without a block; its first step puts it in one sized to the request. A
prefill runs on a block whose rows are its sequences in order (:meth:`KVPool.for_prefill`). A
decode step runs on a block that holds every sequence of the batch, in any rows, while its other
rows stand free (:meth:`KVPool.for_decode`): a sequence that leaves the batch frees its row
without moving anyone, and a newcomer takes a free row, copying only its own cache (measured:
with 16 requests coming and going on SmolLM2 int4, moving every row into a new block at each
change took 12% of the step time). A batch moves to a new block, every row copied once, only
when a sequence outgrows the block (it doubles, never past the model's context), when more than
a quarter of its rows stand free, or when a row still in use elsewhere is missing from the batch.

Host-side blocks are anonymous memory maps rather than heap arrays. Batches change shape as
requests come and go, and glibc keeps freed heap chunks of these sizes for reuse, so a burst of
concurrent requests left the process hundreds of MiB above its baseline for good (measured on
SmolLM2 int4: +190 MiB after 32 concurrent requests, +25 MiB with maps, whose pages go back
to the OS the moment their block is freed).

The pool owns placement alone: a cache's block, row and length are read-only outside this
module, and change only through the pool (placing, forking) or the cache's :meth:`~OnnxKVCache.advance`
and :meth:`~OnnxKVCache.rewind` (the steps that wrote or dropped positions).
"""

from __future__ import annotations

import mmap
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

import numpy as np
import numpy.typing as npt

from infer.contract import KVCache

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["KVBlock", "KVLayout", "KVPool", "OnnxKVCache", "host_zeros"]


def host_zeros(shape: tuple[int, ...], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """A zero-filled array in its own anonymous memory map, unmapped when the array is freed.

    Pages are mapped lazily, so a large array costs only what is written to it.
    """
    kind = np.dtype(dtype)
    count = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(count * kind.itemsize, 1))
    return np.frombuffer(buffer, dtype=kind, count=count).reshape(shape)


@final
@dataclass(frozen=True, slots=True)
class KVLayout:
    """What every block of one model shares: the graph's KV geometry and where tensors live."""

    #: Decoder layers (each has a key and a value tensor).
    layers: int
    kv_heads: int
    head_dim: int
    #: Element type of the cache (the model's ``kv_dtype``).
    dtype: type[np.floating[Any]]
    #: ONNX Runtime's name for the memory holding the tensors (``"cpu"`` or ``"cuda"``).
    ort_device: str
    #: Most tokens a row may hold: blocks never grow past it.
    context_length: int


class KVBlock:
    """KV tensors for ``rows`` sequences of up to ``capacity`` tokens, on the model's device."""

    def __init__(self, layout: KVLayout, rows: int, capacity: int) -> None:
        import onnxruntime as ort

        self.layout = layout
        self.rows = rows
        self.capacity = capacity
        shape = (rows, layout.kv_heads, capacity, layout.head_dim)
        #: The tensors as host arrays when they live on the CPU (the OrtValues wrap them), else ``None``.
        self.host: list[npt.NDArray[Any]] | None = None
        if layout.ort_device == "cpu":
            self.host = [host_zeros(shape, layout.dtype) for _ in range(2 * layout.layers)]
            self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.host]
        else:
            self.values = [
                ort.OrtValue.ortvalue_from_shape_and_type(shape, layout.dtype, layout.ort_device, 0)
                for _ in range(2 * layout.layers)
            ]
        self.nbytes = 2 * layout.layers * int(np.prod(shape)) * np.dtype(layout.dtype).itemsize
        #: Who holds each row (weakly: a dropped sequence frees its row like a released one).
        self.slots: list[weakref.ref[OnnxKVCache] | None] = [None] * rows

    def holder(self, row: int) -> OnnxKVCache | None:
        """The live sequence in ``row``, or ``None`` when the row stands free."""
        ref = self.slots[row]
        seq = ref() if ref is not None else None
        return seq if seq is not None and seq.block is self and seq.row == row else None

    def arrays(self) -> list[npt.NDArray[Any]]:
        """The KV tensors as host arrays (views on CPU, copies from a device)."""
        return self.host if self.host is not None else [v.numpy() for v in self.values]

    def bind(self, io: ort.IOBinding) -> None:
        """Bind this block as both past input and present output of every layer of ``io``."""
        from infer_backend_onnx.graph import past_names, present_names

        for layer in range(self.layout.layers):
            for past, present, value in zip(
                past_names(layer), present_names(layer), self.values[2 * layer : 2 * layer + 2], strict=True
            ):
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)


class OnnxKVCache(KVCache):
    """One sequence's cache: a row of a :class:`KVBlock`, placed by its :class:`KVPool` at the first step."""

    __slots__ = ("__weakref__", "_block", "_length", "_pool", "_released", "_requested", "_row")

    def __init__(self, pool: KVPool, capacity: int) -> None:
        self._pool = pool
        self._requested = capacity
        self._block: KVBlock | None = None
        self._row = 0
        self._length = 0
        self._released = False

    @property
    def pool(self) -> KVPool:
        """The pool (one per model) that made this cache and places it."""
        return self._pool

    @property
    def block(self) -> KVBlock | None:
        """The block holding this sequence, or ``None`` before its first step and after release."""
        return self._block

    @property
    def row(self) -> int:
        """This sequence's row of :attr:`block`."""
        return self._row

    @property
    def requested(self) -> int:
        """Tokens asked for when the sequence was made (its first block holds at least these)."""
        return self._requested

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return self._length

    @property
    def capacity(self) -> int:
        """Tokens the cache holds without moving (it grows on demand up to the model's context)."""
        return max(self._requested, self._block.capacity if self._block else 0)

    @property
    def nbytes(self) -> int:
        """This sequence's share of its block's memory."""
        if self._block is None:
            return 0
        return self._block.nbytes // self._block.rows

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` positions a step has just written into this sequence's row."""
        self._length += tokens

    def rewind(self, length: int) -> None:
        """Move the length back to ``length``: positions past it are dead, the next step overwrites them."""
        self._length = length

    def release(self) -> None:
        """Drop this sequence's hold on its block; the block is freed with its last sequence."""
        self._released = True
        self._block = None
        self._length = 0


@final
class KVPool:
    """Places one model's sequences in KV blocks (see the module docstring for the policy)."""

    def __init__(self, layout: KVLayout, *, pad_single_rows: bool = False) -> None:
        self.layout = layout
        #: Rows a decode step runs on at least: 2 when a lone row must run beside a free one
        #: (see :attr:`infer_backend_onnx.runtime.OnnxModel.pad_single_rows`).
        self.min_decode_rows = 2 if pad_single_rows else 1

    def new_sequence(self, capacity: int) -> OnnxKVCache:
        """An empty cache for up to ``capacity`` tokens (a block is taken at its first step)."""
        return OnnxKVCache(self, min(capacity, self.layout.context_length))

    def for_prefill(self, seqs: list[OnnxKVCache], need: int) -> KVBlock:
        """The block holding ``seqs`` as its rows in order, able to take ``need`` tokens per row."""
        block = seqs[0].block
        if (
            block is not None
            and block.rows == len(seqs)
            and block.capacity >= need
            and all(s.block is block and s.row == i for i, s in enumerate(seqs))
        ):
            return block
        return self._new_block(seqs, len(seqs), need)

    def for_decode(self, seqs: list[OnnxKVCache], need: int) -> KVBlock:
        """A block holding every sequence of ``seqs`` in some row, its other rows free."""
        least = self.min_decode_rows
        home = seqs[0].block
        if (
            home is not None
            and home.capacity >= need
            and home.rows == len(seqs) >= least
            and all(s.block is home for s in seqs)
        ):
            return home  # the steady state: the batch fills its block
        counts = Counter(s.block for s in seqs if s.block is not None)
        if counts:
            home = counts.most_common(1)[0][0]
            if home.capacity >= need and home.rows >= least:
                taken = {s.row for s in seqs if s.block is home}
                newcomers = [s for s in seqs if s.block is not home]
                free = [r for r in range(home.rows) if r not in taken and home.holder(r) is None]
                in_use_elsewhere = home.rows - len(taken) - len(free)
                spare = len(free) - len(newcomers)
                # newcomers are copied into free rows of host memory; a device block moves whole
                targets: Sequence[npt.NDArray[Any]] | None = home.host if newcomers else ()
                fits = 0 <= spare <= max(home.rows // 4, least - len(seqs))
                if fits and not in_use_elsewhere and targets is not None:
                    for seq, row in zip(newcomers, free, strict=False):
                        _move(seq, home, row, targets)
                    return home
        return self._new_block(seqs, max(len(seqs), least), need)

    def fork(self, source: OnnxKVCache, length: int, capacity: int) -> OnnxKVCache:
        """A cache in a block of its own, holding a copy of ``source``'s first ``length`` tokens."""
        fork = self.new_sequence(capacity)
        # read from the source's row as if it were the fork's, then move it home
        fork._block, fork._row, fork._length = source.block, source.row, length
        self._new_block([fork], 1, length)
        return fork

    def _new_block(self, seqs: list[OnnxKVCache], rows: int, need: int) -> KVBlock:
        """A new block of ``rows`` rows holding ``seqs`` in its first rows, in order."""
        current = max((s.block.capacity for s in seqs if s.block is not None), default=0)
        capacity = max(need, *(s.requested for s in seqs))
        if need > current > 0:
            # Outgrown: double rather than grow token by token, but never past the context.
            capacity = max(capacity, 2 * current)
        capacity = min(capacity, self.layout.context_length)
        new = KVBlock(self.layout, rows, capacity)
        targets = new.host if new.host is not None else [np.zeros(v.shape(), self.layout.dtype) for v in new.values]
        for row, seq in enumerate(seqs):
            _move(seq, new, row, targets)
        if new.host is None:
            for value, array in zip(new.values, targets, strict=True):
                value.update_inplace(array)
        return new


def _move(seq: OnnxKVCache, block: KVBlock, row: int, targets: Sequence[npt.NDArray[Any]]) -> None:
    """Copy ``seq``'s cache into ``row`` of ``targets`` (``block``'s arrays) and make it live there."""
    if seq.block is not None and seq.length:
        for dst, src in zip(targets, seq.block.arrays(), strict=True):
            dst[row, :, : seq.length] = src[seq.row, :, : seq.length]
    seq._block, seq._row = block, row
    block.slots[row] = weakref.ref(seq)
