"""KV reuse through the HTTP API: cached prompt tokens in usage and /metrics, n choices sharing one
prefill, and speculative decoding chosen by the server or per request."""

from __future__ import annotations

import json

import pytest
from broken_backends import PATTERN, EchoModel, loaded_variant
from serve_support import sse_data

import infer
from infer_backend_fake import FakeModel
from infer_conformance.probes import installed

pytest.importorskip("starlette", reason="the server needs the serve extra")

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

SYSTEM = list(range(40, 140))  # a 100-token prefix shared by the prompts below
GREEDY = {"model": "fake", "temperature": 0, "max_tokens": 8, "ignore_eos": True}
CHAT_SYSTEM = {"role": "system", "content": "You answer in one short sentence and never more. " * 4}


class PrefillCounter:
    """Counts the tokens each prefill call carries."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    @infer.hookimpl(wrapper=True)
    def infer_prefill(self, model, batch):
        self.calls.append(sum(len(t) for t in batch.tokens))
        return (yield)


class VerifyCounter:
    """Counts all-position prefills (speculative verification steps)."""

    def __init__(self) -> None:
        self.calls = 0

    @infer.hookimpl(wrapper=True)
    def infer_prefill_all(self, model, batch):
        self.calls += 1
        return (yield)


@pytest.fixture
def cached(make_model):
    return make_model(prefix_cache=True)


async def test_completions_usage_reports_the_prompt_tokens_taken_from_the_prefix_cache(client_for, cached):
    c = client_for(cached)
    first = (await c.post("/v1/completions", json=GREEDY | {"prompt": [*SYSTEM, 1, 2]})).json()
    second = (await c.post("/v1/completions", json=GREEDY | {"prompt": [*SYSTEM, 3]})).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": len(SYSTEM)}
    assert second["usage"]["prompt_tokens"] == len(SYSTEM) + 1


async def test_the_same_tokens_come_back_with_and_without_the_prefix_cache(client_for, cached, fake_model):
    with_cache, without = client_for(cached), client_for(fake_model)
    body = GREEDY | {"prompt": [*SYSTEM, 5], "max_tokens": 24}
    await with_cache.post("/v1/completions", json=GREEDY | {"prompt": [*SYSTEM, 4]})
    hit = (await with_cache.post("/v1/completions", json=body)).json()
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == len(SYSTEM)
    assert hit["choices"][0]["text"] == (await without.post("/v1/completions", json=body)).json()["choices"][0]["text"]


async def test_a_chats_next_turn_reports_its_cached_tokens_streamed_and_not(client_for, cached):
    c = client_for(cached)
    turn = [CHAT_SYSTEM, {"role": "user", "content": "hello"}]
    first = (await c.post("/v1/chat/completions", json=GREEDY | {"messages": turn})).json()
    turn += [first["choices"][0]["message"], {"role": "user", "content": "and then?"}]
    body = GREEDY | {"messages": turn, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_data((await c.post("/v1/chat/completions", json=body)).text)
    usage = events[-2]["usage"]  # the usage chunk, before [DONE]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 4
    assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


async def test_responses_usage_reports_cached_input_tokens(client_for, cached):
    c = client_for(cached)
    body = {"model": "fake", "instructions": CHAT_SYSTEM["content"], "temperature": 0, "max_output_tokens": 4}
    await c.post("/v1/responses", json=body | {"input": "first"})
    usage = (await c.post("/v1/responses", json=body | {"input": "second"})).json()["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] >= 16
    assert usage["input_tokens_details"]["cached_tokens"] < usage["input_tokens"]


async def test_metrics_report_prefix_cache_lookups_hits_and_cached_tokens(client_for, cached):
    c = client_for(cached)
    for tail in (1, 2, 3):
        await c.post("/v1/completions", json=GREEDY | {"prompt": [*SYSTEM, tail]})
    text = (await c.get("/metrics")).text
    assert "infer_prefix_cache_lookups_total 3.0" in text
    assert "infer_prefix_cache_hits_total 2.0" in text
    assert f"infer_prefix_cache_cached_tokens_total {2.0 * len(SYSTEM)}" in text
    assert f"infer_prefix_cache_hit_rate {2 / 3}" in text


async def test_metrics_leave_out_the_prefix_cache_when_it_is_off(client, fake_model):
    await client.post("/v1/completions", json=GREEDY | {"prompt": [*SYSTEM, 1]})
    assert "infer_prefix_cache" not in (await client.get("/metrics")).text


async def test_four_choices_prefill_their_prompt_once(client):
    body = GREEDY | {"prompt": [*SYSTEM, 9], "n": 4, "temperature": 0.9, "seed": 5}
    with installed(PrefillCounter()) as counter:
        r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert counter.calls == [len(SYSTEM) + 1]
    answer = r.json()
    assert len(answer["choices"]) == 4
    assert answer["usage"]["prompt_tokens"] == len(SYSTEM) + 1  # counted once, as before
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # nothing came from earlier requests


async def test_forked_choices_give_the_text_of_the_same_seeded_requests_sent_alone(client):
    body = GREEDY | {"prompt": [*SYSTEM, 9], "temperature": 0.9, "max_tokens": 16}
    together = (await client.post("/v1/completions", json=body | {"n": 3, "seed": 11})).json()
    alone = [(await client.post("/v1/completions", json=body | {"seed": 11 + j})).json() for j in range(3)]
    assert [c["text"] for c in together["choices"]] == [a["choices"][0]["text"] for a in alone]


async def test_chat_choices_share_the_prompt_and_each_stream_its_own_text(client):
    body = GREEDY | {"messages": [CHAT_SYSTEM, {"role": "user", "content": "hi"}], "n": 2, "stream": True}
    with installed(PrefillCounter()) as counter:
        events = sse_data((await client.post("/v1/chat/completions", json=body | {"temperature": 1, "seed": 3})).text)
    assert len(counter.calls) == 1
    indexes = {c["index"] for e in events if isinstance(e, dict) for c in e["choices"]}
    assert indexes == {0, 1}


@pytest.fixture
def echo_model():
    """A fake that continues a repeating text (prompt lookup drafts hit), its server default ``off``."""
    with loaded_variant("echo-serve", EchoModel, load={"speculative": "off"}) as model:
        yield model


ECHO = GREEDY | {"prompt": PATTERN * 4 + PATTERN[:3], "max_tokens": 24}


async def test_a_request_may_turn_speculation_on_where_the_server_leaves_it_off(client_for, echo_model):
    c = client_for(echo_model)
    with installed(VerifyCounter()) as plain:
        off = (await c.post("/v1/completions", json=ECHO)).json()
    with installed(VerifyCounter()) as drafted:
        on = (await c.post("/v1/completions", json=ECHO | {"speculative": "ngram"})).json()
    assert plain.calls == 0 and drafted.calls > 0
    assert on["choices"][0]["text"] == off["choices"][0]["text"]


async def test_a_request_may_turn_speculation_off(client_for, echo_model):
    echo_model.speculative = True  # as `infer serve --speculative ngram` loads it
    c = client_for(echo_model)
    with installed(VerifyCounter()) as counter:
        assert (await c.post("/v1/completions", json=ECHO | {"speculative": "off"})).status_code == 200
    assert counter.calls == 0
    with installed(VerifyCounter()) as counter:
        assert (await c.post("/v1/completions", json=ECHO)).status_code == 200
    assert counter.calls > 0


async def test_ngram_on_a_backend_that_cannot_verify_is_a_400_naming_the_field(client_for):
    gone = frozenset({infer.Capability.ALL_LOGITS})
    with loaded_variant("fake-noverify", FakeModel, remove_capabilities=gone) as model:
        r = await client_for(model).post("/v1/completions", json=GREEDY | {"prompt": "x", "speculative": "ngram"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "speculative"
    assert "all_logits" in r.json()["error"]["message"]


@pytest.mark.parametrize("value", ["fast", 3, True])
async def test_an_unknown_speculative_value_is_a_400_naming_the_field(client, value):
    r = await client.post("/v1/completions", json=GREEDY | {"prompt": "x", "speculative": value})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "speculative"


async def test_responses_take_the_speculative_field_too(client):
    body = {"model": "fake", "input": "x", "max_output_tokens": 4, "speculative": "sometimes"}
    r = await client.post("/v1/responses", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculative"
    assert (await client.post("/v1/responses", json=body | {"speculative": "off"})).status_code == 200


def test_the_serve_defaults_restated_for_help_equal_the_cores():
    from infer.prefix_cache import DEFAULT_BUDGET
    from infer.serve.cli import DEFAULT_PREFIX_CACHE_MIB, SPECULATIVE_MODES
    from infer.speculative import MODES

    assert DEFAULT_PREFIX_CACHE_MIB * 2**20 == DEFAULT_BUDGET
    assert SPECULATIVE_MODES == MODES


def test_usage_details_are_json_numbers():
    from infer.results import Usage
    from infer.serve.formats import usage_body

    body = json.loads(json.dumps(usage_body(Usage(10, 2, cached_tokens=8))))
    assert body == {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
