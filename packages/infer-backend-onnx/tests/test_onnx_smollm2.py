"""The real model: SmolLM2-135M (GGUF imported by the core) reproduces the conformance goldens greedily."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx_helpers import load_spec, step

from infer.bundle import Bundle
from infer_backend_onnx import plugin
from infer_backend_onnx.runtime import OnnxModel

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    gguf_import = pytest.importorskip("infer.gguf_import")
    folder = tmp_path_factory.mktemp("smollm2")
    bundle = Bundle.open(gguf_import.import_gguf(smollm2_gguf, folder / "bundle"))
    model = plugin.infer_load(load_spec(bundle, dtype="fp32"), {"cache_dir": folder / "cache"})
    assert isinstance(model, OnnxModel)
    return model


def _goldens() -> dict[str, Any]:
    fixtures = pytest.importorskip("infer_conformance.fixtures", reason="needs infer-conformance (the goldens)")
    return json.loads(fixtures.SMOLLM2_GOLDENS.read_text())


def test_fp32_greedy_continuations_match_the_goldens(smollm2: OnnxModel) -> None:
    goldens = _goldens()
    for case in goldens["cases"]:
        ids, expected = case["prompt_ids"], case["greedy_ids"]
        cache = smollm2.new_sequence(len(ids) + goldens["max_new_tokens"])
        logits = step(smollm2, [cache], [ids])[0]
        got: list[int] = []
        while len(got) < len(expected):
            got.append(int(np.argmax(logits)))
            if got[-1] in goldens["stop_ids"]:
                break
            logits = step(smollm2, [cache], [[got[-1]]], decode=True)[0]
        assert got == expected, case.get("prompt_text", ids)


def test_a_native_gguf_reports_the_weight_types_it_computes_with(smollm2_gguf: Path, tmp_path: Path) -> None:
    import gguf

    import infer

    in_file = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(smollm2_gguf).tensors}
    with infer.load(smollm2_gguf, backend="onnx", cache_dir=tmp_path / "cache") as model:
        assert model.dtype == "native"
        # Q4_1 matrices, a Q8_0 table, float32 norms: the conformance suite grades the coarsest, int4.
        assert model.handle.details["weight_types"] == tuple(sorted(in_file))
        assert "Q4_1" in in_file
