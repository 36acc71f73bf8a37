"""CUDA: the same graph and in-place KV on the GPU (skipped without the CUDA provider and a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_helpers import PROMPT, load_spec, step

from infer.bundle import Bundle
from infer_backend_onnx import plugin

pytestmark = pytest.mark.gpu

#: fp16 is held to the bound measured on the CPU (1.4e-2 on the tiny bundle), with margin.
TOLERANCE = 5e-2


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda() -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider (install infer-backend-onnx[cuda])")


def test_cuda_defaults_to_fp16_and_refuses_fp32(tiny_bundle: Bundle, build_dir) -> None:
    from infer.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="half precision"):
        plugin.infer_load(load_spec(tiny_bundle, dtype="fp32", device="cuda"), {"cache_dir": build_dir})
    model = plugin.infer_load(load_spec(tiny_bundle, device="cuda"), {"cache_dir": build_dir})
    assert model is not None and model.dtype == "fp16"


def test_cuda_prefill_and_decode_match_the_reference(tiny_bundle: Bundle, ref_model, build_dir) -> None:
    model = plugin.infer_load(load_spec(tiny_bundle, device="cuda"), {"cache_dir": build_dir})
    assert model is not None and model.device == "cuda"
    expected = ref_model.forward(PROMPT)
    cache = model.new_sequence(4)  # small on purpose: the cache must grow on the device
    got = step(model, [cache], [PROMPT[:3]])[0]
    assert np.abs(got - expected[2]).max() <= TOLERANCE
    for i in range(3, len(PROMPT)):
        got = step(model, [cache], [[PROMPT[i]]], decode=True)[0]
        assert np.abs(got - expected[i]).max() <= TOLERANCE


def test_cuda_ragged_batch_equals_single_rows(tiny_bundle: Bundle, build_dir) -> None:
    model = plugin.infer_load(load_spec(tiny_bundle, device="cuda"), {"cache_dir": build_dir})
    assert model is not None
    rows = [PROMPT, PROMPT[:4]]
    batched = step(model, [model.new_sequence(16) for _ in rows], rows)
    singles = np.stack([step(model, [model.new_sequence(16)], [r])[0] for r in rows])
    np.testing.assert_allclose(batched, singles, atol=TOLERANCE, rtol=0)
