"""Speculative decoding by prompt lookup: the same tokens as plain decoding, in fewer backend steps."""

from __future__ import annotations

import numpy as np
import pytest
from broken_backends import PATTERN, PERIOD, EchoModel, StepCounter, loaded_variant, variant

import infer
from infer.plugins import get_registry
from infer.speculative import MAX_DRAFT, NgramDrafter
from infer_backend_fake import FakeModel
from infer_conformance.probes import installed

pytestmark = pytest.mark.unit

PROMPT = PATTERN * 4 + PATTERN[:3]


@pytest.fixture(scope="module")
def echo():
    with loaded_variant("echo", EchoModel, load={"speculative": "ngram"}) as model:
        yield model


def test_greedy_speculation_gives_the_same_tokens_in_fewer_backend_steps(echo):
    with installed(StepCounter()) as counter:
        fast = echo.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True)
    steps = counter.steps["decode"] + counter.steps["verify"]
    plain = echo.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True, speculative="off")
    assert fast.token_ids == plain.token_ids
    assert counter.steps["verify"] > 0
    assert steps <= len(fast.token_ids) // 2  # several tokens per step


def test_a_seeded_sampled_request_gives_the_same_tokens_with_or_without_speculation(echo):
    for seed in range(5):
        params = {"max_tokens": 30, "temperature": 1.0, "seed": seed, "ignore_eos": True}
        fast = echo.generate(PROMPT, **params)
        assert fast.token_ids == echo.generate(PROMPT, **params, speculative="off").token_ids


def _echo_rate(model, seeds, **params):
    """Share of generated tokens that continue the pattern (what drafts propose), over ``seeds``."""
    hits = total = 0
    for seed in seeds:
        out = model.generate(PROMPT, max_tokens=12, temperature=5.0, ignore_eos=True, seed=seed, **params)
        context = [*PROMPT, *out.token_ids]
        hits += sum(context[len(PROMPT) + i] == context[len(PROMPT) + i - PERIOD] for i in range(12))
        total += 12
    return hits / total, total


def test_speculative_sampling_draws_from_the_same_distribution_as_plain_sampling(echo):
    # different seeds on each side: a statistical check, not a replay of the same random draws
    fast, n = _echo_rate(echo, range(150))
    plain, _ = _echo_rate(echo, range(150, 300), speculative="off")
    assert 0.1 < plain < 0.9  # both outcomes are common: acceptance and rejection are both exercised
    spread = 4 * (2 * plain * (1 - plain) / n) ** 0.5  # four standard errors of the difference
    assert abs(fast - plain) < spread, f"pattern rate {fast:.3f} speculating vs {plain:.3f} plain"


def test_max_tokens_and_stop_tokens_hold_inside_an_accepted_draft(echo):
    out = echo.generate(PROMPT, max_tokens=9, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 9
    assert out.finish_reason == "length"
    stop_at = PATTERN[5]
    stopped = echo.generate(PROMPT, max_tokens=40, temperature=0, stop_token_ids=[stop_at])
    assert stopped.token_ids[-1] == stop_at
    assert stop_at not in stopped.token_ids[:-1]
    assert stopped.finish_reason == "stop"


def test_a_stream_speculating_gives_the_same_events_as_generate(echo):
    with echo.stream(PROMPT, max_tokens=30, temperature=0, ignore_eos=True) as stream:
        streamed = tuple(e.token_id for e in stream)
    assert streamed == echo.generate(PROMPT, max_tokens=30, temperature=0, ignore_eos=True).token_ids


def test_open_ended_text_stops_drafting_after_repeated_misses():
    drafter = NgramDrafter()
    context = np.array([1, 2, 3, 9, 1, 2, 3], np.int32)
    assert drafter.draft(context, 8).tolist() == [9, 1, 2, 3]
    drafter.update(4, 0)
    drafter.update(1, 0)
    assert drafter.draft(context, 8).size == 0  # cooling down
    assert drafter.proposed == 5
    assert drafter.accepted == 0


def test_accepted_drafts_grow_k_and_partial_ones_shrink_it():
    drafter = NgramDrafter()
    start = drafter.k
    drafter.update(start, start)
    assert drafter.k > start
    drafter.update(drafter.k, 1)
    assert drafter.k == 2


def test_speculation_on_a_backend_without_the_capabilities_is_refused_or_skipped(fake):
    registry = get_registry()

    backend = registry.register_backend(
        variant("plain", FakeModel, remove_capabilities={infer.Capability.ALL_LOGITS}), name="plain"
    )
    try:
        with pytest.raises(infer.InvalidParameterError, match="all_logits"):
            infer.load("fake", backend="plain", speculative="ngram")
        model = infer.load("fake", backend="plain", speculative="auto")
        assert model.speculative is False
        with pytest.raises(infer.InvalidParameterError, match="speculative"):
            model.generate([1, 2, 3], max_tokens=2, speculative="ngram")
        model.close()
    finally:
        registry.unregister(backend.plugin)


@pytest.mark.parametrize("value", ["fast", True, None])
def test_a_bad_speculative_value_is_refused(fake, value):
    with pytest.raises(infer.InvalidParameterError, match="speculative"):
        fake.generate([1, 2, 3], max_tokens=2, speculative=value)


def test_auto_does_not_speculate_where_verification_logits_may_differ_from_decode_logits():
    registry = get_registry()
    backend = registry.register_backend(variant("loose", FakeModel, logits_atol=1.5), name="loose")
    try:
        auto = infer.load("fake", backend="loose", speculative="auto")
        assert auto.speculative is False  # int4-like tolerance: a near-tie could flip a token
        auto.close()
        asked = infer.load("fake", backend="loose", speculative="ngram")
        assert asked.speculative is True  # asked for by name: the user accepts the tolerance
        asked.close()
    finally:
        registry.unregister(backend.plugin)


def test_requests_decoding_together_do_not_draft_and_keep_their_tokens(echo):
    greedy = infer.SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    with installed(StepCounter()) as counter:
        together = [s.result().token_ids for s in echo.stream_choices(PROMPT, params=[greedy, greedy])]
    assert counter.steps["verify"] == 0 and counter.steps["decode"] > 0
    assert together == [echo.generate(PROMPT, params=greedy).token_ids] * 2


def test_a_match_reaching_far_back_is_drafted_at_its_length_from_its_own_occurrence():
    passage = list(range(10, 40))
    # [27, 28, 29] occurs twice before the tail; only the first is preceded by the tail's own
    # history (the passage), so its continuation is copied, as far as the match is long.
    context = np.array([*passage, 5, 99, 27, 28, 29, 7, 6, *passage[:20]], np.int32)
    draft = NgramDrafter().draft(context, 32)
    assert draft.tolist() == [*passage[20:30], 5, 99, 27, 28, 29, 7]  # 16 = MAX_DRAFT tokens
    assert len(draft) == MAX_DRAFT


def test_a_short_match_still_drafts_k_tokens():
    drafter = NgramDrafter()
    context = np.array([1, 2, 3, 9, 8, 7, 6, 5, 4, 1, 2, 3], np.int32)
    assert drafter.draft(context, 32).tolist() == [9, 8, 7, 6][: drafter.k]
