"""Weights that stay in their GGUF file: a manifest of where each tensor lives, read in place.

A bundle imported from GGUF holds ``gguf_tensors.json`` instead of ``*.safetensors``. For
every Hugging Face tensor name it records the GGUF file, the byte offset and length of the
tensor's data, its GGML type (``Q4_1``, ``Q4_K``, ``F32``...), its shape (rows, columns, as
numpy orders them) and, for the Q and K projections of llama-converted models, the number of
heads whose rotary row order llama.cpp interleaved.

:class:`GGUFWeights` maps the file once and hands each tensor out in the form a backend can
use: :meth:`GGUFWeights.raw` gives its quantized blocks as stored (one row of blocks per
output row, rows back in Hugging Face order), ``weights[name]`` dequantizes it with
:func:`gguf.quants.dequantize`, one tensor at a time. Peak memory of a build is then the
file's pages plus one tensor, not the float32 model: the 98 MB SmolLM2 Q4_1 file used to
become a 517 MB float32 bundle.

Quantization blocks run along rows, so reordering rows (the rotary un-permutation) commutes
with dequantization: raw blocks and dequantized values describe the same Hugging Face tensor.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, final

import numpy as np
import numpy.typing as npt

from infer.bundle import TensorInfo, Weights
from infer.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

__all__ = ["MANIFEST_NAME", "GGUFWeights", "RawTensor", "unpermute_rows", "write_manifest"]

#: File name of the manifest inside a bundle folder.
MANIFEST_NAME: Final = "gguf_tensors.json"
_FORMAT: Final = "infer.gguf_tensors"
_VERSION: Final = 1


@final
@dataclass(frozen=True, slots=True)
class RawTensor:
    """One tensor's data as the GGUF stores it."""

    #: GGML type name (``"Q4_1"``, ``"Q8_0"``, ``"F32"``...): :class:`gguf.GGMLQuantizationType` member names.
    qtype: str
    #: Logical shape, rows first (Hugging Face ``[out, in]`` for a matrix).
    shape: tuple[int, ...]
    #: uint8 ``[rows, bytes_per_row]``: each row's blocks, rows in Hugging Face order. A read-only
    #: view of the mapped file unless rows had to be reordered.
    blocks: npt.NDArray[np.uint8]


def unpermute_rows(w: npt.NDArray[Any], heads: int) -> npt.NDArray[Any]:
    """Undo llama.cpp's Q/K row order (interleaved rotary pairs) back to the half-split layout.

    llama.cpp stores each head's rows as pairs (0, d/2), (1, d/2 + 1), ...; Hugging Face keeps
    the first halves of all pairs, then the second halves. Works on any array whose first axis
    is the rows: float weights and biases, or rows of quantized blocks.
    """
    rows = w.shape[0]
    half = rows // heads // 2
    return np.ascontiguousarray(w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def write_manifest(folder: Path, gguf_file: str, size: int, tensors: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``gguf_tensors.json`` into ``folder``.

    ``gguf_file`` is a file name inside the bundle folder or an absolute path; ``size`` its
    size in bytes (checked at open, so a truncated or replaced file is caught before a read);
    ``tensors`` maps Hugging Face names to ``{"gguf_name", "type", "shape", "offset",
    "nbytes", "rope_heads"}`` (``rope_heads`` 0 when no un-permutation applies) and, optionally,
    ``"add"``: a constant added to every dequantized value (Gemma's norms are stored as 1 + w).
    """
    manifest = {"format": _FORMAT, "version": _VERSION, "file": gguf_file, "size": size, "tensors": dict(tensors)}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


class GGUFWeights(Weights):
    """Tensors of a GGUF-backed bundle by Hugging Face name, read in place from the mapped file.

    ``weights[name]`` is the float32 dequantization (F16/BF16/F32 widened to float32 too, as the
    earlier float32 import gave); :meth:`raw` the blocks as stored.
    """

    def __init__(
        self, file: Path, tensors: Mapping[str, TensorInfo], extra: Mapping[str, tuple[int, int, float]]
    ) -> None:
        super().__init__(tensors)
        self._file = file
        #: name -> (bytes of data, rotary heads to un-permute or 0, constant to add after dequantizing)
        self._extra = dict(extra)
        self._mmap: mmap.mmap | None = None
        self._map: npt.NDArray[np.uint8] | None = None

    @classmethod
    def open(cls, root: Path) -> GGUFWeights:
        """Read ``root/gguf_tensors.json`` and check it against the GGUF file it names (no tensor data is read)."""
        from gguf import GGMLQuantizationType
        from gguf.constants import GGML_QUANT_SIZES

        path = root / MANIFEST_NAME
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{MANIFEST_NAME} is not readable JSON: {exc}", path=path) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise ModelFormatError(f"{MANIFEST_NAME} is not an infer GGUF tensor manifest", path=path)
        if manifest.get("version") != _VERSION:
            raise UnsupportedModelError(
                f"{MANIFEST_NAME} has version {manifest.get('version')!r}; this infer reads version {_VERSION}: "
                "import the GGUF again",
                path=path,
            )
        file = Path(str(manifest.get("file", "")))
        file = file if file.is_absolute() else root / file
        if not file.is_file():
            raise ModelNotFoundError(
                f"the GGUF file {str(file)!r} holding this model's weights is missing; "
                "it was moved or deleted since the import: import the GGUF again",
                path=file,
            )
        size = file.stat().st_size
        if size != manifest.get("size"):
            raise ModelFormatError(
                f"{file.name} has {size} bytes, but the model was imported from a file of {manifest.get('size')}: "
                "it was replaced or truncated since the import; import it again",
                path=file,
            )
        tensors: dict[str, TensorInfo] = {}
        extra: dict[str, tuple[int, int, float]] = {}
        try:
            for name, entry in manifest["tensors"].items():
                qtype = GGMLQuantizationType[entry["type"]]
                shape = tuple(int(d) for d in entry["shape"])
                offset, nbytes, heads = int(entry["offset"]), int(entry["nbytes"]), int(entry["rope_heads"])
                block, type_size = GGML_QUANT_SIZES[qtype]
                if math.prod(shape) // block * type_size != nbytes or shape[-1] % block or offset + nbytes > size:
                    raise ValueError(f"tensor {name!r}: {entry['type']} {list(shape)} does not fit its bytes")
                tensors[name] = TensorInfo(file=file, dtype=qtype.name, shape=shape, offset=offset)
                extra[name] = (nbytes, heads, float(entry.get("add", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{MANIFEST_NAME} is malformed: {exc}", path=path) from exc
        return cls(file, tensors, extra)

    def readable(self, dtype: str) -> bool:
        """Every GGML type the manifest can name is readable: :mod:`gguf` dequantizes them all."""
        return True

    def raw(self, name: str) -> RawTensor:
        """The stored blocks of ``name``, rows in Hugging Face order; nothing is dequantized."""
        info = self.info(name)
        nbytes, heads, add = self._extra[name]
        if add:
            raise ValueError(f"tensor {name!r} is stored shifted by {-add}: read it dequantized, weights[name]")
        rows = _rows(info.shape)
        blocks = self._mapped()[info.offset : info.offset + nbytes].reshape(rows, nbytes // rows)
        if heads:
            blocks = unpermute_rows(blocks, heads)
        return RawTensor(qtype=info.dtype, shape=info.shape, blocks=blocks)

    def __getitem__(self, name: str) -> npt.NDArray[np.floating[Any]]:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.info(name) if name in self else None
        if info is None:
            raise KeyError(name)
        nbytes, heads, add = self._extra[name]
        data = self._mapped()[info.offset : info.offset + nbytes]
        qtype = GGMLQuantizationType[info.dtype]
        try:
            flat = dequantize(data.reshape(-1, nbytes // _rows(info.shape)), qtype)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"tensor {name!r} has type {info.dtype}, which gguf cannot dequantize: {exc}", path=info.file
            ) from exc
        array = np.ascontiguousarray(flat, dtype=np.float32).reshape(info.shape)
        self.release(name)
        if heads:
            # Rows only: a bias un-permutes like the weight rows it goes with.
            array = unpermute_rows(array, heads)
        if add:
            array = array + np.float32(add)  # F32 data is a read-only view of the mapped file
        return array

    @property
    def file(self) -> Path:
        """The GGUF file holding every tensor."""
        return self._file

    def release(self, name: str) -> None:
        """Let the pages of ``name``'s data go from this process's memory (a backend done with its blocks).

        The map is read-only and file-backed, so this is always safe: a later read maps the pages
        in again from the file. Without it a build that reads every tensor once would end holding
        the whole file in its resident memory.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.info(name)
        start = info.offset - info.offset % mmap.PAGESIZE
        self._mmap.madvise(mmap.MADV_DONTNEED, start, info.offset + self._extra[name][0] - start)

    def _mapped(self) -> npt.NDArray[np.uint8]:
        if self._map is None:
            try:
                with self._file.open("rb") as f:
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise ModelNotFoundError(f"cannot map {self._file.name}: {exc}", path=self._file) from exc
            self._map = np.frombuffer(self._mmap, dtype=np.uint8)
        return self._map


def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) if len(shape) > 1 else 1
