"""Existing exports: an Optimum-style and a GenAI-style folder load and run; a graph without KV is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from infer.contract import Batch, LoadSpec, token_rows
from infer.errors import ModelFormatError
from infer_backend_onnx import plugin
from infer_backend_onnx.exports import ExportModel

pytestmark = pytest.mark.integration

VOCAB, DIM = 32, 8


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        n: rng.standard_normal(s).astype(np.float32)
        for n, s in (
            ("E", (VOCAB, DIM)),
            ("Wq", (DIM, DIM)),
            ("Wk", (DIM, DIM)),
            ("Wv", (DIM, DIM)),
            ("Wo", (DIM, VOCAB)),
        )
    }


def _toy_decoder(folder: Path, *, with_past: bool = True) -> Path:
    """One attention layer, one KV head, in the Optimum I/O layout (the last token sees every key)."""
    w = _weights()
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["x"]),
        *[helper.make_node("MatMul", ["x", f"W{n}"], [n]) for n in "qkv"],
        *[helper.make_node("Unsqueeze", [n, "one"], [n + "4"]) for n in "qkv"],
    ]
    if with_past:
        nodes += [
            helper.make_node("Concat", ["past_key_values.0.key", "k4"], ["present.0.key"], axis=2),
            helper.make_node("Concat", ["past_key_values.0.value", "v4"], ["present.0.value"], axis=2),
        ]
        keys, values = "present.0.key", "present.0.value"
    else:
        keys, values = "k4", "v4"
    nodes += [
        helper.make_node("Transpose", [keys], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q4", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", values], ["att4"]),
        helper.make_node("Squeeze", ["att4", "one"], ["att"]),
        helper.make_node("MatMul", ["att", "Wo"], ["logits"]),
    ]
    kv = ["batch", 1, "past", DIM]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    if with_past:
        inputs += [
            helper.make_tensor_value_info(f"past_key_values.0.{n}", TensorProto.FLOAT, kv) for n in ("key", "value")
        ]
        outputs += [helper.make_tensor_value_info(f"present.0.{n}", TensorProto.FLOAT, kv) for n in ("key", "value")]
    inits = [numpy_helper.from_array(a, n) for n, a in w.items()]
    inits += [
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array(1 / math.sqrt(DIM), np.float32), "scale"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "toy", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"))
    (folder / "config.json").write_text(
        json.dumps({"vocab_size": VOCAB, "max_position_embeddings": 64, "eos_token_id": 3})
    )
    return folder


def _expected_last_logits(ids: list[int]) -> np.ndarray:
    w = _weights()
    x = w["E"][ids].astype(np.float64)
    q, k, v = x @ w["Wq"], x @ w["Wk"], x @ w["Wv"]
    s = q[-1] @ k.T / math.sqrt(DIM)
    p = np.exp(s - s.max())
    return (p / p.sum()) @ v @ w["Wo"]


def _load(path: Path) -> ExportModel:
    model = plugin.infer_load(LoadSpec(backend="onnx", ref=str(path), path=path, bundle=None), {"threads": 1})
    assert isinstance(model, ExportModel)
    return model


def _step(model: ExportModel, caches: list, rows: list[list[int]], *, decode: bool = False) -> np.ndarray:
    hook = plugin.infer_decode if decode else plugin.infer_prefill
    out = hook(model, Batch(tuple(caches), token_rows(rows)))
    assert out is not None
    return out


def test_optimum_folder_loads_and_prefill_matches_numpy(tmp_path: Path) -> None:
    model = _load(_toy_decoder(tmp_path / "optimum"))
    assert model.details["export"] == "optimum" and model.vocab_size == VOCAB and model.eos_token_ids == (3,)
    got = _step(model, [model.new_sequence(16)], [[1, 5, 9, 2]])[0]
    np.testing.assert_allclose(got, _expected_last_logits([1, 5, 9, 2]), atol=1e-4)


def test_export_decode_after_prefill_equals_a_full_prefill(tmp_path: Path) -> None:
    model = _load(_toy_decoder(tmp_path / "optimum"))
    cache = model.new_sequence(16)
    _step(model, [cache], [[1, 5]])
    _step(model, [cache], [[9]], decode=True)
    got = _step(model, [cache], [[2]], decode=True)[0]
    assert cache.length == 4 and cache.nbytes == 2 * 4 * DIM * 4
    np.testing.assert_allclose(got, _expected_last_logits([1, 5, 9, 2]), atol=1e-4)


def test_export_batch_rows_equal_single_rows(tmp_path: Path) -> None:
    model = _load(_toy_decoder(tmp_path / "optimum"))
    got = _step(model, [model.new_sequence(8), model.new_sequence(8)], [[1, 2, 3], [4]])
    np.testing.assert_allclose(got, np.stack([_expected_last_logits([1, 2, 3]), _expected_last_logits([4])]), atol=1e-4)


def test_genai_folder_is_recognised_by_its_config(tmp_path: Path) -> None:
    folder = _toy_decoder(tmp_path / "genai")
    (folder / "model.onnx").rename(folder / "decoder.onnx")
    (folder / "config.json").unlink()
    genai = {
        "model": {
            "decoder": {"filename": "decoder.onnx"},
            "vocab_size": VOCAB,
            "context_length": 32,
            "eos_token_id": [3, 4],
        }
    }
    (folder / "genai_config.json").write_text(json.dumps(genai))
    model = _load(folder)
    assert model.details["export"] == "genai" and model.context_length == 32 and model.eos_token_ids == (3, 4)
    np.testing.assert_allclose(
        _step(model, [model.new_sequence(8)], [[7, 8]])[0], _expected_last_logits([7, 8]), atol=1e-4
    )


def test_asking_an_export_for_another_precision_raises_invalid_parameter(tmp_path: Path) -> None:
    from infer.errors import InvalidParameterError

    folder = _toy_decoder(tmp_path / "optimum")
    spec = LoadSpec(backend="onnx", ref=str(folder), path=folder, bundle=None, dtype="int4")
    with pytest.raises(InvalidParameterError, match="own precision"):
        plugin.infer_load(spec, {"threads": 1})
    assert _load(folder).dtype == "fp32"


def test_asking_an_export_for_another_kv_precision_raises_invalid_parameter(tmp_path: Path) -> None:
    from infer.errors import InvalidParameterError

    folder = _toy_decoder(tmp_path / "optimum")
    spec = LoadSpec(backend="onnx", ref=str(folder), path=folder, bundle=None)
    with pytest.raises(InvalidParameterError, match="cache has its own precision") as info:
        plugin.infer_load(spec, {"threads": 1, "kv_dtype": "fp16"})
    assert info.value.parameter == "kv_dtype"


def test_a_graph_without_past_key_values_raises_model_format(tmp_path: Path) -> None:
    folder = _toy_decoder(tmp_path / "nokv", with_past=False)
    with pytest.raises(ModelFormatError, match="past_key_values"):
        _load(folder)


def test_genai_config_without_decoder_file_raises_model_format(tmp_path: Path) -> None:
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(ModelFormatError, match="decoder"):
        _load(tmp_path)


def test_a_corrupt_graph_raises_model_format(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ModelFormatError):
        _load(tmp_path)
