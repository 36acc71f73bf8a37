"""Load on a real server process: 200 concurrent streams on the fake backend.

Every stream must complete without error, give exactly what the same seeded request gives
when it runs alone, and leave the server's memory where it was. Bounded: 2 x 200 requests of
24 tokens on loopback, well under a minute.
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
from serve_support import ServerProcess, httpx, sse_data, stream_text

pytestmark = [pytest.mark.stress, pytest.mark.slow]

CONCURRENT = 200
DISTINCT = 20  # distinct (endpoint, prompt, seed) requests; each runs CONCURRENT / DISTINCT times at once


def request_body(i: int) -> tuple[str, dict]:
    """The i-th distinct request: chat or completions, its own prompt and seed, sampled (not greedy)."""
    common = {"model": "fake", "max_tokens": 24, "temperature": 0.9, "seed": 1000 + i, "stream": True}
    if i % 2:
        return "/v1/chat/completions", common | {"messages": [{"role": "user", "content": f"question {i}"}]}
    return "/v1/completions", common | {"prompt": f"prompt number {i}: "}


async def run_stream(client, path: str, body: dict) -> str:
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        text = (await r.aread()).decode()
    events = sse_data(text)
    assert events[-1] == "[DONE]", text[-300:]
    assert not any(isinstance(e, dict) and "error" in e for e in events), text[-300:]
    assert [e for e in events if isinstance(e, dict)][-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return stream_text(events)


async def load_round(server: ServerProcess, expected: list[str]) -> int:
    """Run CONCURRENT streams at once; check each; return the most requests seen running together."""
    limits = httpx.Limits(max_connections=CONCURRENT + 10, max_keepalive_connections=CONCURRENT + 10)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:
        peak = 0
        done = asyncio.Event()

        async def watch() -> None:
            # A client of its own: from the shared pool it could pick a connection a stream left idle
            # past the server's keep-alive (5 s, reached on a loaded machine), which the server closes
            # as the request goes out. Its one connection, polled every 50 ms, never idles that long.
            nonlocal peak
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as health_client:
                while not done.is_set():
                    health = (await health_client.get("/health")).json()
                    peak = max(peak, health["running"])
                    await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch())
        jobs = [run_stream(client, *request_body(n % DISTINCT)) for n in range(CONCURRENT)]
        texts = await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)
        done.set()
        await watcher
    for n, text in enumerate(texts):
        assert text == expected[n % DISTINCT], f"request {n} differs from the same request run alone"
    return peak


async def alone(server: ServerProcess) -> list[str]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        return [await run_stream(client, *request_body(i)) for i in range(DISTINCT)]


def settled_rss(server: ServerProcess) -> int:
    gc.collect()
    time.sleep(0.5)
    return server.rss()


def test_200_concurrent_streams_complete_match_solo_runs_and_leave_memory_at_baseline():
    with ServerProcess("-o", "latency=0.005", "--max-concurrency", "256", "--max-queue", "256") as server:
        expected = asyncio.run(alone(server))
        baseline = settled_rss(server)
        peak = asyncio.run(load_round(server, expected))
        after_first = settled_rss(server)
        asyncio.run(load_round(server, expected))
        after_second = settled_rss(server)
        health = httpx.get(server.url + "/health", timeout=5).json()
        metrics = httpx.get(server.url + "/metrics", timeout=5).text
    mib = 1024 * 1024
    assert peak >= CONCURRENT // 2, f"only {peak} requests ever ran together"
    assert health["running"] == health["queued"] == health["active_sequences"] == 0
    completions = DISTINCT // 2 + CONCURRENT  # solo runs + two rounds, half of them completions
    assert f'infer_requests_total{{endpoint="/v1/completions",status="200"}} {completions:.1f}' in metrics
    assert 'status="5' not in metrics and 'status="499"' not in metrics
    # The first round may warm caches and thread pools; a second round must not grow it again.
    assert after_first - baseline < 64 * mib, f"RSS grew {(after_first - baseline) / mib:.1f} MiB under load"
    assert after_second - after_first < 8 * mib, f"RSS grew {(after_second - after_first) / mib:.1f} MiB more"
