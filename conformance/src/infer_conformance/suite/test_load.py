"""The load contract: what a backend accepts, refuses, and reports about what it loaded."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

import infer
from infer_conformance.plugin import SuiteConfig

if TYPE_CHECKING:
    from infer.bundle import Bundle

pytestmark = [pytest.mark.conformance, pytest.mark.certifies("contract:load")]


def _load(suite: SuiteConfig, ref: str | None = None, **overrides: Any) -> infer.Model:
    settings: dict[str, Any] = {"device": suite.device, "dtype": suite.dtype, **overrides}
    return infer.load(ref or suite.model, backend=suite.backend, **settings, **suite.options)


def test_a_name_no_backend_knows_is_declined(suite: SuiteConfig) -> None:
    with pytest.raises(infer.ModelNotFoundError):
        _load(suite, "no-such-model-for-any-backend-7f3a")


@pytest.mark.parametrize("kind", ["empty folder", "text file"])
def test_a_path_the_backend_cannot_open_is_declined(suite: SuiteConfig, tmp_path: Path, kind: str) -> None:
    ref = tmp_path
    if kind == "text file":
        ref = tmp_path / "notes.txt"
        ref.write_text("not a model\n")
    with pytest.raises(infer.UnsupportedModelError):
        _load(suite, str(ref))


@pytest.mark.parametrize("parameter", ["dtype", "device"])
def test_an_unknown_dtype_or_device_is_refused_by_name(suite: SuiteConfig, parameter: str) -> None:
    value = {"dtype": "fp7", "device": "quantum0"}[parameter]
    with pytest.raises(infer.InvalidParameterError) as raised:
        _load(suite, **{parameter: value})
    assert raised.value.parameter == parameter
    assert value in str(raised.value)


def _works(model: infer.Model) -> None:
    seq = model.new_sequence(4)
    logits = model.run_prefill([seq], [[1, 2, 3]])
    seq.release()
    assert logits.shape == (1, model.vocab_size) and np.isfinite(logits).all()


def test_every_declared_dtype_loads_and_reports_itself(suite: SuiteConfig) -> None:
    info = suite.info()
    for dtype in info.dtypes:
        with _load(suite, dtype=dtype) as model:
            assert model.dtype == dtype, f"asked for dtype {dtype!r}, the model reports {model.dtype!r}"
            _works(model)


def test_every_declared_device_loads_and_reports_itself_or_says_it_is_absent(suite: SuiteConfig) -> None:
    info = suite.info()
    loaded = []
    for device in info.devices:
        try:
            model = _load(suite, device=device)
        except infer.BackendUnavailableError as absent:
            assert str(absent), f"device {device!r} refused without saying why"
            continue
        with model:
            assert model.device == device, f"asked for device {device!r}, the model reports {model.device!r}"
            _works(model)
        loaded.append(device)
    assert loaded, f"none of the declared devices {info.devices} loads here"


def _bundle(suite: SuiteConfig) -> Bundle:
    from infer.bundle import Bundle, is_bundle
    from infer.resolve import resolve_model

    path = resolve_model(suite.model) or Path(suite.model)
    if not is_bundle(path):
        pytest.skip("the model under test is not a bundle folder: no config to compare with")
    return Bundle.open(path)


def test_vocab_eos_ids_and_context_length_equal_the_bundles(suite: SuiteConfig, model: infer.Model) -> None:
    bundle = _bundle(suite)
    assert model.vocab_size == bundle.spec.vocab_size
    assert model.eos_token_ids == frozenset(bundle.eos_token_ids)
    assert model.context_length == bundle.spec.max_position_embeddings
