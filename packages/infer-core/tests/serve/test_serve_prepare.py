"""The server prepares requests through ``Model.prepare``: checked once, in its own words, with its own limits."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")


pytestmark = [pytest.mark.unit, pytest.mark.anyio]

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}
TEXT = {"model": "fake", "prompt": "once upon a time", "max_tokens": 3}


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize("body", [CHAT | {"temperature": 0.5}, TEXT | {"prompt": ["a", "b", "c"], "top_k": 4}])
async def test_a_request_validates_its_sampling_params_once(client, validations, body):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = await client.post(route, json=body)
    assert response.status_code == 200, response.text
    assert validations == {"fields": 1, "token ids": 1}


async def test_the_choices_of_a_prompt_share_its_prepared_request_but_their_seeds(client, fake_model):
    body = TEXT | {"n": 2, "seed": 11, "temperature": 1.0, "max_tokens": 6}
    choices = (await client.post("/v1/completions", json=body)).json()["choices"]
    expected = [fake_model.generate("once upon a time", max_tokens=6, temperature=1.0, seed=s).text for s in (11, 12)]
    assert [c["text"] for c in choices] == expected


async def test_token_ids_off_the_vocabulary_are_a_400_in_the_servers_words(client, fake_model):
    error = error_of(await client.post("/v1/completions", json=TEXT | {"prompt": [1, 10**6]}), 400)
    assert error["message"] == f"token id 1000000 is outside the vocabulary [0, {fake_model.vocab_size})"
    assert (error["param"], error["code"]) == ("prompt", "invalid_value")


async def test_an_empty_prompt_is_a_400_naming_the_prompt_field(client):
    error = error_of(await client.post("/v1/completions", json=TEXT | {"prompt": ""}), 400)
    assert error["message"] == "prompt has no tokens; give non-empty text"
    assert (error["param"], error["code"]) == ("prompt", "invalid_value")


async def test_a_prompt_over_the_context_and_the_servers_limit_names_the_servers_limit(client_for, make_model):
    client = client_for(make_model(context_length=64), max_prompt_tokens=16)
    error = error_of(await client.post("/v1/completions", json=TEXT | {"prompt": list(range(1, 80))}), 400)
    assert error["message"] == "the prompt has 79 tokens; this server accepts at most 16"
    assert error["code"] == "context_length_exceeded"


async def test_a_prompt_over_the_context_says_it_leaves_no_room(client_for, make_model):
    client = client_for(make_model(context_length=64))
    error = error_of(await client.post("/v1/completions", json=TEXT | {"prompt": list(range(1, 80))}), 400)
    assert error["message"] == (
        "the prompt has 79 tokens and leaves no room in the model's context of 64 tokens; shorten it"
    )
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")


async def test_a_core_parameter_error_names_the_requests_own_field(client):
    body = CHAT | {"max_completion_tokens": 0}
    del body["max_tokens"]
    error = error_of(await client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "max_completion_tokens"
