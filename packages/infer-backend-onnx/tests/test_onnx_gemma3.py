"""The second real model: Gemma 3 270M (Q4_K_M GGUF imported by the core) reproduces transformers' greedy tokens.

Its sliding-window layers (window 512) are exercised only by long prompts; the tiny Gemma 3
fixture covers windows far past their size. Runs when ``INFER_GEMMA3_GGUF`` names the file.
"""

from __future__ import annotations

import json
import os
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
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    path = os.environ.get("INFER_GEMMA3_GGUF")
    if not path:
        pytest.skip("set INFER_GEMMA3_GGUF to the Gemma 3 270M Q4_K_M GGUF file to run")
    gguf_import = pytest.importorskip("infer.gguf_import")
    folder = tmp_path_factory.mktemp("gemma3")
    bundle = Bundle.open(gguf_import.import_gguf(Path(path), folder / "bundle"))
    # fp32 asked for by name: a GGUF model's default is its own quantization ("native").
    model = plugin.infer_load(load_spec(bundle, dtype="fp32"), {"cache_dir": folder / "cache"})
    assert isinstance(model, OnnxModel)
    return model


def _goldens() -> dict[str, Any]:
    fixtures = pytest.importorskip("infer_conformance.fixtures", reason="needs infer-conformance (the goldens)")
    return json.loads(fixtures.GEMMA3_GOLDENS.read_text())


def test_fp32_greedy_continuations_match_transformers(gemma3: OnnxModel) -> None:
    goldens = _goldens()
    for case in goldens["cases"]:
        ids, expected = case["prompt_ids"], case["greedy_ids"]
        cache = gemma3.new_sequence(len(ids) + goldens["max_new_tokens"])
        logits = step(gemma3, [cache], [ids])[0]
        got: list[int] = []
        while len(got) < len(expected):
            got.append(int(np.argmax(logits)))
            logits = step(gemma3, [cache], [[got[-1]]], decode=True)[0]
        assert got == expected, case["prompt_text"]
