"""GGUF models in their own precision: each quant type's blocks reach MatMulNBits unchanged."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx_helpers import PROMPT, load_spec, step

from infer.bundle import Bundle
from infer.gguf_tensors import RawTensor
from infer_backend_onnx import plugin
from infer_backend_onnx.gguf_blocks import EXACT_TYPES, from_gguf, join
from infer_backend_onnx.graph import GraphConfig, _ExternalData, _GraphBuilder

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

pytestmark = pytest.mark.integration

#: Byte offsets of the float16 scale fields (d, then dmin/m where the type has one) in a block.
_SCALE_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q8_0": (0,),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def random_blocks(qtype: str, rows: int, k: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """Blocks of ``qtype`` with random codes and sub-block scales, and float16 scales of a real model's size."""
    from gguf.constants import GGML_QUANT_SIZES

    rng = np.random.default_rng(seed)
    per_block, type_size = GGML_QUANT_SIZES[Q[qtype]]
    blocks = rng.integers(0, 256, (rows, k // per_block, type_size), dtype=np.uint8)
    for start in _SCALE_FIELDS[qtype]:
        scales = rng.uniform(1e-3, 5e-2, (rows, k // per_block)).astype(np.float16)
        blocks[..., start : start + 2] = scales[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def graph_weight(builder_args: Any, raw: RawTensor, accuracy_level: int, tmp_path: Path) -> npt.NDArray[np.float32]:
    """The ``[N, K]`` weight a built ``MatMulNBits`` (+ offsets) graph multiplies by: its output for the identity.

    The input is ``[tokens, K]`` as in the decoder (the offset product is a 2-D ``Gemm``).
    """
    n, k = raw.shape
    block = from_gguf(raw)
    assert block is not None
    with (tmp_path / "w.data").open("wb") as data:
        builder = _GraphBuilder(
            builder_args, GraphConfig(dtype="native", accuracy_level=accuracy_level), _ExternalData(data, "w.data")
        )
        y = builder.blocks_linear("x", "w", block.weight, block.offsets, None)
    builder.nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        builder.nodes,
        "w",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        builder.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    path = tmp_path / "w.onnx"
    path.write_bytes(model.SerializeToString())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert y  # the builder named its output
    out: npt.NDArray[np.float32] = session.run(None, {"x": np.eye(k, dtype=np.float32)})[0]
    return np.ascontiguousarray(out.T)


@pytest.mark.parametrize("qtype", sorted(EXACT_TYPES))
def test_graph_weight_equals_gguf_dequantization_to_float32_rounding(
    qtype: str, tiny_bundle: Bundle, tmp_path: Path
) -> None:
    rows, k = 24, 512
    blocks = random_blocks(qtype, rows, k)
    want = gguf.quants.dequantize(blocks, Q[qtype]).reshape(rows, k)
    raw = RawTensor(qtype=qtype, shape=(rows, k), blocks=blocks)
    block = from_gguf(raw)
    assert block is not None
    # Codes and scales are gguf's own; what is left is float32 rounding of the two terms the
    # graph adds, the codes' product and the block offset (a few steps of the larger), and
    # nothing at all where a type has no offset.
    offsets = np.zeros((rows, 1)) if block.offsets is None else np.repeat(block.offsets, block.weight.block_size, 1)
    bound = 4 * np.finfo(np.float32).eps * (np.abs(want - offsets) + np.abs(offsets))
    # Through ONNX Runtime with float32 arithmetic (accuracy level 0), and the mapping in numpy.
    for got in (graph_weight(tiny_bundle.spec, raw, 0, tmp_path), block.dequantize()):
        assert np.all(np.abs(got - want) <= bound)
        if block.offsets is None:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("qtype", "bits", "block"), [("Q4_1", 4, 32), ("Q4_K", 4, 32), ("Q6_K", 8, 16), ("Q8_0", 8, 32)]
)
def test_quant_types_keep_their_bits_and_block_size(qtype: str, bits: int, block: int) -> None:
    got = from_gguf(RawTensor(qtype=qtype, shape=(4, 256), blocks=random_blocks(qtype, 4, 256)))
    assert got is not None and (got.weight.bits, got.weight.block_size) == (bits, block)


def test_float_and_unmapped_types_are_left_to_a_float_product() -> None:
    assert from_gguf(RawTensor(qtype="F16", shape=(2, 32), blocks=np.zeros((2, 64), np.uint8))) is None
    assert from_gguf(RawTensor(qtype="IQ4_NL", shape=(2, 32), blocks=np.zeros((2, 18), np.uint8))) is None


def test_blocks_of_different_shapes_are_not_joined() -> None:
    a = from_gguf(RawTensor("Q4_K", (4, 256), random_blocks("Q4_K", 4, 256)))
    b = from_gguf(RawTensor("Q6_K", (4, 256), random_blocks("Q6_K", 4, 256)))
    assert a is not None and b is not None
    assert join([a, b]) is None
    joined = join([a, a])
    assert joined is not None
    np.testing.assert_array_equal(joined.dequantize(), np.concatenate([a.dequantize(), a.dequantize()]))


@pytest.fixture(scope="module")
def tiny_gguf_bundle(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Import the tiny fixture written as a GGUF in ``qtype`` (the core tests' writer)."""
    core_tests = Path(__file__).resolve().parents[2] / "infer-core" / "tests"
    if not (core_tests / "tiny_gguf.py").is_file():
        pytest.skip("needs the infer-core test sources (tiny_gguf.py)")
    sys.path.insert(0, str(core_tests))
    from tiny_gguf import write_tiny_gguf

    from infer.gguf_import import import_gguf

    def make(qtype: Any, tied: bool = False) -> Bundle:
        folder = tmp_path_factory.mktemp(qtype.name)
        write_tiny_gguf(folder / "tiny.gguf", qtype, tied=tied)
        return Bundle.open(import_gguf(folder / "tiny.gguf", folder / "bundle"))

    return make


@pytest.mark.parametrize(("qtype", "tied"), [(Q.Q4_0, False), (Q.Q4_1, False), (Q.Q8_0, True), (Q.Q5_1, True)])
def test_gguf_model_runs_natively_by_default_closer_to_its_weights_than_int4(
    tiny_gguf_bundle: Any, build_dir: Path, qtype: Any, tied: bool
) -> None:
    bundle = tiny_gguf_bundle(qtype, tied)
    reference = pytest.importorskip("infer_conformance.reference", reason="needs infer-conformance")
    expected = reference.ReferenceModel(bundle).forward(PROMPT)[-1]
    errors = {}
    for dtype in (None, "int4"):
        # int4 rounding to the nearest point of a new grid: the second rounding native avoids.
        opts = {"cache_dir": build_dir, "threads": 1, "int4_fit": False}
        model = plugin.infer_load(load_spec(bundle, dtype=dtype), opts)
        assert model is not None
        errors[model.dtype] = np.abs(step(model, [model.new_sequence(32)], [PROMPT])[0] - expected).max()  # type: ignore[arg-type]
    # Only the int8 activations of accuracy level 4 stand between native and the reference;
    # round-to-nearest int4 rounds the weights a second time.
    assert set(errors) == {"native", "int4"}
    assert errors["native"] < errors["int4"] / 3


def test_native_on_a_float_bundle_runs_its_float32_weights_unrounded(tiny_bundle: Bundle, build_dir: Path) -> None:
    options = {"cache_dir": build_dir, "threads": 1}
    native = plugin.infer_load(load_spec(tiny_bundle, dtype="native"), options)
    fp32 = plugin.infer_load(load_spec(tiny_bundle, dtype="fp32"), options)
    assert native is not None and fp32 is not None
    try:
        assert native.dtype == "native" and native.details["compute_dtype"] == "fp32"
        assert native.logits_atol == fp32.logits_atol
        got = step(native, [native.new_sequence(32)], [PROMPT])
        want = step(fp32, [fp32.new_sequence(32)], [PROMPT])
        np.testing.assert_array_equal(got, want)
    finally:
        native.close()
        fp32.close()


def test_tied_table_is_stored_once_in_its_blocks_for_lookup_and_output_head(
    tiny_gguf_bundle: Any, tmp_path: Path
) -> None:
    import onnx

    from infer_backend_onnx.graph import build_decoder

    bundle = tiny_gguf_bundle(Q.Q8_0, True)
    model = onnx.load(str(build_decoder(bundle, GraphConfig(dtype="native"), tmp_path)), load_external_data=False)
    names = {init.name for init in model.graph.initializer}
    assert "model.embed_tokens.weight" not in names  # no float copy of the table
    users = {n.op_type for n in model.graph.node if "model.embed_tokens.qweight" in n.input}
    assert users == {"GatherBlockQuantized", "MatMulNBits"}


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("env", ["INFER_SMOLLM2_GGUF", "INFER_GEMMA3_GGUF"])
def test_every_tensor_of_a_real_gguf_maps_onto_blocks_equal_to_its_dequantization(env: str) -> None:
    import os

    path = os.environ.get(env)
    if not path:
        pytest.skip(f"set {env} to the GGUF file to run (see shared/ANCHORS.md)")
    reader = gguf.GGUFReader(path)
    seen = set()
    for tensor in reader.tensors:
        qtype = Q(tensor.tensor_type).name
        if qtype not in EXACT_TYPES or len(tensor.shape) != 2:
            continue
        shape = (int(tensor.shape[1]), int(tensor.shape[0]))
        blocks = np.asarray(tensor.data).reshape(shape[0], -1)
        block = from_gguf(RawTensor(qtype=qtype, shape=shape, blocks=blocks))
        assert block is not None
        want = gguf.quants.dequantize(blocks, Q[qtype]).reshape(shape)
        got = block.dequantize()
        offsets = 0 if block.offsets is None else np.repeat(block.offsets, block.weight.block_size, 1)
        bound = 4 * np.finfo(np.float32).eps * (np.abs(want - offsets) + np.abs(offsets))
        assert np.all(np.abs(got - want) <= bound), tensor.name
        seen.add(qtype)
    assert seen  # the file has quantized matrices, and every one was checked


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_native_scores_like_its_float32_weights(tmp_path: Path) -> None:
    """With float32 activations (accuracy level 0) native is the file's weights exactly: the same
    perplexity as fp32; the default int8 activations cost a fraction of a percent."""
    import os

    import infer
    from infer.evaluate import eval_chunks, perplexity

    path = os.environ.get("INFER_SMOLLM2_GGUF")
    if not path:
        pytest.skip("set INFER_SMOLLM2_GGUF to the SmolLM2 GGUF file to run")
    os.environ.setdefault("INFER_HOME", str(tmp_path))
    scores = {}
    for label, kwargs in {"fp32": {"dtype": "fp32"}, "exact": {"accuracy_level": 0}, "native": {}}.items():
        with infer.load(path, backend="onnx", cache_dir=tmp_path / "cache", **kwargs) as model:
            assert model.dtype == kwargs.get("dtype", "native")
            scores[label] = perplexity(model, eval_chunks(model, 2, chunk_tokens=128))
    ppl = {label: s[0] for label, s in scores.items()}
    assert ppl["exact"] == pytest.approx(ppl["fp32"], rel=1e-4)
    assert np.mean(scores["exact"][2] == scores["fp32"][2]) > 0.99
    assert ppl["native"] == pytest.approx(ppl["fp32"], rel=0.01)
