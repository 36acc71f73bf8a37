"""int4 packing: what quantize_int4 writes is what ONNX Runtime's MatMulNBits multiplies by."""

from __future__ import annotations

import numpy as np
import pytest

from infer_backend_onnx.quantize import dequantize, fit_affine, fit_grid, quantize

pytestmark = pytest.mark.unit


def _matmul_nbits(x: np.ndarray, w: np.ndarray, block_size: int, bits: int, symmetric: bool) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    q = quantize(w, block_size, bits=bits, symmetric=symmetric)
    n, k = w.shape
    node = helper.make_node(
        "MatMulNBits",
        ["x", "b", "s", "z" if q.zero_points is not None else ""],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block_size,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(q.packed, "b"),
            numpy_helper.from_array(q.scales, "s"),
            *([] if q.zero_points is None else [numpy_helper.from_array(q.zero_points, "z")]),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("n", "k", "block_size"), [(48, 64, 32), (40, 192, 64), (24, 96, 64), (16, 80, 32)])
def test_matmul_nbits_multiplies_by_the_dequantized_weight(
    n: int, k: int, block_size: int, bits: int, symmetric: bool
) -> None:
    rng = np.random.default_rng(n * k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    expected = x @ dequantize(quantize(w, block_size, bits=bits, symmetric=symmetric)).T
    np.testing.assert_allclose(_matmul_nbits(x, w, block_size, bits, symmetric), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantization_error_is_at_most_half_a_step_per_block(bits: int, symmetric: bool) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    q = quantize(w, 32, bits=bits, symmetric=symmetric)
    err = np.abs(dequantize(q) - w).reshape(32, 4, 32)
    assert np.all(err <= q.scales[..., None] / 2 + 1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_weights_stay_exactly_zero(symmetric: bool) -> None:
    w = np.zeros((4, 64), np.float32)
    w[0, :32] = np.linspace(0.5, 2.0, 32)
    deq = dequantize(quantize(w, 32, symmetric=symmetric))
    np.testing.assert_array_equal(deq[1:], 0.0)
    assert deq[0, 40] == 0.0


def test_symmetric_blocks_carry_no_zero_point_tensor() -> None:
    assert quantize(np.ones((2, 32), np.float32), 32, symmetric=True).zero_points is None


def _on_grid(w: np.ndarray, block_size: int = 32) -> np.ndarray:
    """``w`` snapped to a Q4_1-style grid: per block, minimum plus a multiple of (max - min) / 15."""
    n, k = w.shape
    b = w.reshape(n, k // block_size, block_size)
    lo, step = b.min(-1, keepdims=True), (b.max(-1, keepdims=True) - b.min(-1, keepdims=True)) / 15
    return (lo + np.rint((b - lo) / step) * step).reshape(n, k).astype(np.float32)


def test_fit_grid_recovers_a_q4_1_grid_exactly() -> None:
    w = _on_grid(np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32))
    fitted = fit_grid(w, 32)
    assert fitted is not None
    q, offsets = fitted
    recon = dequantize(q) + np.repeat(offsets, 32, axis=1)
    np.testing.assert_allclose(recon, w, atol=1e-6)


def test_fit_grid_refuses_weights_off_any_grid() -> None:
    assert fit_grid(np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32), 32) is None


def _fitted(w: np.ndarray, block_size: int) -> np.ndarray:
    q, offsets = fit_affine(w, block_size)
    n, k = w.shape
    return (dequantize(q).reshape(n, -1, block_size) + offsets[..., None]).reshape(n, k)


def test_least_squares_blocks_beat_round_to_nearest_on_heavy_tailed_weights() -> None:
    rng = np.random.default_rng(5)
    w = (rng.standard_t(4, (256, 256)) * 0.02).astype(np.float32)
    fitted = np.square(_fitted(w, 32) - w).sum()
    for symmetric in (False, True):
        rtn = np.square(dequantize(quantize(w, 32, symmetric=symmetric)) - w).sum()
        assert fitted < 0.85 * rtn
    # Never worse than the plain min/max grid it starts from, block by block.
    blocks = w.reshape(256, 8, 32)
    lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    step = (hi - lo) / 15
    plain = np.clip(np.rint((blocks - lo) / step), 0, 15) * step + lo
    fitted_err = np.square(_fitted(w, 32).reshape(256, 8, 32) - blocks).sum(-1)
    assert np.all(fitted_err <= np.square(plain - blocks).sum(-1) * (1 + 1e-5) + 1e-12)


def test_least_squares_blocks_recover_weights_already_on_a_minimum_grid() -> None:
    w = _on_grid(np.random.default_rng(6).standard_normal((16, 128)).astype(np.float32), 32)
    np.testing.assert_allclose(_fitted(w, 32), w, rtol=0, atol=1e-5 * np.abs(w).max())
