"""Block-wise asymmetric 4-bit weight packing in the layout of ONNX Runtime's ``MatMulNBits``.

A weight ``w`` of shape ``[N, K]`` (Hugging Face ``[out, in]``) is cut along ``K`` into blocks
of ``block_size``; each block gets a float scale and a 4-bit zero point, and each weight a
4-bit code, so that ``w ~= (code - zero_point) * scale``. The range of every block includes 0,
which keeps an all-zero block exact and a zero weight zero. Codes are packed two per byte,
the even index in the low nibble; zero points likewise, one row of blocks per output row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Int4Weight", "dequantize_int4", "quantize_int4"]


@dataclass(frozen=True, slots=True)
class Int4Weight:
    """The three ``MatMulNBits`` initializers for one weight."""

    #: uint8 ``[N, k_blocks, block_size // 2]``: two codes per byte.
    packed: npt.NDArray[np.uint8]
    #: float32 ``[N, k_blocks]``.
    scales: npt.NDArray[np.float32]
    #: uint8 ``[N, ceil(k_blocks / 2)]``: two zero points per byte.
    zero_points: npt.NDArray[np.uint8]
    #: Original ``K`` (the packed blocks may pad it).
    k: int
    block_size: int


def _pack_nibbles(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Pack the last axis (even length) two codes per byte, even index in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def quantize_int4(weight: npt.NDArray[np.floating], block_size: int) -> Int4Weight:
    """Quantise ``weight`` ``[N, K]`` to asymmetric 4-bit blocks of ``block_size`` along ``K``."""
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    blocks = -(-k // block_size)
    if blocks * block_size != k:
        # Zero padding quantises exactly (0 is always in a block's range) and is never read.
        w = np.pad(w, ((0, 0), (0, blocks * block_size - k)))
    w = w.reshape(n, blocks, block_size)
    lo = np.minimum(w.min(axis=-1), 0.0)
    hi = np.maximum(w.max(axis=-1), 0.0)
    scales = (hi - lo) / 15.0
    safe = np.where(scales > 0, scales, 1.0)
    zero = np.clip(np.rint(-lo / safe), 0, 15)
    codes = np.clip(np.rint(w / safe[..., None] + zero[..., None]), 0, 15).astype(np.uint8)
    zero_u8 = zero.astype(np.uint8)
    if blocks % 2:
        zero_u8 = np.pad(zero_u8, ((0, 0), (0, 1)))
    return Int4Weight(
        packed=_pack_nibbles(codes),
        scales=scales.astype(np.float32),
        zero_points=_pack_nibbles(zero_u8),
        k=k,
        block_size=block_size,
    )


def dequantize_int4(q: Int4Weight) -> npt.NDArray[np.float32]:
    """The ``[N, K]`` float32 weight that ``q`` encodes (what ``MatMulNBits`` multiplies by)."""
    n, blocks, _ = q.packed.shape
    codes = np.stack([q.packed & 0x0F, q.packed >> 4], axis=-1).reshape(n, blocks, q.block_size)
    zeros = np.stack([q.zero_points & 0x0F, q.zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    w = (codes.astype(np.float32) - zeros[..., None].astype(np.float32)) * q.scales[..., None]
    return w.reshape(n, blocks * q.block_size)[:, : q.k]
