"""Model names clients send (aliases, any name), ``/v1/models`` cards, ``/tokenize``, ``/detokenize``,
``/tokenizer_info``, CORS."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": 1}


async def test_aliases_are_accepted_listed_and_echoed(client_for, fake_model):
    client = client_for(fake_model, model_name="main", aliases=["gpt-4o-mini", "main"])
    r = await client.post("/v1/chat/completions", json=CHAT | {"model": "gpt-4o-mini"})
    assert r.status_code == 200 and r.json()["model"] == "gpt-4o-mini"
    listing = (await client.get("/v1/models")).json()["data"]
    assert [card["id"] for card in listing] == ["main", "gpt-4o-mini"]
    assert (await client.get("/v1/models/gpt-4o-mini")).json()["root"] == "main"
    missing = await client.post("/v1/chat/completions", json=CHAT | {"model": "other"})
    assert missing.status_code == 404 and "'main', 'gpt-4o-mini'" in missing.json()["error"]["message"]


async def test_any_model_name_accepts_every_name_and_answers_with_the_served_one(client_for, fake_model):
    client = client_for(fake_model, model_name="main", any_model_name=True)
    r = await client.post("/v1/completions", json={"model": "text-davinci-003", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "main"
    assert (await client.get("/v1/models/whatever")).json()["id"] == "main"


async def test_model_cards_carry_context_length_backend_and_dtype(client, fake_model):
    (card,) = (await client.get("/v1/models")).json()["data"]
    assert card["context_length"] == card["max_model_len"] == fake_model.context_length
    assert (card["backend"], card["dtype"]) == (fake_model.backend, fake_model.dtype)


async def test_tokenize_text_and_chat_and_detokenize_round_trip(client, fake_model):
    r = await client.post("/tokenize", json={"model": "fake", "prompt": "hello world"})
    body = r.json()
    assert body["tokens"] == fake_model.encode("hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == fake_model.context_length
    plain = (await client.post("/tokenize", json={"prompt": "hello", "add_special_tokens": False})).json()
    assert plain["tokens"] == fake_model.encode("hello", add_special_tokens=False)
    chat = (await client.post("/tokenize", json={"messages": CHAT["messages"]})).json()
    assert chat["tokens"] == fake_model.chat_ids(CHAT["messages"])
    back = await client.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.json()["prompt"] == fake_model.decode(body["tokens"])


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {"model": "other", "tokens": [1]}, "model"),
    ],
)
async def test_bad_tokenizer_requests_are_400s_or_404s_naming_the_field(client, route, body, param):
    r = await client.post(route, json=body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


async def test_tokenize_needs_the_key_when_one_is_set(client_for, fake_model):
    client = client_for(fake_model, api_key="k")
    assert (await client.post("/tokenize", json={"prompt": "x"})).status_code == 401
    ok = await client.post("/tokenize", json={"prompt": "x"}, headers={"authorization": "Bearer k"})
    assert ok.status_code == 200


async def test_tokenizer_info_gives_the_eos_token_template_and_context_behind_the_key(client_for, fake_model):
    client = client_for(fake_model, api_key="k")
    assert (await client.get("/tokenizer_info")).status_code == 401
    info = (await client.get("/tokenizer_info", headers={"authorization": "Bearer k"})).json()
    # what lm-evaluation-harness's remote tokenizer reads: the eos text must tokenize back to its id
    assert fake_model.encode(info["eos_token"], add_special_tokens=False) == [min(fake_model.eos_token_ids)]
    assert info["chat_template"] == fake_model.chat_template
    assert info["model_max_length"] == fake_model.context_length


async def test_cors_answers_preflights_for_the_given_origins_only(client_for, fake_model):
    client = client_for(fake_model, cors_origins=["http://localhost:3000"])
    ask = {
        "origin": "http://localhost:3000",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,authorization",
    }
    preflight = await client.options("/v1/chat/completions", headers=ask)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = await client.options("/v1/chat/completions", headers=ask | {"origin": "https://evil.example"})
    assert other.status_code == 400
    r = await client.post(
        "/v1/chat/completions", json=CHAT | {"model": "fake"}, headers={"origin": "http://localhost:3000"}
    )
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


async def test_without_cors_origins_no_cors_headers_are_sent(client):
    r = await client.post(
        "/v1/chat/completions", json=CHAT | {"model": "fake"}, headers={"origin": "http://localhost:3000"}
    )
    assert "access-control-allow-origin" not in r.headers
