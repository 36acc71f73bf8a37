"""Families the Core ML builder does not write yet are refused at load, never run wrongly."""

from __future__ import annotations

import pytest

from infer.bundle import Bundle
from infer.contract import LoadSpec
from infer.errors import UnsupportedModelError
from infer_backend_coreml import plugin

pytestmark = pytest.mark.unit

fixtures = pytest.importorskip("infer_conformance.fixtures", reason="needs infer-conformance (family fixtures)")

WITH_FEATURES = sorted(f for f in fixtures.FAMILY_FIXTURES if f != "llama")


@pytest.mark.parametrize("family", WITH_FEATURES)
def test_loading_a_family_with_unbuilt_features_raises_naming_them(family: str) -> None:
    bundle = Bundle.open(fixtures.FAMILY_FIXTURES[family])
    spec = LoadSpec(backend="coreml", ref=str(bundle.path), path=bundle.path, bundle=bundle)
    # Refused on every platform, before the macOS check: the model could not run here either way.
    with pytest.raises(UnsupportedModelError, match="coreml backend cannot run") as caught:
        plugin.infer_load(spec, {})
    assert "sliding_window" in str(caught.value) and "onnx" in str(caught.value)
    assert caught.value.path == bundle.path


@pytest.mark.parametrize("family", WITH_FEATURES)
def test_the_builder_refuses_a_spec_it_would_build_wrongly(family: str) -> None:
    pytest.importorskip("coremltools")
    from infer_backend_coreml.builder import DecoderGraph
    from infer_backend_coreml.options import BuildConfig

    bundle = Bundle.open(fixtures.FAMILY_FIXTURES[family])
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        DecoderGraph(bundle.spec, {}, BuildConfig(dtype="fp32", context_length=64, prefill_chunk=16))
