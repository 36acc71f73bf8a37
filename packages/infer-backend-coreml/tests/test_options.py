"""Load options: defaults, and a typed error naming every bad one."""

from __future__ import annotations

from typing import Any

import pytest

from infer.bundle import Bundle
from infer.contract import LoadSpec
from infer.errors import InvalidParameterError
from infer_backend_coreml.options import parse_options

pytestmark = pytest.mark.unit


def _parse(bundle: Bundle, options: dict[str, Any] | None = None, **spec: Any) -> Any:
    load = LoadSpec(backend="coreml", ref="tiny", path=bundle.path, bundle=bundle, **spec)
    return parse_options(load, options or {}, bundle.spec)


def test_defaults_are_fp16_all_compute_units_and_64_token_chunks(tiny_bundle: Bundle) -> None:
    config = _parse(tiny_bundle)
    assert config.build.dtype == "fp16"
    assert config.compute_units == "all"
    assert config.build.prefill_chunk == 64
    assert config.build.context_length == min(2048, tiny_bundle.spec.max_position_embeddings)


@pytest.mark.parametrize(("device", "units"), [("ane", "cpu_and_ne"), ("gpu", "cpu_and_gpu"), ("cpu", "cpu_only")])
def test_device_picks_the_matching_compute_units(tiny_bundle: Bundle, device: str, units: str) -> None:
    config = _parse(tiny_bundle, device=device)
    assert (config.compute_units, config.device) == (units, device)


def test_compute_units_option_sets_the_device(tiny_bundle: Bundle) -> None:
    assert _parse(tiny_bundle, {"compute_units": "cpu_and_ne"}).device == "ane"


def test_context_length_and_chunk_come_from_options_or_the_load_spec(tiny_bundle: Bundle) -> None:
    assert _parse(tiny_bundle, {"context_length": 100, "prefill_chunk": 16}).build.state_length == 116
    assert _parse(tiny_bundle, context_length=50).build.context_length == 50


@pytest.mark.parametrize(
    ("options", "spec", "parameter"),
    [
        ({"threads": 2}, {}, "options"),
        ({}, {"dtype": "bf16"}, "dtype"),
        ({}, {"device": "cuda"}, "device"),
        ({"compute_units": "npu"}, {}, "compute_units"),
        ({"compute_units": "cpu_only"}, {"device": "ane"}, "compute_units"),
        ({"context_length": 0}, {}, "context_length"),
        ({"context_length": "long"}, {}, "context_length"),
        ({"context_length": 10**6}, {}, "context_length"),
        ({"context_length": 64}, {"context_length": 32}, "context_length"),
        ({"prefill_chunk": 0}, {}, "prefill_chunk"),
        ({"context_length": 16, "prefill_chunk": 32}, {}, "prefill_chunk"),
        ({"cache_dir": 3}, {}, "cache_dir"),
    ],
)
def test_bad_options_raise_invalid_parameter_naming_it(
    tiny_bundle: Bundle, options: dict[str, Any], spec: dict[str, Any], parameter: str
) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        _parse(tiny_bundle, options, **spec)
    assert caught.value.parameter == parameter
