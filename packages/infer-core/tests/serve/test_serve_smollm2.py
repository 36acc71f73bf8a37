"""The server on the real model (SmolLM2-135M-Instruct via the ONNX backend), as a process.

The openai client, unchanged, on both endpoints streaming and not; and 32 concurrent streams
whose outputs equal the same seeded requests run alone (fp32: its batched and single-sequence
kernels give the same logits, so batching cannot change a token).
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
from serve_support import ServerProcess, httpx, sse_data, stream_text

openai = pytest.importorskip("openai", reason="the client tests need the openai package")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "smollm2-135m-instruct"
CONCURRENT = 32


def smollm2_server(*args: str) -> ServerProcess:
    """A SmolLM2 fp32 server on the ONNX backend with ``args``; skip where the backend cannot run."""
    from infer.plugins import get_registry
    from infer.pull import pull

    onnx = get_registry().backends.get("onnx")
    if onnx is None or not onnx.info.available:
        pytest.skip("the ONNX backend is not installed or cannot run here")
    pull(NAME, progress=False)
    return ServerProcess("--dtype", "fp32", *args, model=NAME, backend="onnx")


@pytest.fixture(scope="module")
def server():
    # Without the prefix cache: the memory test counts what requests leave behind, and kept
    # caches are left behind on purpose (up to the cache's budget).
    with smollm2_server("--max-concurrency", str(CONCURRENT), "--no-prefix-cache") as running:
        yield running


def test_openai_client_chats_with_smollm2_streaming_and_not(server):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        whole = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=24)
        chunks = list(
            client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=24, stream=True)
        )
        text = client.completions.create(model=NAME, prompt="The capital of France is", temperature=0, max_tokens=8)
        streamed = list(
            client.completions.create(
                model=NAME, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True
            )
        )
    assert "4" in whole.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert "Paris" in text.choices[0].text
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def request(i: int) -> dict:
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": f"Write one sentence about the number {i}."}],
        "max_tokens": 20,
        "stream": True,
    }
    # Half greedy, half sampled with a seed: both must ignore whatever else shares the batch.
    return body | ({"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": i})


async def run(client, i: int) -> str:
    async with client.stream("POST", "/v1/chat/completions", json=request(i)) as r:
        assert r.status_code == 200
        events = sse_data((await r.aread()).decode())
    assert events[-1] == "[DONE]"
    assert not any(isinstance(e, dict) and "error" in e for e in events)
    return stream_text(events)


async def solo_then_concurrent(server: ServerProcess) -> tuple[list[str], list[str]]:
    limits = httpx.Limits(max_connections=CONCURRENT + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
        solo = [await run(client, i) for i in range(CONCURRENT)]
        together = await asyncio.gather(*(run(client, i) for i in range(CONCURRENT)))
    return solo, list(together)


def test_32_concurrent_streams_equal_solo_runs(server):
    solo, together = asyncio.run(solo_then_concurrent(server))
    assert together == solo
    health = httpx.get(server.url + "/health", timeout=5).json()
    assert health["active_sequences"] == health["running"] == 0
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert 'status="5' not in metrics


def test_memory_returns_to_its_baseline_after_rounds_of_32_streams(server):
    async def round_(streams: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            await asyncio.gather(*(run(client, i) for i in range(streams)))

    asyncio.run(round_(1))  # the model's first-use allocations, before any load
    baseline = settled_rss(server)
    after = []
    for _ in range(4):
        asyncio.run(round_(CONCURRENT))
        after.append(settled_rss(server))
    # One round's KV caches alone (32 sequences of ~60 tokens, 46 KB per token) are ~90 MiB: a
    # leak of what requests hold, or freed caches the allocator keeps, would show in every round.
    # What stays is the runtime's arena for the larger batch shapes (measured ~25-35 MiB).
    worst = max(after) - baseline
    rounds = [a >> 20 for a in after]
    assert worst < 64 * 1024 * 1024, f"RSS {worst / 2**20:.1f} MiB over its baseline (rounds: {rounds} MiB)"


def settled_rss(server: ServerProcess) -> int:
    gc.collect()
    time.sleep(0.5)
    return server.rss()


def test_smollm2_parse_with_a_pydantic_model_returns_a_valid_object(server):
    pydantic = pytest.importorskip("pydantic")
    pytest.importorskip("llguidance", reason="structured output needs llguidance")

    class Answer(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=30)
        country: str = pydantic.Field(max_length=30)

    messages = [{"role": "user", "content": "Name the capital of France and its country, as JSON."}]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        for temperature in (0.0, 0.8):
            reply = client.chat.completions.parse(
                model=NAME, messages=messages, response_format=Answer, temperature=temperature, seed=1, max_tokens=60
            )
            assert isinstance(reply.choices[0].message.parsed, Answer)


def test_smollm2_echo_scores_a_continuation_as_generation_reports_it(server):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs, max_tokens 0."""
    context = "The capital of France is"
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        ids = httpx.post(server.url + "/tokenize", json={"prompt": context}).json()["tokens"]
        step = client.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=1, logprobs=1)
        ((best_text, best_logprob),) = step.choices[0].logprobs.top_logprobs[0].items()
        best_id = httpx.post(server.url + "/tokenize", json={"prompt": best_text, "add_special_tokens": False})
        scored = client.completions.create(
            model=NAME, prompt=[ids + best_id.json()["tokens"][:1], ids], echo=True, logprobs=1, max_tokens=0
        )
    first, second = scored.choices
    assert first.logprobs.token_logprobs[0] is None and len(first.logprobs.tokens) == len(ids) + 1
    # The echo's alternatives after the context are what generating from the context reported.
    ((echo_text, echo_logprob),) = first.logprobs.top_logprobs[len(ids)].items()
    assert echo_text == best_text and echo_logprob == pytest.approx(best_logprob, abs=1e-4)
    assert first.logprobs.token_logprobs[:-1] == pytest.approx(second.logprobs.token_logprobs[: len(ids)], abs=1e-4)
    assert scored.usage.completion_tokens == 0


@pytest.fixture(scope="module")
def cached_server():
    """The server as started by default: prefix cache on."""
    with smollm2_server() as running:
        yield running


def test_smollm2_repeated_chat_is_served_from_the_prefix_cache_with_the_same_text(cached_server):
    server = cached_server
    body = {
        "model": NAME,
        "messages": [
            {"role": "system", "content": "You are a concise assistant who answers in one sentence."},
            {"role": "user", "content": "Name a colour of the sky."},
        ],
        "temperature": 0,
        "max_tokens": 16,
    }
    cold = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    warm = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    prompt = warm["usage"]["prompt_tokens"]
    # whole 16-token blocks of the prompt, all but its last token (fed again for its logits)
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= (prompt - 1) // 16 * 16
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert "infer_prefix_cache_hits_total" in metrics


def test_smollm2_greedy_choices_forked_from_one_prefill_equal_a_single_answer(cached_server):
    server = cached_server
    body = {"model": NAME, "prompt": "The three primary colours are", "temperature": 0, "max_tokens": 12}
    one = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    three = httpx.post(server.url + "/v1/completions", json=body | {"n": 3}, timeout=120).json()
    assert [c["text"] for c in three["choices"]] == [one["choices"][0]["text"]] * 3
