"""Read back what a built package declares, so a ready ``.mlpackage`` can be loaded as is.

A package built by this backend (see :mod:`infer_backend_coreml.builder`) has a ``prefill``
and a ``decode`` function, fp16 KV states and float32 logits; its layout (chunk, state length,
vocabulary, state bytes) is read from the spec, and its precision from the metadata the
builder stores. Anything else is refused with a typed error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, final

from infer.errors import ModelFormatError
from infer_backend_coreml.builder import FUNCTION_DECODE, FUNCTION_PREFILL, INPUT_IDS, OUTPUT_LOGITS
from infer_backend_coreml.options import DTYPES, BuildConfig

__all__ = ["PackageLayout", "read_package_layout"]

#: Metadata key holding the build's dtype.
DTYPE_KEY = "infer.dtype"


@final
@dataclass(frozen=True, slots=True)
class PackageLayout:
    """The facts a handle needs about a built package."""

    config: BuildConfig
    vocab_size: int
    #: Bytes of one sequence's KV states.
    kv_bytes: int


def _shape(features: Any, name: str) -> list[int] | None:
    for feature in features:
        if feature.name == name and feature.type.WhichOneof("Type") == "multiArrayType":
            return list(feature.type.multiArrayType.shape)
    return None


def read_package_layout(path: Path) -> PackageLayout:
    """Describe the package at ``path``; raise :class:`ModelFormatError` if this backend did not build it."""
    import coremltools as ct

    def bad(why: str) -> ModelFormatError:
        return ModelFormatError(
            f"{path.name} is not a Core ML package built by infer's coreml backend ({why}); "
            "pass the model's bundle folder or GGUF file instead and it will be built",
            path=path,
        )

    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as exc:  # coremltools raises many types for unreadable packages
        raise bad(f"unreadable: {exc}") from exc
    description = model.get_spec().description
    functions = {f.name: f for f in description.functions}
    if set(functions) != {FUNCTION_PREFILL, FUNCTION_DECODE}:
        raise bad(f"functions {sorted(functions)}, expected {[FUNCTION_PREFILL, FUNCTION_DECODE]}")
    prefill_ids = _shape(functions[FUNCTION_PREFILL].input, INPUT_IDS)
    logits = _shape(functions[FUNCTION_DECODE].output, OUTPUT_LOGITS)
    states = [list(s.type.stateType.arrayType.shape) for s in functions[FUNCTION_DECODE].state]
    if prefill_ids is None or len(prefill_ids) != 2 or logits is None or len(logits) != 2 or not states:
        raise bad("missing input_ids, logits or KV states")
    chunk, state_length = prefill_ids[1], states[0][2]
    dtype = model.user_defined_metadata.get(DTYPE_KEY)
    if dtype not in DTYPES:
        raise bad(f"metadata {DTYPE_KEY}={dtype!r}")
    kv_bytes = sum(2 * _product(shape) for shape in states)  # states are fp16
    config = BuildConfig(dtype=dtype, context_length=state_length - chunk, prefill_chunk=chunk)
    return PackageLayout(config=config, vocab_size=logits[1], kv_bytes=kv_bytes)


def _product(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out
