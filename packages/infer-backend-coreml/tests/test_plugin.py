"""The backend's hooks: what it declares, and what loading does off macOS."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from infer.bundle import Bundle
from infer.contract import CONTRACT_VERSION, Batch, Capability, LoadSpec, ModelHandle, token_rows
from infer.errors import BackendUnavailableError
from infer_backend_coreml import plugin
from infer_backend_coreml.runtime import CoreMLModel

pytestmark = pytest.mark.unit

ON_MACOS_15 = plugin.unavailable_reason() is None


def _spec(bundle: Bundle, backend: str = "coreml") -> LoadSpec:
    return LoadSpec(backend=backend, ref=str(bundle.path), path=bundle.path, bundle=bundle)


def test_backend_info_declares_devices_dtypes_and_one_row_batches() -> None:
    info = plugin.infer_backend_info()
    assert info.name == "coreml"
    assert info.devices == ("ane", "gpu", "cpu")
    assert info.dtypes == ("fp16", "fp32", "int4")
    assert info.max_batch_size == 1
    assert info.contract_version == CONTRACT_VERSION
    # of 1.1's optional KV capabilities, the one a Core ML state can honour without a new graph
    assert info.capabilities == frozenset({Capability.TRUNCATE})


def test_backend_ranks_below_onnx_as_the_default() -> None:
    onnx = pytest.importorskip("infer_backend_onnx.plugin")
    assert plugin.infer_backend_info().priority < onnx.infer_backend_info().priority


def test_importing_the_plugin_does_not_import_coremltools() -> None:
    code = "import sys, infer_backend_coreml.plugin as p; p.infer_backend_info(); print('coremltools' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=None)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("system", "release", "expected"),
    [
        ("Linux", "", "onnx"),
        ("Windows", "", "onnx"),
        ("Darwin", "14.6.1", "update macOS"),
        ("Darwin", "", "update macOS"),
    ],
)
def test_unavailable_reason_says_why_and_what_to_use_instead(system: str, release: str, expected: str) -> None:
    reason = plugin.unavailable_reason(system, release)
    assert reason is not None
    assert "macOS 15" in reason
    assert expected in reason


@pytest.mark.parametrize("release", ["15.0", "15.3.1", "26.0"])
def test_macos_15_and_later_is_available(release: str) -> None:
    assert plugin.unavailable_reason("Darwin", release) is None


@pytest.mark.skipif(ON_MACOS_15, reason="Core ML runs here; the unavailable path is for other platforms")
def test_backend_info_is_unavailable_off_macos() -> None:
    info = plugin.infer_backend_info()
    assert not info.available
    assert 'backend="onnx"' in (info.unavailable_reason or "")


@pytest.mark.skipif(ON_MACOS_15, reason="Core ML runs here; the unavailable path is for other platforms")
def test_loading_off_macos_raises_backend_unavailable_naming_the_alternative(tiny_bundle: Bundle) -> None:
    with pytest.raises(BackendUnavailableError, match='backend="onnx"') as caught:
        plugin.infer_load(_spec(tiny_bundle), {})
    assert caught.value.backend == "coreml"
    assert isinstance(caught.value, RuntimeError)


def test_load_declines_specs_for_other_backends(tiny_bundle: Bundle) -> None:
    assert plugin.infer_load(_spec(tiny_bundle, backend="onnx"), {}) is None


def test_prefill_and_decode_decline_handles_of_other_backends() -> None:
    class Foreign(ModelHandle):
        backend, vocab_size, context_length = "other", 4, 8

        def new_sequence(self, capacity: int) -> object:  # type: ignore[override]
            raise AssertionError("not called")

    batch = Batch((), ())
    assert plugin.infer_prefill(Foreign(), batch) is None
    assert plugin.infer_decode(Foreign(), batch) is None


def test_prefill_and_decode_hooks_route_to_the_handle(folded_model: Callable[..., CoreMLModel]) -> None:
    model = folded_model()
    seq = model.new_sequence(8)
    logits = plugin.infer_prefill(model, Batch((seq,), token_rows([[1, 2, 3]])))
    assert logits is not None and logits.shape == (1, model.vocab_size) and logits.dtype == np.float32
    logits = plugin.infer_decode(model, Batch((seq,), token_rows([[4]])))
    assert logits is not None and logits.shape == (1, model.vocab_size)
    assert seq.length == 4
