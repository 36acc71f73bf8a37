"""The built package's structure, read back from disk (works without the Core ML runtime)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infer.bundle import Bundle
from infer.errors import ModelFormatError
from infer_backend_coreml.builder import (
    EMBEDDING_OP,
    FUNCTION_DECODE,
    FUNCTION_PREFILL,
    INPUT_IDS,
    INPUT_LAST_INDEX,
    INPUT_POSITION,
    OUTPUT_LOGITS,
    build_package,
    kv_state_shapes,
)
from infer_backend_coreml.options import BuildConfig
from infer_backend_coreml.package import read_package_layout

ct = pytest.importorskip("coremltools")
from coremltools.proto import FeatureTypes_pb2  # noqa: E402

pytestmark = pytest.mark.integration

FP16 = BuildConfig(dtype="fp16", context_length=32, prefill_chunk=8)
FP32 = BuildConfig(dtype="fp32", context_length=32, prefill_chunk=8)
INT4 = BuildConfig(dtype="int4", context_length=32, prefill_chunk=8)
ARRAY = FeatureTypes_pb2.ArrayFeatureType


def _spec(path: Path) -> Any:
    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def _function(spec: Any, name: str) -> Any:
    return next(f for f in spec.description.functions if f.name == name)


def _arrays(features: Any) -> dict[str, tuple[list[int], int]]:
    return {
        f.name: (list(f.type.multiArrayType.shape), f.type.multiArrayType.dataType)
        for f in features
        if f.type.WhichOneof("Type") == "multiArrayType"
    }


def _ops(spec: Any, function: str) -> list[Any]:
    return [
        op for block in spec.mlProgram.functions[function].block_specializations.values() for op in block.operations
    ]


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "Data" / "com.apple.CoreML" / "weights").iterdir())


def test_package_has_prefill_and_decode_functions_with_decode_as_default(
    build_tiny: Callable[[BuildConfig], Path],
) -> None:
    spec = _spec(build_tiny(FP16))
    assert [f.name for f in spec.description.functions] == [FUNCTION_PREFILL, FUNCTION_DECODE]
    assert spec.description.defaultFunctionName == FUNCTION_DECODE


def test_package_targets_ios18_the_first_release_with_states(build_tiny: Callable[[BuildConfig], Path]) -> None:
    assert _spec(build_tiny(FP16)).specificationVersion == ct.target.iOS18.value


def test_prefill_takes_a_fixed_chunk_a_start_position_and_the_row_to_return(
    build_tiny: Callable[[BuildConfig], Path],
) -> None:
    prefill = _function(_spec(build_tiny(FP16)), FUNCTION_PREFILL)
    assert _arrays(prefill.input) == {
        INPUT_IDS: ([1, FP16.prefill_chunk], ARRAY.INT32),
        INPUT_POSITION: ([1], ARRAY.INT32),
        INPUT_LAST_INDEX: ([1], ARRAY.INT32),
    }


def test_decode_takes_one_token_and_its_position(build_tiny: Callable[[BuildConfig], Path]) -> None:
    decode = _function(_spec(build_tiny(FP16)), FUNCTION_DECODE)
    assert _arrays(decode.input) == {INPUT_IDS: ([1, 1], ARRAY.INT32), INPUT_POSITION: ([1], ARRAY.INT32)}


@pytest.mark.parametrize("config", [FP16, FP32, INT4], ids=lambda c: c.dtype)
def test_both_functions_return_float32_logits_of_one_row(
    build_tiny: Callable[[BuildConfig], Path], tiny_bundle: Bundle, config: BuildConfig
) -> None:
    spec = _spec(build_tiny(config))
    for name in (FUNCTION_PREFILL, FUNCTION_DECODE):
        assert _arrays(_function(spec, name).output) == {
            OUTPUT_LOGITS: ([1, tiny_bundle.spec.vocab_size], ARRAY.FLOAT32)
        }


@pytest.mark.parametrize("config", [FP16, FP32], ids=lambda c: c.dtype)
def test_both_functions_declare_the_same_fp16_kv_states_sized_for_context_plus_chunk(
    build_tiny: Callable[[BuildConfig], Path], tiny_bundle: Bundle, config: BuildConfig
) -> None:
    arch = tiny_bundle.spec
    spec = _spec(build_tiny(config))
    shape = [1, arch.num_key_value_heads, config.context_length + config.prefill_chunk, arch.head_dim]
    per_cache = 2 if config.dtype == "fp32" else 1  # fp32 adds the *_lo residue state
    for name in (FUNCTION_PREFILL, FUNCTION_DECODE):
        states = {
            s.name: (list(s.type.stateType.arrayType.shape), s.type.stateType.arrayType.dataType)
            for s in _function(spec, name).state
        }
        assert len(states) == 2 * arch.num_hidden_layers * per_cache
        assert states == {n: (shape, ARRAY.FLOAT16) for n in kv_state_shapes(arch, config)}


def test_graph_uses_fused_attention_states_and_reduce_op_rmsnorm(build_tiny: Callable[[BuildConfig], Path]) -> None:
    spec = _spec(build_tiny(FP16))
    for name in (FUNCTION_PREFILL, FUNCTION_DECODE):
        types = [op.type for op in _ops(spec, name)]
        layers = 2
        assert types.count("scaled_dot_product_attention") == layers
        # Each cache is read, updated and read back (Core ML's in-place state pattern).
        assert types.count("read_state") == 4 * layers
        assert types.count("write_state") == 2 * layers
        assert types.count("slice_update") == 2 * layers
        assert types.count("reduce_mean") == 2 * layers + 1
        assert types.count("rsqrt") == 2 * layers + 1
        assert "silu" in types


def test_fp16_build_computes_in_fp16_and_casts_only_the_logits(build_tiny: Callable[[BuildConfig], Path]) -> None:
    spec = _spec(build_tiny(FP16))
    fp32_ops = [
        op.type
        for op in _ops(spec, FUNCTION_DECODE)
        if op.type != "const" and op.outputs and op.outputs[0].type.tensorType.dataType == ct.proto.MIL_pb2.FLOAT32
    ]
    assert fp32_ops == ["cast", "identity"]


def test_functions_share_one_copy_of_the_weights(
    build_tiny: Callable[[BuildConfig], Path], tiny_bundle: Bundle
) -> None:
    weight_bytes = 2 * sum(int(np.prod(s)) for s in tiny_bundle.spec.expected_shapes().values())  # fp16
    assert weight_bytes <= _weights_bytes(build_tiny(FP16)) < 1.3 * weight_bytes


def test_int4_build_stores_blockwise_quantized_weights_in_less_than_half_of_fp16(
    build_tiny: Callable[[BuildConfig], Path],
) -> None:
    spec = _spec(build_tiny(INT4))
    for name in (FUNCTION_PREFILL, FUNCTION_DECODE):
        assert any(op.type == "constexpr_blockwise_shift_scale" for op in _ops(spec, name))
    assert _weights_bytes(build_tiny(INT4)) < _weights_bytes(build_tiny(FP16)) / 2


def test_package_reloads_from_disk_with_its_metadata(build_tiny: Callable[[BuildConfig], Path], tmp_path: Path) -> None:
    model = ct.models.MLModel(str(build_tiny(FP16)), skip_model_load=True)
    assert model.user_defined_metadata["test"] == "yes"
    copy = tmp_path / "copy.mlpackage"
    model.save(str(copy))
    again = _spec(copy)
    assert again.description == _spec(build_tiny(FP16)).description


@pytest.mark.parametrize("config", [FP16, FP32, INT4], ids=lambda c: c.dtype)
def test_a_ready_package_describes_its_own_layout(
    build_tiny: Callable[[BuildConfig], Path], tiny_bundle: Bundle, config: BuildConfig
) -> None:
    layout = read_package_layout(build_tiny(config))
    assert layout.config == config
    assert layout.vocab_size == tiny_bundle.spec.vocab_size
    states = kv_state_shapes(tiny_bundle.spec, config).values()
    assert layout.kv_bytes == sum(2 * int(np.prod(s)) for s in states)


def test_a_package_from_elsewhere_is_refused_with_a_format_error(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec((1, 4))], opset_version=ct.target.iOS18)
    def program(x: Any) -> Any:
        return mb.relu(x=x)

    path = tmp_path / "other.mlpackage"
    with warnings.catch_warnings():  # coremltools leaks a TemporaryDirectory per conversion
        warnings.simplefilter("ignore", ResourceWarning)
        ct.convert(program, minimum_deployment_target=ct.target.iOS18, skip_model_load=True, package_dir=str(path))
    with pytest.raises(ModelFormatError, match="not a Core ML package built by infer"):
        read_package_layout(path)


def test_int4_quantizes_linear_weights_and_the_embedding_but_not_the_rotary_tables(
    build_tiny: Callable[[BuildConfig], Path],
) -> None:
    ops = _ops(_spec(build_tiny(INT4)), FUNCTION_DECODE)
    quantized = {out.name for op in ops if op.type == "constexpr_blockwise_shift_scale" for out in op.outputs}
    linears = [op for op in ops if op.type == "linear"]
    gathers = [op for op in ops if op.type == "gather"]
    assert all(op.inputs["weight"].arguments[0].name in quantized for op in linears)
    tables = {op.outputs[0].name: op.inputs["x"].arguments[0].name in quantized for op in gathers}
    assert tables.pop(EMBEDDING_OP) is True
    assert tables and not any(tables.values())  # the cos/sin lookups


def test_int4_build_of_tied_embeddings_quantizes_the_shared_table_once(tiny_bundle: Bundle, tmp_path: Path) -> None:
    spec = dataclasses.replace(tiny_bundle.spec, tie_word_embeddings=True)
    weights = {name: tiny_bundle.weights[name] for name in spec.expected_shapes()}
    package = build_package(spec, weights, INT4, tmp_path / "tied.mlpackage")
    ops = _ops(_spec(package), FUNCTION_DECODE)
    head = [op for op in ops if op.type == "linear"][-1]
    embed = next(op for op in ops if op.outputs and op.outputs[0].name == EMBEDDING_OP)
    assert head.inputs["weight"].arguments[0].name == embed.inputs["x"].arguments[0].name
