"""The hooks: what the backend declares, which loads it answers, and the typed errors it raises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx_helpers import load_spec

import infer
from infer.bundle import Bundle
from infer.contract import Batch, Capability, LoadSpec, ModelHandle, token_rows
from infer.errors import BackendUnavailableError, InvalidParameterError
from infer_backend_onnx import plugin
from infer_backend_onnx.runtime import OnnxModel

pytestmark = pytest.mark.integration


def test_backend_info_declares_the_contract_and_is_the_default() -> None:
    info = plugin.infer_backend_info()
    assert info.name == "onnx"
    assert info.contract_version == infer.CONTRACT_VERSION
    assert info.devices[0] == "cpu" and info.dtypes[0] == "fp32"
    assert {Capability.BATCH, Capability.DETERMINISTIC} <= info.capabilities
    assert info.max_batch_size > 1 and info.priority == 100 and info.available


def test_backend_info_says_unavailable_when_onnxruntime_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    info = plugin.infer_backend_info()
    assert not info.available and "onnxruntime" in (info.unavailable_reason or "")


def test_importing_the_plugin_does_not_import_onnx_or_onnxruntime() -> None:
    code = (
        "import sys, infer_backend_onnx.plugin as p; p.infer_backend_info(); "
        "print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_load_for_another_backend_answers_none(tiny_bundle: Bundle) -> None:
    spec = LoadSpec(backend="coreml", ref="x", path=tiny_bundle.path, bundle=tiny_bundle)
    assert plugin.infer_load(spec, {}) is None


def test_load_of_a_path_that_is_no_model_answers_none(tmp_path: Path) -> None:
    assert plugin.infer_load(LoadSpec(backend="onnx", ref=str(tmp_path), path=tmp_path, bundle=None), {}) is None


def test_unknown_option_raises_invalid_parameter(tiny_bundle: Bundle) -> None:
    with pytest.raises(InvalidParameterError) as info:
        plugin.infer_load(load_spec(tiny_bundle), {"treads": 2})
    assert info.value.parameter == "treads"


@pytest.mark.parametrize(
    ("key", "value"),
    [("threads", 0), ("threads", "2"), ("block_size", 48), ("cache_dir", 3), ("head_bits", 2), ("kv_dtype", "int8")],
)
def test_bad_option_values_raise_invalid_parameter(tiny_bundle: Bundle, key: str, value: object) -> None:
    with pytest.raises(InvalidParameterError) as info:
        plugin.infer_load(load_spec(tiny_bundle), {key: value})
    assert info.value.parameter == key


def test_kv_dtype_defaults_to_the_activations_and_cuda_refuses_a_float32_cache() -> None:
    from infer_backend_onnx.loading import kv_precision

    assert kv_precision(None, "fp32", "cpu") == "fp32"
    assert kv_precision(None, "fp16", "cuda") == "fp16"
    assert kv_precision("fp16", "fp32", "cpu") == "fp16"
    with pytest.raises(InvalidParameterError, match="half precision") as info:
        kv_precision("fp32", "fp16", "cuda")
    assert info.value.parameter == "kv_dtype"


def test_unknown_dtype_raises_invalid_parameter(tiny_bundle: Bundle, build_dir: Path) -> None:
    with pytest.raises(InvalidParameterError, match="dtype"):
        plugin.infer_load(load_spec(tiny_bundle, dtype="int3"), {"cache_dir": build_dir})


def test_unknown_device_raises_invalid_parameter(tiny_bundle: Bundle) -> None:
    with pytest.raises(InvalidParameterError, match="device"):
        plugin.infer_load(load_spec(tiny_bundle, device="tpu"), {})


@pytest.mark.skipif(sys.platform == "darwin", reason="the CoreML provider exists on macOS")
def test_coreml_off_macos_raises_backend_unavailable(tiny_bundle: Bundle) -> None:
    with pytest.raises(BackendUnavailableError, match="macOS") as info:
        plugin.infer_load(load_spec(tiny_bundle, device="coreml"), {})
    assert info.value.device == "coreml"


def test_cuda_without_the_provider_says_what_to_install(tiny_bundle: Bundle) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendUnavailableError, match=r"infer-backend-onnx\[cuda\]"):
        plugin.infer_load(load_spec(tiny_bundle, device="cuda"), {})


def test_loaded_model_reports_its_facts(tiny_fp32: OnnxModel, tiny_bundle: Bundle) -> None:
    assert tiny_fp32.backend == "onnx"
    assert tiny_fp32.vocab_size == tiny_bundle.spec.vocab_size
    assert tiny_fp32.context_length == tiny_bundle.spec.max_position_embeddings
    assert (tiny_fp32.device, tiny_fp32.dtype) == ("cpu", "fp32")
    assert tiny_fp32.details["threads"] == 1


def test_steps_for_another_backends_model_answer_none() -> None:
    class Other(ModelHandle):
        backend, vocab_size, context_length = "fake", 4, 8

        def new_sequence(self, capacity: int):  # type: ignore[no-untyped-def]
            raise AssertionError("not called")

    batch = Batch((), token_rows([]))
    assert plugin.infer_prefill(Other(), batch) is None
    assert plugin.infer_decode(Other(), batch) is None


def test_steps_on_a_closed_model_raise_model_closed(tiny_bundle: Bundle, build_dir: Path) -> None:
    from infer.errors import ModelClosedError

    model = plugin.infer_load(load_spec(tiny_bundle), {"cache_dir": build_dir, "threads": 1})
    assert model is not None
    cache = model.new_sequence(4)
    model.close()
    with pytest.raises(ModelClosedError):
        plugin.infer_prefill(model, Batch((cache,), token_rows([[1]])))


def test_logits_are_float32_rows_of_the_vocabulary(tiny_fp32: OnnxModel) -> None:
    batch = Batch((tiny_fp32.new_sequence(8), tiny_fp32.new_sequence(8)), token_rows([[1, 2, 3], [4]]))
    logits = plugin.infer_prefill(tiny_fp32, batch)
    assert logits is not None
    assert logits.dtype == np.float32 and logits.shape == (2, tiny_fp32.vocab_size)
