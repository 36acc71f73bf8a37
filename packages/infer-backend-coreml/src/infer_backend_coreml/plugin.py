"""The Core ML backend's hooks (entry point ``coreml`` in group ``infer.backends``).

Importing this module stays cheap: coremltools is imported only when a model is built or
loaded, never at discovery.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from infer.contract import CONTRACT_VERSION, BackendInfo, Batch, Capability, KVCache, LoadSpec, ModelHandle
from infer.errors import BackendUnavailableError, InvalidParameterError
from infer.hookspecs import hookimpl
from infer_backend_coreml.options import DTYPES, device_of, parse_compute_units, parse_options
from infer_backend_coreml.runtime import BACKEND, CoreMLModel

__all__ = [
    "MIN_MACOS",
    "infer_backend_info",
    "infer_decode",
    "infer_load",
    "infer_prefill",
    "unavailable_reason",
]

#: First macOS with stateful Core ML models (the KV cache lives in model state).
MIN_MACOS: Final = (15, 0)
#: Default-backend rank: below onnx, which runs everywhere (and on macOS through its CoreML EP).
PRIORITY: Final = 10
#: Max abs logit difference between equivalent computations at fp16 (chunked vs one-shot prefill,
#: prefill vs decode). fp16 logits carry about 3 significant digits: SmolLM2's graph evaluated in
#: numpy at fp16 lands within 0.07 of the float64 reference on logits up to 27.
FP16_LOGITS_ATOL: Final = 0.15


def unavailable_reason(system: str | None = None, mac_release: str | None = None) -> str | None:
    """Why Core ML cannot run on this machine (``None`` when it can). Arguments override the probe."""
    system = platform.system() if system is None else system
    if system != "Darwin":
        return (
            f"the Core ML backend needs macOS {MIN_MACOS[0]} or later (this is {system or 'an unknown OS'}); "
            'use backend="onnx" instead'
        )
    release = platform.mac_ver()[0] if mac_release is None else mac_release
    try:
        version = tuple(int(part) for part in release.split(".")[:2])
    except ValueError:
        version = ()
    if version < MIN_MACOS:
        return (
            f"the Core ML backend needs macOS {MIN_MACOS[0]} or later for stateful models "
            f'(this is macOS {release or "of unknown version"}); update macOS or use backend="onnx" instead'
        )
    return None


def _version() -> str:
    try:
        return metadata.version("infer-backend-coreml")
    except metadata.PackageNotFoundError:
        from infer_backend_coreml import __version__

        return __version__


@hookimpl
def infer_backend_info() -> BackendInfo:
    """Describe the Core ML backend (cheap: no coremltools import)."""
    return BackendInfo(
        name=BACKEND,
        version=_version(),
        contract_version=CONTRACT_VERSION,
        devices=("ane", "gpu", "cpu"),
        dtypes=DTYPES,
        # TRUNCATE only: a cache rolls back by its length alone. FORK would copy Core ML states
        # (no copy API to test off macOS) and ALL_LOGITS needs a prefill function returning
        # every row, which the package does not build: without it verification costs a decode
        # step per token, so declaring it would only slow speculation down.
        capabilities=frozenset({Capability.TRUNCATE}),
        max_batch_size=1,
        logits_atol=FP16_LOGITS_ATOL,
        priority=PRIORITY,
        unavailable_reason=unavailable_reason(),
    )


@hookimpl
def infer_load(spec: LoadSpec, options: Mapping[str, Any]) -> ModelHandle | None:
    """Build (or take from the cache) the bundle's package and load it; ``None`` for other backends."""
    if spec.backend != BACKEND:
        return None
    if spec.bundle is not None:
        # Checked before the platform: a model this backend cannot run is refused everywhere.
        from infer_backend_coreml.builder import SUPPORTED_FEATURES

        spec.bundle.spec.require(SUPPORTED_FEATURES, backend=BACKEND, path=spec.bundle.path)
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(reason, backend=BACKEND, device=spec.device)
    if spec.bundle is None:
        if spec.path is not None and spec.path.suffix == ".mlpackage" and spec.path.is_dir():
            return _load_package(spec, options)
        return None
    from infer_backend_coreml.builder import kv_state_shapes
    from infer_backend_coreml.cache import cache_root, cached_package
    from infer_backend_coreml.runtime import CoreMLExecutor

    arch = spec.bundle.spec
    config = parse_options(spec, options, arch)
    package, built = cached_package(spec.bundle, config.build, cache_root(config.cache_dir))
    kv_bytes = sum(2 * int(np.prod(shape)) for shape in kv_state_shapes(arch, config.build).values())
    return CoreMLModel(
        CoreMLExecutor(package, config.compute_units),
        config=config.build,
        vocab_size=arch.vocab_size,
        kv_bytes=kv_bytes,
        device=config.device,
        details={
            "package": str(package),
            "built": built,
            "compute_units": config.compute_units,
            "prefill_chunk": config.build.prefill_chunk,
        },
    )


def _load_package(spec: LoadSpec, options: Mapping[str, Any]) -> CoreMLModel:
    """Load a package this backend built earlier, as it is: only its compute units can change."""
    from infer_backend_coreml.package import read_package_layout
    from infer_backend_coreml.runtime import CoreMLExecutor

    assert spec.path is not None
    fixed = sorted(set(options) - {"compute_units"})
    if fixed:
        raise InvalidParameterError(
            "options", fixed, "only compute_units for a ready .mlpackage (the rest was fixed when it was built)"
        )
    layout = read_package_layout(spec.path)
    if spec.dtype is not None and spec.dtype != layout.config.dtype:
        raise InvalidParameterError(
            "dtype", spec.dtype, f"{layout.config.dtype!r}, the precision this package was built with"
        )
    if spec.context_length is not None and spec.context_length > layout.config.context_length:
        raise InvalidParameterError(
            "context_length", spec.context_length, f"at most {layout.config.context_length}, the package's context"
        )
    units = parse_compute_units(spec.device, options.get("compute_units"))
    return CoreMLModel(
        CoreMLExecutor(spec.path, units),
        config=layout.config,
        vocab_size=layout.vocab_size,
        kv_bytes=layout.kv_bytes,
        device=device_of(spec.device, units),
        details={"package": str(spec.path), "built": False, "compute_units": units},
    )


@hookimpl
def infer_prefill(model: ModelHandle, batch: Batch) -> npt.NDArray[np.float32] | None:
    """Prefill for this backend's handles; ``None`` for others."""
    return model.prefill(batch) if isinstance(model, CoreMLModel) else None


@hookimpl
def infer_decode(model: ModelHandle, batch: Batch) -> npt.NDArray[np.float32] | None:
    """Decode for this backend's handles; ``None`` for others."""
    return model.decode(batch) if isinstance(model, CoreMLModel) else None


@hookimpl
def infer_truncate(model: ModelHandle, sequence: KVCache, length: int) -> bool | None:
    """Truncate for this backend's handles; ``None`` for others."""
    return model.truncate(sequence, length) if isinstance(model, CoreMLModel) else None
