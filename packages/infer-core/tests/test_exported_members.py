"""The public API is a tested contract: ``infer.__all__`` is complete and every name resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import infer

pytestmark = pytest.mark.unit


def test_every_public_name_is_exported_and_resolves():
    for name in infer.__all__:
        assert getattr(infer, name) is not None, name


def test_every_public_class_of_the_api_modules_is_exported_by_infer():
    import infer.contract
    import infer.errors
    import infer.model
    import infer.results
    import infer.sampling

    for module in (infer.errors, infer.contract, infer.results, infer.model, infer.sampling):
        for name in module.__all__:
            if not isinstance(getattr(module, name), type) or name in {"DefaultSampler"}:
                continue
            assert name in infer.__all__, f"{module.__name__}.{name} is public but not exported by infer"


def test_the_documented_api_names_are_exported():
    expected = {
        "load",
        "Model",
        "SamplingParams",
        "Completion",
        "TokenEvent",
        "TokenStream",
        "AsyncTokenStream",
        "hookimpl",
        "hookspec",
        "CONTRACT_VERSION",
        "BackendInfo",
        "LoadSpec",
        "Batch",
        "KVCache",
        "ModelHandle",
        "InferError",
        "DeadlineExceededError",
    }
    assert expected <= set(infer.__all__)


def test_importing_infer_does_not_import_numpy_or_backends():
    heavy = "('numpy', 'onnxruntime', 'coremltools', 'tokenizers')"
    code = f"import sys, infer; print(','.join(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_an_unknown_attribute_raises_attribute_error():
    import pytest

    with pytest.raises(AttributeError):
        infer.no_such_name  # noqa: B018
