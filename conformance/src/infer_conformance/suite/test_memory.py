"""Memory stays bounded: released sessions give their memory back."""

from __future__ import annotations

import gc

import pytest

import infer

pytestmark = [pytest.mark.conformance, pytest.mark.slow]

#: Growth allowed after warm-up: allocator slack, not a leak (a leaked 1,000-token session of a
#: real model is several MiB per request, times the requests below).
RSS_BOUND = 48 * 1024 * 1024


def test_rss_stays_bounded_over_1000_generated_tokens_and_released_sessions(model: infer.Model) -> None:
    import psutil

    process = psutil.Process()
    for _ in range(3):
        model.generate([1, 2, 3, 4], max_tokens=50, temperature=0.8, seed=1, ignore_eos=True)
    gc.collect()
    before = process.memory_info().rss
    generated = 0
    for i in range(20):
        completion = model.generate([1 + i, 2, 3, 4], max_tokens=50, temperature=0.8, seed=i, ignore_eos=True)
        generated += completion.usage.completion_tokens
        seqs = [model.new_sequence(64) for _ in range(4)]
        model.run_prefill(seqs, [[1, 2, 3]] * 4)
        for seq in seqs:
            seq.release()
    gc.collect()
    grown = process.memory_info().rss - before
    assert generated == 1000
    assert model.active_requests == 0
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB over 1,000 tokens and 100 released sessions"
