"""Bad input gets a typed error that names the problem, and the model stays usable."""

from __future__ import annotations

from typing import Any

import pytest

import infer
from infer_conformance.plugin import SuiteConfig

pytestmark = pytest.mark.conformance

PROMPT = [5, 17, 42, 8, 99, 3, 61]


@pytest.fixture
def baseline(model: infer.Model) -> tuple[int, ...]:
    return model.generate(PROMPT, max_tokens=6, temperature=0, ignore_eos=True).token_ids


def _still_usable(model: infer.Model, baseline: tuple[int, ...]) -> None:
    assert model.generate(PROMPT, max_tokens=6, temperature=0, ignore_eos=True).token_ids == baseline


@pytest.mark.parametrize("bad", [-1, "vocab", "vocab+100", 2**40])
def test_a_token_id_outside_the_vocabulary_is_refused(
    model: infer.Model, baseline: tuple[int, ...], bad: int | str
) -> None:
    named = {"vocab": model.vocab_size, "vocab+100": model.vocab_size + 100}
    token = named[bad] if isinstance(bad, str) else bad
    with pytest.raises(infer.InvalidTokenError) as raised:
        model.generate([*PROMPT, token], max_tokens=2)
    assert raised.value.position == len(PROMPT)
    assert isinstance(raised.value, ValueError)
    _still_usable(model, baseline)


@pytest.mark.parametrize("prompt", [[], ""])
def test_an_empty_prompt_is_refused(model: infer.Model, baseline: tuple[int, ...], prompt: list[int] | str) -> None:
    with pytest.raises(infer.EmptyPromptError):
        model.generate(prompt, max_tokens=2)
    _still_usable(model, baseline)


def test_a_prompt_beyond_the_context_is_refused(model: infer.Model, baseline: tuple[int, ...]) -> None:
    too_long = (PROMPT * (model.context_length // len(PROMPT) + 2))[: model.context_length + 1]
    with pytest.raises(infer.ContextLengthError) as raised:
        model.generate(too_long, max_tokens=2)
    assert raised.value.context_length == model.context_length
    _still_usable(model, baseline)


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("temperature", -0.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 2.0),
        ("repetition_penalty", 0.0),
        ("max_tokens", 0),
        ("presence_penalty", 5.0),
        ("frequency_penalty", -5.0),
        ("seed", "abc"),
    ],
)
def test_an_invalid_sampling_parameter_is_refused_by_name(
    model: infer.Model, baseline: tuple[int, ...], parameter: str, value: Any
) -> None:
    with pytest.raises(infer.InvalidParameterError) as raised:
        model.generate(PROMPT, **{parameter: value})
    assert raised.value.parameter == parameter
    _still_usable(model, baseline)


def test_a_logit_bias_outside_the_vocabulary_is_refused(model: infer.Model, baseline: tuple[int, ...]) -> None:
    with pytest.raises(infer.InvalidParameterError) as raised:
        model.generate(PROMPT, logit_bias={model.vocab_size + 5: 1.0})
    assert raised.value.parameter == "logit_bias"
    _still_usable(model, baseline)


def test_an_unknown_option_is_refused_by_name(model: infer.Model, baseline: tuple[int, ...]) -> None:
    with pytest.raises(infer.InvalidParameterError) as raised:
        model.generate(PROMPT, temprature=0.5)
    assert raised.value.parameter == "temprature"
    _still_usable(model, baseline)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "soon"])
def test_an_invalid_timeout_is_refused(model: infer.Model, baseline: tuple[int, ...], timeout: Any) -> None:
    with pytest.raises(infer.InvalidParameterError):
        model.generate(PROMPT, timeout=timeout)
    _still_usable(model, baseline)


def test_an_unknown_backend_option_is_refused_at_load(suite: SuiteConfig) -> None:
    with pytest.raises(infer.InvalidParameterError):
        suite.load(no_such_option_for_any_backend=1)
