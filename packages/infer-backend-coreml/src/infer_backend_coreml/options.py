"""Load options of the Core ML backend, validated into typed build and run settings.

Everything here is plain Python: the plugin validates options before it imports
coremltools, so a bad option fails fast on every platform.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, final

from infer.errors import InvalidParameterError

if TYPE_CHECKING:
    from infer.bundle import ArchSpec
    from infer.contract import LoadSpec

__all__ = [
    "COMPUTE_UNITS",
    "DEVICE_COMPUTE_UNITS",
    "DTYPES",
    "OPTION_NAMES",
    "BuildConfig",
    "LoadConfig",
    "device_of",
    "parse_compute_units",
    "parse_options",
]

#: Precisions offered, default first. ``int4`` means int4 per-block weights with fp16 compute.
DTYPES: Final = ("fp16", "fp32", "int4")
#: ``compute_units`` values, as the lower-case names of ``coremltools.ComputeUnit`` members.
COMPUTE_UNITS: Final = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")
#: The compute units a requested ``device`` maps to.
DEVICE_COMPUTE_UNITS: Final = {"ane": "cpu_and_ne", "gpu": "cpu_and_gpu", "cpu": "cpu_only"}
#: Options :func:`infer.load` may pass through to this backend.
OPTION_NAMES: Final = frozenset({"compute_units", "context_length", "prefill_chunk", "cache_dir"})

#: Context used when neither the caller nor the options ask for one: the KV state is
#: allocated at build time, so an unbounded default would cost memory on every sequence.
DEFAULT_CONTEXT_LENGTH: Final = 2048
#: Tokens per prefill call; prompts are fed in chunks of this fixed size (padded).
DEFAULT_PREFILL_CHUNK: Final = 64
#: Weights per int4 quantization block (along the input axis).
INT4_BLOCK_SIZE: Final = 32


@final
@dataclass(frozen=True, slots=True)
class BuildConfig:
    """What decides the contents of a built package (and so its cache key)."""

    #: ``"fp16"``, ``"fp32"`` or ``"int4"`` (int4 weights, fp16 compute).
    dtype: str
    #: Most tokens one sequence may hold.
    context_length: int
    #: Tokens per prefill call (the prefill function's static sequence length).
    prefill_chunk: int
    #: Weights per int4 block; used only when ``dtype == "int4"``.
    int4_block_size: int = INT4_BLOCK_SIZE

    @property
    def compute_dtype(self) -> str:
        """The activation precision: fp32 only for ``dtype="fp32"``."""
        return "fp32" if self.dtype == "fp32" else "fp16"

    @property
    def state_length(self) -> int:
        """Rows of each KV state: the context plus room for a padded last prefill chunk."""
        return self.context_length + self.prefill_chunk

    def cache_fields(self) -> dict[str, Any]:
        """The fields that identify a build, for hashing."""
        return {
            "dtype": self.dtype,
            "context_length": self.context_length,
            "prefill_chunk": self.prefill_chunk,
            "int4_block_size": self.int4_block_size if self.dtype == "int4" else None,
        }


@final
@dataclass(frozen=True, slots=True)
class LoadConfig:
    """Validated load options: the build plus how to run it."""

    build: BuildConfig
    #: One of :data:`COMPUTE_UNITS`.
    compute_units: str
    #: Device name reported on the handle (``"ane"``, ``"gpu"``, ``"cpu"`` or ``"all"``).
    device: str
    #: Folder holding built packages, or ``None`` for the default cache.
    cache_dir: Path | None


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidParameterError(name, value, "a positive integer")
    return value


def parse_compute_units(device: str | None, compute_units: object) -> str:
    """The compute units for a requested ``device`` and/or ``compute_units`` option (default ``"all"``)."""
    if compute_units is not None and compute_units not in COMPUTE_UNITS:
        raise InvalidParameterError("compute_units", compute_units, f"one of {', '.join(COMPUTE_UNITS)}")
    if device is not None and device not in DEVICE_COMPUTE_UNITS:
        raise InvalidParameterError("device", device, f"one of {', '.join(DEVICE_COMPUTE_UNITS)} for backend='coreml'")
    device_units = DEVICE_COMPUTE_UNITS.get(device) if device else None
    if compute_units is not None and device_units is not None and compute_units != device_units:
        raise InvalidParameterError(
            "compute_units", compute_units, f"{device_units!r} (or no compute_units) with device={device!r}"
        )
    return str(compute_units or device_units or "all")


def device_of(device: str | None, compute_units: str) -> str:
    """The device a handle reports: the one asked for, else the one the compute units name."""
    return device or {v: k for k, v in DEVICE_COMPUTE_UNITS.items()}.get(compute_units, "all")


def parse_options(spec: LoadSpec, options: Mapping[str, Any], arch: ArchSpec) -> LoadConfig:
    """Validate ``spec``'s dtype/device/context and the backend ``options``; raise typed errors."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise InvalidParameterError(
            "options", unknown, f"only these Core ML backend options: {', '.join(sorted(OPTION_NAMES))}"
        )

    dtype = spec.dtype or DTYPES[0]
    if dtype not in DTYPES:
        raise InvalidParameterError("dtype", dtype, f"one of {', '.join(DTYPES)} for backend='coreml'")

    compute_units = parse_compute_units(spec.device, options.get("compute_units"))
    device = device_of(spec.device, compute_units)

    context = options.get("context_length", spec.context_length)
    if context is None:
        context = min(arch.max_position_embeddings, DEFAULT_CONTEXT_LENGTH)
    context = _positive_int("context_length", context)
    if (
        spec.context_length is not None
        and "context_length" in options
        and options["context_length"] != spec.context_length
    ):
        raise InvalidParameterError(
            "context_length", options["context_length"], f"the same value as load(context_length={spec.context_length})"
        )
    if context > arch.max_position_embeddings:
        raise InvalidParameterError(
            "context_length", context, f"at most the model's max_position_embeddings ({arch.max_position_embeddings})"
        )

    chunk = _positive_int("prefill_chunk", options.get("prefill_chunk", min(DEFAULT_PREFILL_CHUNK, context)))
    if chunk > context:
        raise InvalidParameterError("prefill_chunk", chunk, f"at most context_length ({context})")

    cache_dir = options.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, (str, Path)):
        raise InvalidParameterError("cache_dir", cache_dir, "a folder path (str or pathlib.Path)")

    return LoadConfig(
        build=BuildConfig(dtype=dtype, context_length=context, prefill_chunk=chunk),
        compute_units=compute_units,
        device=device,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
    )
