"""Prediction through Core ML itself (macOS 15+): numbers, device parity, state semantics.

Tolerances (absolute, on logits of the tiny bundle, which reach about 12 in magnitude):
fp32 on the CPU within 1e-4 of the reference; fp16 within 0.05 on CPU/GPU and 0.1 on the
Neural Engine (its fp16 accumulation differs); CPU vs Neural Engine within 0.1; int4 weights
keep the logits correlated above 0.99 with the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from infer.bundle import Bundle
from infer.contract import Batch, LoadSpec, token_rows
from infer_backend_coreml import plugin
from infer_backend_coreml.runtime import CoreMLModel
from infer_conformance.reference import ReferenceModel

pytestmark = [
    pytest.mark.macos,
    pytest.mark.integration,
    pytest.mark.skipif(
        plugin.unavailable_reason() is not None,
        reason=f"needs the Core ML runtime: {plugin.unavailable_reason()}",
    ),
]

PROMPT = [17, 250, 3, 99, 42, 301, 7, 8, 120, 64, 33]
DECODE_STEPS = 5

Loader = Callable[..., CoreMLModel]
GreedyPairs = Callable[..., list[tuple[np.ndarray, np.ndarray]]]


@pytest.fixture(scope="module")
def load(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Bundle) -> Loader:
    """Load the tiny bundle on Core ML; packages are cached in one folder for the module."""
    cache = tmp_path_factory.mktemp("coreml-cache")

    def make(dtype: str = "fp16", compute_units: str = "cpu_only", prefill_chunk: int = 4) -> CoreMLModel:
        spec = LoadSpec(
            backend="coreml", ref=str(tiny_bundle.path), path=tiny_bundle.path, bundle=tiny_bundle, dtype=dtype
        )
        options = {
            "compute_units": compute_units,
            "context_length": 48,
            "prefill_chunk": prefill_chunk,
            "cache_dir": cache,
        }
        model = plugin.infer_load(spec, options)
        assert isinstance(model, CoreMLModel)
        return model

    return make


@pytest.mark.parametrize(
    ("dtype", "units", "atol"),
    [
        ("fp32", "cpu_only", 1e-4),
        ("fp16", "cpu_only", 0.05),
        ("fp16", "cpu_and_gpu", 0.05),
        ("fp16", "cpu_and_ne", 0.1),
    ],
)
def test_prefill_and_decode_match_the_reference(
    greedy_pairs: GreedyPairs, load: Loader, reference: ReferenceModel, *, dtype: str, units: str, atol: float
) -> None:
    for step, (got, want) in enumerate(greedy_pairs(load(dtype, units), reference, PROMPT, DECODE_STEPS)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"{dtype} on {units}, step {step}")


def test_cpu_and_neural_engine_agree(greedy_pairs: GreedyPairs, load: Loader, reference: ReferenceModel) -> None:
    cpu = greedy_pairs(load("fp16", "cpu_only"), reference, PROMPT, DECODE_STEPS)
    ane = greedy_pairs(load("fp16", "cpu_and_ne"), reference, PROMPT, DECODE_STEPS)
    for step, ((a, _), (b, _)) in enumerate(zip(cpu, ane, strict=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=0.1, err_msg=f"step {step}")


def test_int4_weights_keep_the_logits_close_to_the_reference(
    greedy_pairs: GreedyPairs, load: Loader, reference: ReferenceModel
) -> None:
    for got, want in greedy_pairs(load("int4", "cpu_only"), reference, PROMPT, DECODE_STEPS):
        assert np.corrcoef(got, want)[0, 1] > 0.99


def test_decode_after_prefill_equals_prefilling_the_longer_prompt(load: Loader) -> None:
    model = load("fp32", "cpu_only")
    seq = model.new_sequence(32)
    model.prefill(Batch((seq,), token_rows([PROMPT[:-1]])))
    appended = model.decode(Batch((seq,), token_rows([PROMPT[-1:]])))
    assert seq.length == len(PROMPT)
    whole = model.prefill(Batch((model.new_sequence(32),), token_rows([PROMPT])))
    np.testing.assert_allclose(appended, whole, rtol=0, atol=1e-4)


def test_each_sequence_keeps_its_own_state(load: Loader) -> None:
    model = load("fp32", "cpu_only")
    a, b = model.new_sequence(32), model.new_sequence(32)
    alone = model.prefill(Batch((model.new_sequence(32),), token_rows([PROMPT])))
    # Interleave: a's chunks with b's unrelated prompt in between.
    model.prefill(Batch((a,), token_rows([PROMPT[:5]])))
    model.prefill(Batch((b,), token_rows([[300, 200, 100]])))
    interleaved = model.prefill(Batch((a,), token_rows([PROMPT[5:]])))
    np.testing.assert_allclose(interleaved, alone, rtol=0, atol=1e-4)


def test_chunk_size_does_not_change_the_result(load: Loader) -> None:
    def logits(chunk: int) -> np.ndarray:
        model = load("fp32", "cpu_only", prefill_chunk=chunk)
        return model.prefill(Batch((model.new_sequence(32),), token_rows([PROMPT])))

    np.testing.assert_allclose(logits(4), logits(16), rtol=0, atol=1e-4)


def test_second_load_takes_the_package_from_the_cache(load: Loader) -> None:
    load("fp16", "cpu_only")
    again = load("fp16", "cpu_only")
    assert again.details["built"] is False
    assert Path(again.details["package"]).is_dir()
