"""Every model family the registry knows, built into a graph and graded on its transformers goldens.

The family fixtures' prompts (80-120 tokens) run far past their sliding window of 16; they are
fed as a chunked prefill (chunks of 29, so chunk edges fall inside and across windows), then
16 decode steps, and every logits row is checked against transformers' float32 outputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx_helpers import load_spec, step

from infer.bundle import Bundle
from infer.errors import UnsupportedModelError
from infer_backend_onnx import graph, plugin
from infer_backend_onnx.runtime import OnnxModel

pytestmark = pytest.mark.integration

fixtures = pytest.importorskip("infer_conformance.fixtures", reason="needs infer-conformance (family fixtures)")

#: Largest |logit - golden| measured over all families (logits spread ~1-4 units), with margin:
#: fp32 1.5e-5, fp16 1.9e-2, int4 3.6 (random weights are the worst case for 4-bit blocks).
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "int4": 4.5}
CHUNK = 29


@pytest.fixture(scope="module", params=sorted(fixtures.FAMILY_FIXTURES))
def family(request: pytest.FixtureRequest) -> tuple[Bundle, dict[str, np.ndarray], dict[str, Any]]:
    bundle = Bundle.open(fixtures.FAMILY_FIXTURES[request.param])
    with np.load(fixtures.GOLDENS / f"{bundle.path.name}.npz") as data:
        arrays = dict(data)
    return bundle, arrays, json.loads((fixtures.GOLDENS / f"{bundle.path.name}.json").read_text())


@pytest.fixture
def loaded(build_dir: Path) -> Iterator[list[OnnxModel]]:
    models: list[OnnxModel] = []
    yield models
    for model in models:
        model.close()


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int4"])
def test_chunked_prefill_and_decode_far_past_the_window_match_the_goldens(
    family: tuple[Bundle, dict[str, np.ndarray], dict[str, Any]], build_dir: Path, loaded: list[OnnxModel], dtype: str
) -> None:
    bundle, arrays, meta = family
    model = plugin.infer_load(load_spec(bundle, dtype=dtype), {"cache_dir": build_dir, "threads": 1})
    assert isinstance(model, OnnxModel)
    loaded.append(model)
    worst = 0.0
    for n, prompt in enumerate(meta["prompts"]):
        ids, greedy = prompt["ids"], prompt["greedy"]
        cache = model.new_sequence(len(ids) + len(greedy))
        for start in range(0, len(ids) - 1, CHUNK):
            logits = step(model, [cache], [ids[start : min(start + CHUNK, len(ids) - 1)]])[0]
        worst = max(worst, float(np.abs(logits - arrays[f"prefill_{n}"][-1]).max()))
        for i, token in enumerate([ids[-1], *greedy[:-1]]):
            logits = step(model, [cache], [[token]], decode=True)[0]
            worst = max(worst, float(np.abs(logits - arrays[f"decode_{n}"][i]).max()))
            if dtype == "fp32":
                assert int(np.argmax(logits)) == greedy[i]
    assert worst <= TOLERANCE[dtype]


def test_rows_of_different_lengths_past_the_window_decode_as_they_would_alone(build_dir: Path) -> None:
    bundle = Bundle.open(fixtures.FAMILY_FIXTURES["gemma3"])
    model = plugin.infer_load(load_spec(bundle), {"cache_dir": build_dir, "threads": 1})
    assert isinstance(model, OnnxModel)
    rng = np.random.default_rng(5)
    rows = [[int(t) for t in rng.integers(3, 384, n)] for n in (50, 21)]
    try:
        alone = [step(model, [model.new_sequence(64)], [row])[0] for row in rows]
        caches = [model.new_sequence(64) for _ in rows]
        together = step(model, caches, rows)
        np.testing.assert_allclose(together, np.stack(alone), atol=1e-4, rtol=0)
    finally:
        model.close()


def test_each_windowed_layer_gets_its_window_and_rope_table(tmp_path: Path) -> None:
    bundle = Bundle.open(fixtures.FAMILY_FIXTURES["gemma3"])
    proto = onnx.load(str(graph.build_decoder(bundle, graph.GraphConfig(), tmp_path)), load_external_data=False)
    attention = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    windows = [next((a.i for a in n.attribute if a.name == "local_window_size"), None) for n in attention]
    assert windows == list(bundle.spec.sliding_windows)
    cos_tables = [n.input[7] for n in attention]
    assert cos_tables[0] == cos_tables[1] != cos_tables[2]


def test_a_spec_feature_the_graph_does_not_build_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(graph, "SUPPORTED_FEATURES", graph.SUPPORTED_FEATURES - {"qk_norm"})
    with pytest.raises(UnsupportedModelError, match=r"onnx backend .*qk_norm"):
        graph.build_decoder(Bundle.open(fixtures.FAMILY_FIXTURES["qwen3"]), graph.GraphConfig(), tmp_path)
    assert not (tmp_path / graph.MODEL_FILE).exists()


def test_partial_rotary_the_attention_kernel_cannot_rotate_is_refused(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "phi3"
    shutil.copytree(fixtures.FAMILY_FIXTURES["phi3"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="rotates 8 dims"):
        graph.build_decoder(Bundle.open(folder), graph.GraphConfig(), tmp_path / "build")
