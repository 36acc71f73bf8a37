"""The built graph: valid ONNX, and the numbers of the numpy reference at each precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_helpers import PROMPT, Loader, step

from infer.bundle import Bundle
from infer_backend_onnx.graph import GraphConfig, build_decoder

pytestmark = pytest.mark.integration

#: Largest |logit - reference| measured on the tiny bundle (random weights, logits up to ~15),
#: with margin: fp32 6.7e-6, fp16 1.4e-2, int4 (symmetric blocks of 32, int8 activations) 2.8.
#: Random weights are the worst case for 4-bit blocks; on SmolLM2 see the package README.
TOLERANCE = {"fp32": 1e-5, "fp16": 5e-2, "int4": 4.0}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int4"])
def test_built_graph_passes_the_onnx_checker(tiny_bundle: Bundle, tmp_path: Path, dtype: str) -> None:
    path = build_decoder(tiny_bundle, GraphConfig(dtype=dtype), tmp_path)
    onnx.checker.check_model(str(path), full_check=True)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int4"])
def test_prefill_logits_match_the_reference_within_the_precision_tolerance(
    load_tiny: Loader, ref_model, dtype: str
) -> None:
    model = load_tiny(dtype)
    expected = ref_model.forward(PROMPT)[-1]
    got = step(model, [model.new_sequence(32)], [PROMPT])[0]
    assert np.abs(got - expected).max() <= TOLERANCE[dtype]
    if dtype != "fp32":
        # Lossy precisions still rank the same best token on this prompt.
        assert int(np.argmax(got)) == int(np.argmax(expected))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int4"])
def test_decode_logits_match_the_reference_at_every_position(load_tiny: Loader, ref_model, dtype: str) -> None:
    model = load_tiny(dtype)
    expected = ref_model.forward(PROMPT)
    cache = model.new_sequence(len(PROMPT))
    step(model, [cache], [PROMPT[:3]])
    worst = 0.0
    for i in range(3, len(PROMPT)):
        got = step(model, [cache], [[PROMPT[i]]], decode=True)[0]
        worst = max(worst, float(np.abs(got - expected[i]).max()))
    assert worst <= TOLERANCE[dtype]


@pytest.fixture(scope="module")
def biased_bundle(tiny_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The tiny bundle with every bias a Llama-family config can ask for (q/k/v, o, MLP)."""
    import json
    import shutil

    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("biased")
    for f in tiny_bundle.path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    config = json.loads((tiny_bundle.path / "config.json").read_text())
    config |= {"attention_bias": True, "mlp_bias": True}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {name: np.asarray(tiny_bundle.weights[name]) for name in tiny_bundle.weights}
    rng = np.random.default_rng(3)
    for name, array in list(tensors.items()):
        if name.endswith("_proj.weight"):
            tensors[name.replace(".weight", ".bias")] = rng.standard_normal(array.shape[0]).astype(np.float32) * 0.1
    save_file(tensors, str(folder / "model.safetensors"))
    bundle = Bundle.open(folder)
    assert bundle.spec.attention_bias and bundle.spec.o_bias and bundle.spec.mlp_bias
    return bundle


@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_projection_biases_are_applied(biased_bundle: Bundle, build_dir: Path, dtype: str) -> None:
    from onnx_helpers import load_spec

    from infer_backend_onnx import plugin

    reference = pytest.importorskip("infer_conformance.reference", reason="needs infer-conformance")
    expected = reference.ReferenceModel(biased_bundle).forward(PROMPT)[-1]
    model = plugin.infer_load(load_spec(biased_bundle, dtype=dtype), {"cache_dir": build_dir, "threads": 1})
    assert model is not None
    got = step(model, [model.new_sequence(32)], [PROMPT])[0]  # type: ignore[arg-type]
    assert np.abs(got - expected).max() <= TOLERANCE[dtype]


def test_exact_grid_keeps_q4_1_weights_and_matches_the_reference_closely(
    tiny_bundle: Bundle, build_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A bundle whose projections lie on a 4-bit grid (as a Q4_1 GGUF import does) loses nothing
    to requantisation: only the int8 activations differ from the reference."""
    import shutil

    from onnx_helpers import load_spec
    from safetensors.numpy import save_file
    from test_onnx_quantize import _on_grid

    from infer_backend_onnx import plugin

    folder = tmp_path_factory.mktemp("gridded")
    for f in tiny_bundle.path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    tensors = {n: np.asarray(tiny_bundle.weights[n]) for n in tiny_bundle.weights}
    tensors |= {n: _on_grid(a, 32) for n, a in tensors.items() if n.endswith("_proj.weight")}
    save_file(tensors, str(folder / "model.safetensors"))
    gridded = Bundle.open(folder)
    reference = pytest.importorskip("infer_conformance.reference", reason="needs infer-conformance")
    expected = reference.ReferenceModel(gridded).forward(PROMPT)[-1]
    errors = {}
    for exact in (False, True):
        opts = {"cache_dir": build_dir, "threads": 1, "exact_grid": exact, "head_bits": 8, "int4_fit": False}
        model = plugin.infer_load(load_spec(gridded, dtype="int4"), opts)
        assert model is not None
        errors[exact] = np.abs(step(model, [model.new_sequence(32)], [PROMPT])[0] - expected).max()  # type: ignore[arg-type]
    assert errors[True] < errors[False] / 3


#: fp16 KV under float32 activations (largest |logit - reference| measured on the tiny bundle:
#: 5.9e-3 at fp32 weights, against 6.7e-6 with a float32 cache), with margin; int4 keeps its own.
KV_FP16_TOLERANCE = {"fp32": 2e-2, "int4": TOLERANCE["int4"]}


def test_fp16_kv_graph_passes_the_onnx_checker_with_half_precision_cache_io(
    tiny_bundle: Bundle, tmp_path: Path
) -> None:
    path = build_decoder(tiny_bundle, GraphConfig(dtype="fp32", kv_dtype="fp16"), tmp_path)
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    caches = [v for v in [*graph.input, *graph.output] if v.name.startswith(("past_key_values.", "present."))]
    assert caches and {v.type.tensor_type.elem_type for v in caches} == {onnx.TensorProto.FLOAT16}
    logits = next(v for v in graph.output if v.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_kv_dtype_is_part_of_the_build_key_only_when_it_differs_from_the_activations() -> None:
    assert GraphConfig(dtype="fp32", kv_dtype="fp32").key == GraphConfig(dtype="fp32").key
    assert GraphConfig(dtype="fp16", kv_dtype="fp16").key == GraphConfig(dtype="fp16").key
    assert GraphConfig(dtype="fp32", kv_dtype="fp16").key != GraphConfig(dtype="fp32").key
    assert GraphConfig(dtype="fp16", kv_dtype="fp32").key != GraphConfig(dtype="fp16").key


@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_fp16_kv_decode_matches_the_reference_and_keeps_its_greedy_tokens(
    load_tiny: Loader, ref_model, dtype: str
) -> None:
    model = load_tiny(dtype, kv_dtype="fp16")
    assert model.kv_dtype == np.float16 and model.details["kv_dtype"] == "fp16"
    full = load_tiny(dtype)
    expected = ref_model.forward(PROMPT)
    cache, full_cache = model.new_sequence(len(PROMPT)), full.new_sequence(len(PROMPT))
    step(model, [cache], [PROMPT[:3]])
    step(full, [full_cache], [PROMPT[:3]])
    worst = 0.0
    for i in range(3, len(PROMPT)):
        got = step(model, [cache], [[PROMPT[i]]], decode=True)[0]
        same_weights = step(full, [full_cache], [[PROMPT[i]]], decode=True)[0]
        worst = max(worst, float(np.abs(got - expected[i]).max()))
        assert int(np.argmax(got)) == int(np.argmax(same_weights))
    assert worst <= KV_FP16_TOLERANCE[dtype]
    # Half the bytes of the float32 cache for the same tokens.
    assert cache.nbytes * 2 == full_cache.nbytes


@pytest.mark.parametrize(("kv_dtype", "itemsize"), [("fp32", 4), ("fp16", 2)])
def test_model_reports_kv_bytes_per_token_of_its_cache_precision(
    tiny_bundle: Bundle, build_dir: Path, kv_dtype: str, itemsize: int
) -> None:
    import infer

    s = tiny_bundle.spec
    with infer.load(tiny_bundle.path, backend="onnx", cache_dir=build_dir, threads=1, kv_dtype=kv_dtype) as model:
        # keys and values, every layer, every KV head
        assert model.kv_bytes_per_token == 2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim * itemsize
