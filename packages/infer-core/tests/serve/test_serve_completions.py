"""``/v1/completions`` as batch clients and evaluation harnesses use it: prompt arrays, echo, suffix, best_of."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
from serve_support import sse_data

from infer.evaluate import prompt_logprobs

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

TEXT = {"model": "fake", "max_tokens": 8, "seed": 4, "temperature": 0.8}


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_prompt_array_answers_one_choice_per_prompt_as_single_requests_would(client, fake_model):
    prompts = ["Once upon", [5, 6, 7], "The end"]
    body = ok(await client.post("/v1/completions", json=TEXT | {"prompt": prompts}))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    singles = [fake_model.generate(p, max_tokens=8, seed=4, temperature=0.8) for p in prompts]
    assert [c["text"] for c in body["choices"]] == [s.text for s in singles]
    assert body["usage"]["prompt_tokens"] == sum(s.usage.prompt_tokens for s in singles)
    assert body["usage"]["completion_tokens"] == sum(s.usage.completion_tokens for s in singles)


async def test_a_streamed_prompt_array_tags_each_chunk_with_its_choice(client, fake_model):
    prompts = ["Once upon", "The end"]
    request = TEXT | {"prompt": prompts, "stream": True, "stream_options": {"include_usage": True}}
    r = await client.post("/v1/completions", json=request)
    events = [e for e in sse_data(r.text) if e != "[DONE]"]
    texts: dict[int, str] = {0: "", 1: ""}
    finished = set()
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
            if choice["finish_reason"] is not None:
                finished.add(choice["index"])
    singles = [fake_model.generate(p, max_tokens=8, seed=4, temperature=0.8).text for p in prompts]
    assert texts == dict(enumerate(singles))
    assert finished == {0, 1}
    assert events[-1]["usage"]["completion_tokens"] == 16


async def test_echo_with_logprobs_and_no_tokens_scores_the_prompt_as_the_python_api_does(client, fake_model):
    ids = fake_model.encode("The capital of France is Paris")
    request = {"model": "fake", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0}
    choice = ok(await client.post("/v1/completions", json=request))["choices"][0]
    expected = prompt_logprobs(fake_model, ids, 1)
    logprobs = choice["logprobs"]
    assert choice["text"] == fake_model.decode(ids) and choice["finish_reason"] == "length"
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx([e.logprob for e in expected[1:]])
    assert len(logprobs["tokens"]) == len(ids)
    # The loglikelihood harnesses sum: the same as scoring each token by generating it.
    for position in (1, len(ids) - 1):
        step = fake_model.generate(ids[:position], max_tokens=1, temperature=0, logprobs=True, top_logprobs=1)
        best_id, best_lp = step.logprobs[0].top_logprobs[0]
        assert expected[position].top_logprobs[0] == (best_id, pytest.approx(best_lp))
    assert all(math.isfinite(x) for x in logprobs["token_logprobs"][1:])


async def test_echo_with_generation_puts_the_prompt_before_the_generated_text(client, fake_model):
    request = TEXT | {"prompt": "Hello there", "echo": True, "logprobs": 0}
    choice = ok(await client.post("/v1/completions", json=request))["choices"][0]
    generated = fake_model.generate("Hello there", max_tokens=8, seed=4, temperature=0.8)
    assert choice["text"] == "Hello there" + generated.text
    prompt_len = len(fake_model.encode("Hello there"))
    assert len(choice["logprobs"]["tokens"]) == prompt_len + generated.usage.completion_tokens
    offsets = choice["logprobs"]["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0


async def test_echo_streams_the_prompt_first(client):
    r = await client.post("/v1/completions", json=TEXT | {"prompt": "Hello there", "echo": True, "stream": True})
    events = [e for e in sse_data(r.text) if e != "[DONE]"]
    assert events[0]["choices"][0]["text"] == "Hello there"


async def test_suffix_without_fill_in_the_middle_tokens_is_a_clear_400(client):
    r = await client.post("/v1/completions", json=TEXT | {"prompt": "def f(", "suffix": "return x"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "suffix" and "fill-in-the-middle" in error["message"]


async def test_best_of_above_one_is_a_clear_400(client):
    r = await client.post("/v1/completions", json=TEXT | {"prompt": "x", "best_of": 3})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "best_of"


async def test_one_bad_prompt_in_an_array_refuses_the_request_naming_it(client):
    r = await client.post("/v1/completions", json=TEXT | {"prompt": ["fine", [1, 10**9]]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"


async def test_n_choices_per_prompt_take_consecutive_seeds_and_count_the_prompt_once(client, fake_model):
    body = ok(await client.post("/v1/completions", json=TEXT | {"prompt": ["Once", "The end"], "n": 2}))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    expected = [
        fake_model.generate(p, max_tokens=8, seed=4 + j, temperature=0.8) for p in ("Once", "The end") for j in range(2)
    ]
    assert [c["text"] for c in body["choices"]] == [e.text for e in expected]
    assert body["usage"]["prompt_tokens"] == expected[0].usage.prompt_tokens + expected[2].usage.prompt_tokens
    assert body["usage"]["completion_tokens"] == sum(e.usage.completion_tokens for e in expected)


async def test_chat_n_choices_whole_and_streamed_agree(client, fake_model):
    request = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "seed": 9, "n": 3}
    whole = ok(await client.post("/v1/chat/completions", json=request))
    texts = [c["message"]["content"] for c in whole["choices"]]
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    expected = fake_model.generate(messages=request["messages"], max_tokens=6, seed=10)
    assert texts[1] == expected.text and whole["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    r = await client.post("/v1/chat/completions", json=request | {"stream": True})
    streamed = {0: "", 1: "", 2: ""}
    for chunk in sse_data(r.text):
        if chunk != "[DONE]":
            for choice in chunk["choices"]:
                streamed[choice["index"]] += choice["delta"].get("content") or ""
    assert list(streamed.values()) == texts
