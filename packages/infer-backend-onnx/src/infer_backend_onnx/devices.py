"""Devices to ONNX Runtime execution providers, and sessions tuned for them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

from infer.errors import BackendUnavailableError, InvalidParameterError, ModelFormatError

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["DEVICES", "make_session", "ort_device", "ort_errors", "providers_for"]

#: Devices this backend can target, default first.
DEVICES: Final = ("cpu", "cuda", "coreml")

_PROVIDER: Final = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def providers_for(device: str) -> list[str]:
    """Execution providers for ``device``; raise :class:`BackendUnavailableError` if this install lacks them."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise InvalidParameterError("device", device, f"one of {', '.join(DEVICES)} for the onnx backend")
    if device == "coreml" and sys.platform != "darwin":
        raise BackendUnavailableError(
            "the CoreML execution provider runs only on macOS; use device='cpu' here, or the coreml backend on a Mac",
            backend="onnx",
            device=device,
        )
    provider = _PROVIDER[device]
    if provider not in ort.get_available_providers():
        hint = {
            "cuda": "install the CUDA build: pip uninstall onnxruntime && pip install 'infer-backend-onnx[cuda]' "
            "(onnxruntime-gpu replaces onnxruntime), with a CUDA 12 runtime and an NVIDIA GPU",
            "coreml": "install onnxruntime 1.17 or newer from PyPI, whose macOS wheels carry the CoreML provider",
        }.get(device, "reinstall onnxruntime")
        raise BackendUnavailableError(
            f"onnxruntime {ort.__version__} has no {provider} (it has {', '.join(ort.get_available_providers())}); "
            + hint,
            backend="onnx",
            device=device,
        )
    # The CPU provider stays as the fallback for the few ops a device provider leaves to it.
    return [provider] if device == "cpu" else [provider, "CPUExecutionProvider"]


def ort_device(device: str) -> str:
    """Name ONNX Runtime uses for the memory where ``device`` keeps its tensors."""
    return "cuda" if device == "cuda" else "cpu"


def ort_errors() -> tuple[type[Exception], ...]:
    """The exception types ONNX Runtime raises (its pybind errors derive from plain ``Exception``)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "InvalidProtobuf",
        "NoSuchFile",
        "NotImplemented",
        "RuntimeException",
        "EPFail",
        "NoModel",
        "ModelLoaded",
    )
    return (RuntimeError, *(getattr(state, n) for n in names if hasattr(state, n)))


def make_session(model: Path, device: str, threads: int) -> ort.InferenceSession:
    """An inference session for ``model`` on ``device`` with ``threads`` intra-op threads.

    One op at a time (sequential execution, one inter-op thread): decoder graphs are a chain,
    and a second pool would only compete with the first for the same cores.
    """
    import onnxruntime as ort

    providers = providers_for(device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model), sess_options=options, providers=providers)
    except ort_errors() as exc:
        if device != "cpu" and providers[0] in str(exc):
            raise BackendUnavailableError(
                f"onnxruntime could not start {providers[0]} for {model}: {exc}", backend="onnx", device=device
            ) from exc
        raise ModelFormatError(f"onnxruntime cannot load {model}: {exc}", path=model) from exc
    if providers[0] not in session.get_providers():
        raise BackendUnavailableError(
            f"onnxruntime fell back from {providers[0]} to {session.get_providers()} (no usable {device} device?)",
            backend="onnx",
            device=device,
        )
    return session
