"""Every family the registry knows, built by the MIL builder: its numbers against the numpy
reference by constant folding (no Core ML runtime needed), and the refusal of what it does not write.

The prompt (30 tokens, prefill chunks of 8) runs past the fixtures' sliding window of 16, and
decode continues from there, so a window missing from the masks would show.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from infer.bundle import Bundle
from infer.contract import LoadSpec
from infer.errors import UnsupportedModelError
from infer_backend_coreml import plugin
from infer_backend_coreml.options import BuildConfig
from infer_backend_coreml.runtime import CoreMLModel

Pairs = list[tuple[np.ndarray, np.ndarray]]

pytestmark = pytest.mark.integration

fixtures = pytest.importorskip("infer_conformance.fixtures", reason="needs infer-conformance (family fixtures)")
reference = pytest.importorskip("infer_conformance.reference", reason="needs infer-conformance (the reference)")

#: Largest |logit - reference| measured over the families: fp32 3.8e-6, fp16 2.1e-2.
ATOL = {"fp32": 1e-5, "fp16": 5e-2}
BUILT = sorted(fixtures.FAMILY_FIXTURES)
PROMPT = [int(t) for t in np.random.default_rng(0).integers(3, 384, 30)]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("family", BUILT)
def test_family_graph_folds_to_the_reference_past_the_window(
    family: str,
    dtype: str,
    fold_bundle: Callable[..., CoreMLModel],
    greedy_pairs: Callable[..., Pairs],
) -> None:
    pytest.importorskip("coremltools")
    bundle = Bundle.open(fixtures.FAMILY_FIXTURES[family])
    model = fold_bundle(bundle, dtype=dtype, prefill_chunk=8)
    pairs = greedy_pairs(model, reference.ReferenceModel(bundle), PROMPT, 4)
    for step, (got, want) in enumerate(pairs):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL[dtype], err_msg=f"{family} step {step}")


def test_a_feature_the_builder_does_not_write_is_refused_at_load_on_every_platform(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from infer_backend_coreml import builder

    monkeypatch.setattr(builder, "SUPPORTED_FEATURES", builder.SUPPORTED_FEATURES - {"attention_softcap"})
    bundle = Bundle.open(fixtures.FAMILY_FIXTURES["gemma2"])
    spec = LoadSpec(backend="coreml", ref=str(bundle.path), path=bundle.path, bundle=bundle)
    with pytest.raises(UnsupportedModelError, match=r"coreml backend cannot run .*attention_softcap") as caught:
        plugin.infer_load(spec, {})
    assert "onnx" in str(caught.value) and caught.value.path == bundle.path
    pytest.importorskip("coremltools")
    with pytest.raises(UnsupportedModelError, match="attention_softcap"):
        builder.DecoderGraph(bundle.spec, {}, BuildConfig(dtype="fp32", context_length=64, prefill_chunk=16))


@pytest.mark.slow
def test_gemma3_converts_to_a_package_with_its_runtime_ops(tmp_path: Path) -> None:
    pytest.importorskip("coremltools")
    from infer_backend_coreml.builder import build_package

    bundle = Bundle.open(fixtures.FAMILY_FIXTURES["gemma3"])
    config = BuildConfig(dtype="fp16", context_length=32, prefill_chunk=8)
    path = build_package(bundle.spec, bundle.weights, config, tmp_path / "model.mlpackage")
    assert (path / "Manifest.json").is_file()
