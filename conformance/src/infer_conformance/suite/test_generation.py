"""Generation through the engine: determinism, seeds, stop rules."""

from __future__ import annotations

from typing import Any

import pytest

import infer
from infer_conformance.plugin import SuiteConfig

pytestmark = pytest.mark.conformance

PROMPT = [5, 17, 42, 8, 99, 3, 61]


def test_greedy_generation_is_deterministic(model: infer.Model) -> None:
    first = model.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
    second = model.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
    assert first.token_ids == second.token_ids
    assert len(first.token_ids) == 24


def test_greedy_follows_the_argmax_of_the_backend_logits(model: infer.Model) -> None:
    import numpy as np

    completion = model.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
    seq = model.new_sequence(len(PROMPT) + 4)
    logits = model.run_prefill([seq], [PROMPT])
    expected = []
    for _ in range(4):
        token = int(np.argmax(logits[0]))
        expected.append(token)
        logits = model.run_decode([seq], [token])
    seq.release()
    assert list(completion.token_ids) == expected


def test_the_same_seed_gives_the_same_tokens(model: infer.Model) -> None:
    kwargs: dict[str, Any] = dict(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    assert model.generate(PROMPT, **kwargs).token_ids == model.generate(PROMPT, **kwargs).token_ids


def test_different_seeds_give_different_samples(model: infer.Model) -> None:
    outs = {model.generate(PROMPT, max_tokens=24, temperature=1.5, seed=s, ignore_eos=True).token_ids for s in range(4)}
    assert len(outs) > 1


def test_a_seeded_request_is_unaffected_by_concurrent_requests(model: infer.Model) -> None:
    kwargs: dict[str, Any] = dict(max_tokens=20, temperature=1.0, seed=77, ignore_eos=True)
    alone = model.generate(PROMPT, **kwargs).token_ids
    others = [model.stream(PROMPT[::-1], max_tokens=20, temperature=1.0, seed=s, ignore_eos=True) for s in range(6)]
    together = model.generate(PROMPT, **kwargs).token_ids
    for other in others:
        other.result()
    assert together == alone


def test_max_tokens_ends_generation_with_finish_reason_length(model: infer.Model) -> None:
    completion = model.generate(PROMPT, max_tokens=3, temperature=0, ignore_eos=True)
    assert completion.finish_reason == "length"
    assert completion.usage.completion_tokens == 3
    assert completion.usage.prompt_tokens == len(PROMPT)


def test_an_end_of_sequence_token_ends_generation_with_finish_reason_stop(model: infer.Model) -> None:
    if not model.eos_token_ids:
        pytest.skip("the model declares no end-of-sequence token")
    eos = min(model.eos_token_ids)
    completion = model.generate(PROMPT, max_tokens=10, temperature=0, logit_bias={eos: 100.0})
    assert completion.finish_reason == "stop"
    assert completion.token_ids == (eos,)


def test_a_stop_string_is_cut_from_the_output(model: infer.Model) -> None:
    full = model.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True)
    text = full.text
    if len(text) < 6:
        pytest.skip("the greedy output is too short to choose a stop string from")
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = model.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert stop not in cut.text


def test_streamed_text_concatenates_to_the_completion_text(model: infer.Model) -> None:
    stream = model.stream(PROMPT, max_tokens=30, temperature=0, ignore_eos=True)
    pieces = [event.text for event in stream]
    assert stream.completion is not None, "a stream read to its end holds its completion"
    assert "".join(pieces) == stream.completion.text
    assert len(pieces) == 30


def test_the_context_length_bounds_generation(suite: SuiteConfig) -> None:
    import infer

    model = infer.load(
        suite.model, backend=suite.backend, device=suite.device, dtype=suite.dtype, context_length=16, **suite.options
    )
    try:
        completion = model.generate(PROMPT, max_tokens=100, temperature=0, ignore_eos=True)
        assert completion.finish_reason == "length"
        assert len(PROMPT) + completion.usage.completion_tokens == 16
    finally:
        model.close()


def test_logprobs_are_reported_per_token_when_asked(model: infer.Model) -> None:
    completion = model.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    assert completion.logprobs is not None and len(completion.logprobs) == 5
    for event in completion.logprobs:
        assert event.logprob is not None and event.logprob <= 0.0
        assert len(event.top_logprobs) == 3
        assert event.top_logprobs[0][0] == event.token_id  # greedy picks the most likely token
