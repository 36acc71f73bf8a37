"""Shared fixtures: the conformance tiny Llama bundle, its numpy reference, and built packages."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

try:
    import infer_conformance  # noqa: F401
except ImportError:
    # In the workspace checkout the conformance distribution may not be installed yet; its
    # sources sit beside this package, and the fixtures and reference need nothing else.
    _CONFORMANCE_SRC = Path(__file__).resolve().parents[3] / "conformance" / "src"
    if not (_CONFORMANCE_SRC / "infer_conformance").is_dir():
        raise
    sys.path.insert(0, str(_CONFORMANCE_SRC))

from infer.bundle import Bundle
from infer_conformance.fixtures import TINY_LLAMA
from infer_conformance.reference import ReferenceModel

from infer_backend_coreml.options import BuildConfig


@pytest.fixture(scope="session")
def tiny_bundle() -> Bundle:
    """The conformance suite's 2-layer Llama bundle (hidden 64, 4 heads over 2 KV heads)."""
    return Bundle.open(TINY_LLAMA)


@pytest.fixture(scope="session")
def reference(tiny_bundle: Bundle) -> ReferenceModel:
    """The numpy oracle for the tiny bundle."""
    return ReferenceModel(tiny_bundle)


@pytest.fixture(scope="session")
def build_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Bundle) -> Callable[[BuildConfig], Path]:
    """Build (once per configuration) the tiny bundle's package; returns its path."""
    from infer_backend_coreml.builder import build_package

    built: dict[BuildConfig, Path] = {}

    def build(config: BuildConfig) -> Path:
        if config not in built:
            folder = tmp_path_factory.mktemp(f"coreml-{config.dtype}")
            built[config] = build_package(
                tiny_bundle.spec, tiny_bundle.weights, config, folder / "model.mlpackage", metadata={"test": "yes"}
            )
        return built[config]

    return build
