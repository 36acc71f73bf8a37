"""One request boundary: ``Model.prepare`` checks a request once; stream/generate and their twins run it."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

import pytest

import infer
from infer.errors import (
    ContextLengthError,
    EmptyPromptError,
    InvalidParameterError,
    InvalidTokenError,
    ModelClosedError,
    PromptTooLongError,
)
from infer.model import PreparedRequest
from infer.sampling import SamplingParams

pytestmark = pytest.mark.unit

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def small() -> Iterator[infer.Model]:
    """A fake model with a 64-token context."""
    model = infer.load("fake", backend="fake", context_length=64)
    yield model
    model.close()


def test_prepare_gives_the_prompt_ids_the_checked_params_and_the_tokens_left_to_generate(fake):
    prepared = fake.prepare("hello", max_tokens=5, temperature=0.0, timeout=30)
    assert prepared.prompt_ids == tuple(fake.encode("hello"))
    assert (prepared.params.max_tokens, prepared.params.temperature) == (5, 0.0)
    assert (prepared.max_new_tokens, prepared.timeout, prepared.tool_format) == (5, 30, None)


def test_a_prepared_request_generates_what_the_same_arguments_generate(fake):
    arguments: dict[str, Any] = {"max_tokens": 6, "temperature": 0.8, "seed": 7}
    prepared = fake.prepare("hello", **arguments)
    assert fake.generate(prepared).token_ids == fake.generate("hello", **arguments).token_ids
    assert [e.token_id for e in fake.stream(prepared)] == list(fake.generate(prepared).token_ids)


def test_max_new_tokens_is_cut_to_the_room_the_prompt_leaves(small):
    prepared = small.prepare(list(range(60)), max_tokens=None)
    assert prepared.max_new_tokens == 4
    assert small.prepare(list(range(60)), max_tokens=2).max_new_tokens == 2
    with pytest.raises(ContextLengthError):
        small.prepare(list(range(64)))


def test_generate_validates_its_sampling_params_once(fake, validations):
    fake.generate("hello", max_tokens=3, temperature=0.5, seed=1)
    assert validations == {"fields": 1, "token ids": 1}


@pytest.mark.parametrize("way", ["stream", "astream", "generate", "agenerate"])
def test_every_way_to_run_checks_a_request_once_and_a_prepared_one_not_again(fake, validations, way):
    async def run(*args: Any, **kwargs: Any) -> None:
        result = getattr(fake, way)(*args, **kwargs)
        if way == "agenerate":
            await result
        elif way == "astream":
            async for _ in result:
                pass
        elif way == "stream":
            list(result)

    asyncio.run(run("hello", max_tokens=3, temperature=0.5))
    assert validations == {"fields": 1, "token ids": 1}
    prepared = fake.prepare("hello", max_tokens=3, top_k=4)
    validations.clear()
    asyncio.run(run(prepared))
    assert validations == {}


def test_given_params_are_used_as_they_are_and_checked_against_the_vocabulary_once(fake, validations):
    params = SamplingParams(max_tokens=2, logit_bias={3: 1.0})
    validations.clear()
    fake.generate("hello", params=params)
    fake.generate("again", params=params)
    assert validations == {"token ids": 1}


def test_the_four_ways_to_run_take_exactly_the_arguments_of_prepare():
    expected = list(inspect.signature(infer.Model.prepare).parameters.values())
    for way in (infer.Model.stream, infer.Model.astream, infer.Model.generate, infer.Model.agenerate):
        assert list(inspect.signature(way).parameters.values()) == expected, way.__name__
    assert inspect.iscoroutinefunction(infer.Model.agenerate)
    assert not inspect.iscoroutinefunction(infer.Model.astream)


def test_agenerate_raises_a_bad_argument_when_awaited_as_before(fake):
    pending = fake.agenerate("hello", temperature=-1.0)  # no error yet: it is a coroutine
    with pytest.raises(InvalidParameterError) as err:
        asyncio.run(pending)
    assert err.value.parameter == "temperature"


def test_a_prepared_request_runs_alone(fake):
    prepared = fake.prepare("hello", max_tokens=2)
    assert fake.prepare(prepared) is prepared
    with pytest.raises(InvalidParameterError) as err:
        fake.generate(prepared, temperature=0.5)
    assert err.value.parameter == "temperature"
    with pytest.raises(InvalidParameterError) as err:
        fake.stream(prepared, timeout=3)
    assert err.value.parameter == "timeout"


def test_a_request_built_by_hand_is_refused_when_it_does_not_fit_the_model(small):
    with pytest.raises(ContextLengthError):
        small.generate(PreparedRequest(tuple(range(60)), SamplingParams(), max_new_tokens=10))
    with pytest.raises(InvalidTokenError):
        small.generate(PreparedRequest((1, small.vocab_size), SamplingParams(), max_new_tokens=2))
    with pytest.raises(InvalidParameterError) as err:
        small.generate(PreparedRequest((1, 2), SamplingParams(logit_bias={small.vocab_size: 1.0}), max_new_tokens=2))
    assert err.value.parameter == "logit_bias"


def test_a_prepared_request_needs_a_prompt_and_a_valid_timeout():
    with pytest.raises(EmptyPromptError):
        PreparedRequest((), SamplingParams(), max_new_tokens=1)
    prepared = PreparedRequest((1,), SamplingParams(), max_new_tokens=1)
    with pytest.raises(InvalidParameterError) as err:
        dataclasses.replace(prepared, timeout=-1.0)
    assert err.value.parameter == "timeout"


def test_a_prepared_request_with_a_new_timeout_and_seed_runs_with_them(fake):
    prepared = fake.prepare("hello", max_tokens=4, temperature=1.0, seed=1)
    reseeded = dataclasses.replace(prepared, params=prepared.params.replace(seed=2), timeout=60.0)
    assert fake.generate(reseeded).token_ids == fake.generate("hello", max_tokens=4, temperature=1.0, seed=2).token_ids


def test_prepare_refuses_unknown_options_naming_them(fake):
    with pytest.raises(InvalidParameterError) as err:
        fake.prepare("hello", temprature=0.5)
    assert err.value.parameter == "temprature"


def test_max_prompt_bytes_refuses_longer_text_before_tokenizing_it(fake):
    with pytest.raises(PromptTooLongError) as err:
        fake.prepare("x" * 100, max_prompt_bytes=10)
    assert err.value.max_bytes == 10
    with pytest.raises(PromptTooLongError):
        fake.prepare(messages=[{"role": "user", "content": "x" * 100}], max_prompt_bytes=10)
    with pytest.raises(InvalidParameterError) as bad:
        fake.prepare("x", max_prompt_bytes=0)
    assert bad.value.parameter == "max_prompt_bytes"


def test_chat_template_kwargs_reach_the_template_and_must_name_variables(fake):
    plain = fake.prepare(messages=CHAT, chat_template_kwargs={"add_generation_prompt": False}).prompt_ids
    prompted = fake.prepare(messages=CHAT).prompt_ids
    assert len(plain) < len(prompted) and prompted[: len(plain)] == plain
    with pytest.raises(InvalidParameterError) as err:
        fake.prepare(messages=CHAT, chat_template_kwargs=["x"])
    assert err.value.parameter == "chat_template_kwargs"


def test_a_closed_model_refuses_to_prepare_and_to_run(fake):
    prepared = fake.prepare("hello", max_tokens=2)
    fake.close()
    with pytest.raises(ModelClosedError):
        fake.prepare("hello")
    with pytest.raises(ModelClosedError):
        fake.generate(prepared)
