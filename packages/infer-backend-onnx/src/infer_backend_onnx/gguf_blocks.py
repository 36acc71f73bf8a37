"""GGUF quantized blocks mapped exactly onto ``MatMulNBits``: the same codes and scales, no second rounding.

Every GGML type handled here stores, per block of ``block_size`` weights along a row, integer
codes and a float affine map: ``w = scale * q`` (+ ``min`` for the types with one). The map onto
the op reads each code against the op's default zero point ``z = 2**(bits-1)`` (no zero-point
tensor) and carries whatever is left as a per-block ``offset``::

    w = scale * (code - z) + offset

==========  ==========  =====  ===========================  =======================================
GGML type   sub-block   bits   code                         offset
==========  ==========  =====  ===========================  =======================================
Q4_0        32          4      q                            none (``d * (q - 8)`` is the op's own form)
Q4_1        32          4      q                            ``m + 8 d``
Q4_K        32          4      q                            ``8 d sc - dmin m``
Q8_0        32          8      q + 128                      none
Q5_0        32          8      q + 112                      none
Q5_1        32          8      q + 112                      ``m + 16 d``
Q5_K        32          8      q + 112                      ``16 d sc - dmin m``
Q6_K        16          8      q + 96                       none
==========  ==========  =====  ===========================  =======================================

Scales are the products :mod:`gguf` dequantizes with (``d * sc`` in float32), so the weight the
graph multiplies by equals :func:`gguf.quants.dequantize` to float32 rounding (exactly where
there is no offset). The offsets are added outside the op as ``block_sums(x) @ offsets.T``, a
``[K/block, N]`` product: ``MatMulNBits`` also takes float zero points, which would carry the
minimums inside the op, but on ONNX Runtime 1.32's CPU provider that path is ~140x slower
(``benchmarks/onnx/matmulnbits_mins.py``, one row: SmolLM2's 49,152 x 576 head 273 ms against
2.6 ms with the offset product and 1.9 ms without minimums; its 3,072 x 576 gate/up 6.6 ms
against 0.052 and 0.047 ms). On the whole SmolLM2 Q4_1 model the offset products cost ~15% of a
decode step. A uint8 zero point of 0 plus the product (exact without the ``+ 8 d`` term) measured
slower than the default zero point (4.5 ms on the head).

5- and 6-bit types become 8-bit blocks (the op has no 5- or 6-bit kernel): the codes are the same
integers, at twice the memory of a 4-bit block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from infer_backend_onnx.quantize import QuantizedWeight, pack

if TYPE_CHECKING:
    from infer.gguf_tensors import RawTensor

__all__ = ["EXACT_TYPES", "BlockWeight", "from_gguf", "join"]

_F32 = npt.NDArray[np.float32]
_U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class BlockWeight:
    """A weight as ``MatMulNBits`` blocks: ``w = scales * (codes - 2**(bits-1)) + offsets`` per block."""

    #: The op's initializers (codes packed, float32 scales, no zero-point tensor).
    weight: QuantizedWeight
    #: float32 ``[N, k_blocks]``, or ``None`` when every offset is 0.
    offsets: _F32 | None

    def dequantize(self) -> _F32:
        """The ``[N, K]`` float32 weight the graph multiplies by."""
        from infer_backend_onnx.quantize import dequantize

        w = dequantize(self.weight)
        if self.offsets is not None:
            n, k = w.shape
            w = (w.reshape(n, -1, self.weight.block_size) + self.offsets[..., None]).reshape(n, k)
        return w


def _f16(blocks: _U8, start: int) -> _F32:
    """The float16 field at byte ``start`` of every block, as float32 ``[rows, n_blocks]``."""
    halves: npt.NDArray[np.float16] = blocks[..., start : start + 2].copy().view(np.float16)
    return halves[..., 0].astype(np.float32)


def _nibbles(qs: _U8) -> _U8:
    """Codes of ``qs`` stored low nibbles first, then high nibbles (llama.cpp's 32-weight layout)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: _U8, count: int) -> _U8:
    """Bit ``i`` of the little-endian bit field ``qh`` for ``i < count``, as 0/1 bytes."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[..., :count]


# Each decoder takes uint8 blocks [rows, n_blocks, type_size] and returns
# (codes [rows, n_sub, sub], scales [rows, n_sub], offsets [rows, n_sub] or None, bits).
_Decoded = tuple[_U8, _F32, _F32 | None, int]


def _q4_0(b: _U8) -> _Decoded:
    return _nibbles(b[..., 2:]), _f16(b, 0), None, 4


def _q4_1(b: _U8) -> _Decoded:
    d, m = _f16(b, 0), _f16(b, 2)
    return _nibbles(b[..., 4:]), d, m + 8 * d, 4


def _q8_0(b: _U8) -> _Decoded:
    codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, _f16(b, 0), None, 8


def _q5(b: _U8, low: int) -> _U8:
    """Q5_0/Q5_1 codes: 4 low bits from the nibbles at ``low``, the fifth from the 32-bit field before them."""
    return (_nibbles(b[..., low:]) | (_high_bits(b[..., low - 4 : low], 32) << 4)).astype(np.uint8)


def _q5_0(b: _U8) -> _Decoded:
    return _q5(b, 6) + np.uint8(112), _f16(b, 0), None, 8


def _q5_1(b: _U8) -> _Decoded:
    d, m = _f16(b, 0), _f16(b, 2)
    return _q5(b, 8) + np.uint8(112), d, m + 16 * d, 8


def _k_scales(b: _U8) -> tuple[_F32, _F32]:
    """Q4_K/Q5_K per-sub-block scales ``d * sc`` and minimums ``dmin * m``, ``[rows, n, 8]``, as gguf computes them."""
    from gguf.quants import Q4_K

    rows, n = b.shape[:2]
    sc, mn = Q4_K.get_scale_min(b[..., 4:16].reshape(rows * n, 12))
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    scales = d * sc.reshape(rows, n, 8).astype(np.float32)
    mins = dmin * mn.reshape(rows, n, 8).astype(np.float32)
    return scales, mins


def _q4_k(b: _U8) -> _Decoded:
    scales, mins = _k_scales(b)
    rows, n = b.shape[:2]
    # 128 bytes of nibbles: each 32-byte group holds two sub-blocks (low nibbles, then high).
    codes = _nibbles(b[..., 16:].reshape(rows, n, 4, 32)).reshape(rows, n * 8, 32)
    return codes, scales.reshape(rows, -1), (8 * scales - mins).reshape(rows, -1), 4


def _q5_k(b: _U8) -> _Decoded:
    scales, mins = _k_scales(b)
    rows, n = b.shape[:2]
    low = _nibbles(b[..., 48:].reshape(rows, n, 4, 32)).reshape(rows, n, 8, 32)
    # Bit j of qh[i] is the fifth bit of weight i of sub-block j.
    high = np.unpackbits(b[..., 16:48], axis=-1, bitorder="little").reshape(rows, n, 32, 8).swapaxes(-1, -2)
    codes = ((low | (high << 4)) + 112).astype(np.uint8)
    return codes.reshape(rows, n * 8, 32), scales.reshape(rows, -1), (16 * scales - mins).reshape(rows, -1), 8


def _q6_k(b: _U8) -> _Decoded:
    rows, n = b.shape[:2]
    ql = b[..., :128].reshape(rows, n, 2, 64)
    qh = b[..., 128:192].reshape(rows, n, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1).reshape(rows, n, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 0x03
    codes = ((low | (high << 4)) + 96).astype(np.uint8).reshape(rows, n * 16, 16)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(b, 208)[..., None]
    return codes, (d * sc).reshape(rows, -1), None, 8


#: GGML type -> (weights per block, bytes per block, decoder).
_DECODERS: Final[dict[str, tuple[int, int, Callable[[_U8], _Decoded]]]] = {
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q8_0": (32, 34, _q8_0),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q4_K": (256, 144, _q4_k),
    "Q5_K": (256, 176, _q5_k),
    "Q6_K": (256, 210, _q6_k),
}
#: GGML types :func:`from_gguf` maps exactly.
EXACT_TYPES: Final = frozenset(_DECODERS)


def from_gguf(raw: RawTensor) -> BlockWeight | None:
    """``raw``'s blocks as ``MatMulNBits`` initializers; ``None`` for a type without an exact mapping
    (float types, and the GGML types not in :data:`EXACT_TYPES`)."""
    entry = _DECODERS.get(raw.qtype)
    if entry is None or len(raw.shape) != 2:
        return None
    per_block, type_size, decode = entry
    rows, k = raw.shape
    blocks = np.ascontiguousarray(raw.blocks).reshape(rows, k // per_block, type_size)
    codes, scales, offsets, bits = decode(blocks)
    sub = codes.shape[-1]
    q = QuantizedWeight(
        packed=pack(codes, bits), scales=np.ascontiguousarray(scales), zero_points=None, k=k, block_size=sub, bits=bits
    )
    return BlockWeight(q, None if offsets is None or not offsets.any() else np.ascontiguousarray(offsets))


def join(parts: Sequence[BlockWeight]) -> BlockWeight | None:
    """The weights of ``parts`` stacked along ``N`` as one; ``None`` when their blocks differ in size or bits."""
    first = parts[0].weight
    if any(p.weight.bits != first.bits or p.weight.block_size != first.block_size for p in parts):
        return None
    offsets = None
    if any(p.offsets is not None for p in parts):
        offsets = np.concatenate(
            [p.offsets if p.offsets is not None else np.zeros_like(p.weight.scales) for p in parts]
        )
    q = QuantizedWeight(
        packed=np.concatenate([p.weight.packed for p in parts]),
        scales=np.concatenate([p.weight.scales for p in parts]),
        zero_points=None,
        k=first.k,
        block_size=first.block_size,
        bits=first.bits,
    )
    return BlockWeight(q, offsets)
