"""The graph's numbers against the numpy reference, computed by MIL value inference on Linux.

Every op of the packaged functions is evaluated in numpy except the state reads and writes,
which become constants carried from step to step (:class:`ConstantKV`), and SiLU, spelled
x * sigmoid(x) because coremltools' ``silu`` has no value inference. The prompt runs through
the handle's own chunking, padding and position logic (:class:`FoldingExecutor`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from infer.bundle import Bundle
from infer.contract import Batch, token_rows
from infer_backend_coreml.builder import MASK_VALUE, DecoderGraph
from infer_backend_coreml.options import BuildConfig
from infer_backend_coreml.runtime import CoreMLModel
from infer_conformance.reference import ReferenceModel

pytest.importorskip("coremltools")

pytestmark = pytest.mark.integration

#: fp32 compute with the KV cache split over two fp16 states: within 1e-5 of the reference.
FP32_ATOL = 1e-5
#: fp16 compute: measured at most 0.018 on logits up to 12 in magnitude (0.15%).
FP16_ATOL = 0.05
PROMPT = [17, 250, 3, 99, 42, 301, 7, 8, 120, 64, 33]  # 11 tokens: chunks of 4, 4 and 3
DECODE_STEPS = 4
GreedyPairs = Callable[..., list[tuple[np.ndarray, np.ndarray]]]


@pytest.mark.parametrize(("dtype", "atol"), [("fp32", FP32_ATOL), ("fp16", FP16_ATOL)])
def test_chunked_prefill_then_decode_matches_the_reference(
    greedy_pairs: GreedyPairs,
    folded_model: Callable[..., CoreMLModel],
    reference: ReferenceModel,
    dtype: str,
    atol: float,
) -> None:
    for step, (got, want) in enumerate(greedy_pairs(folded_model(dtype=dtype), reference, PROMPT, DECODE_STEPS)):
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"step {step}")


def test_padding_a_short_chunk_does_not_change_the_logits(
    greedy_pairs: GreedyPairs, folded_model: Callable[..., CoreMLModel], reference: ReferenceModel
) -> None:
    padded = greedy_pairs(folded_model(prefill_chunk=16), reference, PROMPT, DECODE_STEPS)  # one chunk, 5 padding rows
    exact = greedy_pairs(folded_model(prefill_chunk=11), reference, PROMPT, DECODE_STEPS)  # one chunk, no padding
    # Only summation order differs (different shapes); a leak from padding would be O(1).
    for (a, _), (b, _) in zip(padded, exact, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=FP32_ATOL)


def test_prefill_feeds_fixed_chunks_and_a_lone_last_token_through_decode(
    folded_model: Callable[..., CoreMLModel],
) -> None:
    model = folded_model(prefill_chunk=4)
    seq = model.new_sequence(32)
    model.prefill(Batch((seq,), token_rows([PROMPT[:9]])))
    assert model._executor.calls == [("prefill", 0, 4), ("prefill", 4, 4), ("decode", 8, 1)]  # type: ignore[union-attr]
    assert seq.length == 9


@pytest.mark.parametrize(("dtype", "atol"), [("fp32", FP32_ATOL), ("fp16", 0.01)])
def test_kv_state_holds_the_rotated_keys_and_values_at_their_positions(
    folded_model: Callable[..., CoreMLModel], reference: ReferenceModel, dtype: str, atol: float
) -> None:
    model = folded_model(dtype=dtype, prefill_chunk=4)
    seq = model.new_sequence(model.context_length)
    model.prefill(Batch((seq,), token_rows([PROMPT])))
    cache = reference.new_cache()
    reference.step(cache, PROMPT)
    arrays = seq.state.arrays
    n = len(PROMPT)
    for layer in range(reference.spec.num_hidden_layers):
        for kind, want in (("k", cache.keys[layer]), ("v", cache.values[layer])):
            got = arrays[f"{kind}_{layer}"].astype(np.float64)
            if dtype == "fp32":
                got += arrays[f"{kind}_{layer}_lo"]
            np.testing.assert_allclose(got[0, :, :n], want, rtol=0, atol=atol)
            # The last chunk (3 tokens) wrote one padding row; nothing was written past it.
            assert not got[0, :, n + 1 :].any()


def test_decode_writes_exactly_one_row_of_the_state(folded_model: Callable[..., CoreMLModel]) -> None:
    model = folded_model()
    seq = model.new_sequence(16)
    model.prefill(Batch((seq,), token_rows([PROMPT[:4]])))
    before = {k: v.copy() for k, v in seq.state.arrays.items()}
    model.decode(Batch((seq,), token_rows([[5]])))
    for name, after in seq.state.arrays.items():
        changed = np.flatnonzero((after != before[name]).any(axis=(0, 1, 3)))
        assert changed.tolist() in ([4], []), name  # a _lo residue row may happen to be unchanged


def test_rms_norm_is_finite_and_exact_in_fp16_beyond_the_range_where_squares_overflow(tiny_bundle: Bundle) -> None:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function

    hidden = tiny_bundle.spec.hidden_size
    rows = np.stack([np.linspace(-3000, 3000, hidden), np.zeros(hidden), np.full(hidden, 1e-3)]).astype(np.float16)
    config = BuildConfig(dtype="fp16", context_length=8, prefill_chunk=1)
    weights = {"w": np.ones(hidden, np.float32)}
    graph = DecoderGraph(tiny_bundle.spec, weights, config, foldable=True)
    with Function({}, opset_version=ct.target.iOS18):
        got = graph.rms_norm(mb.const(val=rows), "w").val
    x = rows.astype(np.float64)
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + tiny_bundle.spec.rms_norm_eps)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_mask_value_is_finite_in_fp16_and_vanishes_under_softmax() -> None:
    assert np.isfinite(np.float16(MASK_VALUE))
    assert np.exp(np.float16(MASK_VALUE) - np.float16(30)) == 0
