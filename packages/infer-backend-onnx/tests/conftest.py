"""Shared fixtures: the conformance suite's tiny Llama bundle, loaded through the backend's hooks, and the
real SmolLM2 GGUF named by ``INFER_SMOLLM2_GGUF``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from onnx_helpers import Loader, load_spec

from infer.bundle import Bundle
from infer_backend_onnx import plugin
from infer_backend_onnx.runtime import OnnxModel


@pytest.fixture(scope="session")
def tiny_bundle() -> Bundle:
    """The conformance suite's tiny Llama bundle (tests that need it skip without infer-conformance)."""
    fixtures = pytest.importorskip("infer_conformance.fixtures", reason="needs infer-conformance (the tiny bundle)")
    return Bundle.open(fixtures.TINY_LLAMA)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF named by ``INFER_SMOLLM2_GGUF``; tests using it skip, saying why, without it."""
    path = os.environ.get("INFER_SMOLLM2_GGUF")
    if not path:
        pytest.skip("set INFER_SMOLLM2_GGUF to the SmolLM2 GGUF file to run (see shared/ANCHORS.md)")
    if not Path(path).is_file():
        pytest.skip(f"INFER_SMOLLM2_GGUF names {path}, which is not a file")
    return Path(path)


@pytest.fixture(scope="session")
def ref_model(tiny_bundle: Bundle) -> Any:
    """The numpy reference forward of the tiny bundle."""
    reference = pytest.importorskip("infer_conformance.reference", reason="needs infer-conformance (the reference)")
    return reference.ReferenceModel(tiny_bundle)


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def load_tiny(tiny_bundle: Bundle, build_dir: Path) -> Iterator[Loader]:
    """Load the tiny bundle at a precision; builds are shared by the whole session."""
    loaded: list[OnnxModel] = []

    def load(dtype: str = "fp32", **options: Any) -> OnnxModel:
        opts: Mapping[str, Any] = {"cache_dir": build_dir, "threads": 1, **options}
        model = plugin.infer_load(load_spec(tiny_bundle, dtype=dtype), opts)
        assert isinstance(model, OnnxModel)
        loaded.append(model)
        return model

    yield load
    for model in loaded:
        model.close()


@pytest.fixture(scope="session")
def tiny_fp32(load_tiny: Loader) -> OnnxModel:
    return load_tiny("fp32")
