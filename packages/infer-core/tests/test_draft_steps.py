"""Contract 1.3 draft steps: speculation drafting through a cheaper approximation of the model
gives the plain tokens, in fewer model steps, and a failing draft step fails only its request."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from broken_backends import StepCounter, variant

import infer
from infer.contract import usable_capabilities
from infer.plugins import get_registry
from infer.speculative import StepDrafter
from infer_backend_fake import FakeModel
from infer_conformance.probes import installed

pytestmark = pytest.mark.unit

Cap = infer.Capability
PROMPT = "Tell me something new about the sea"


@pytest.fixture(scope="module")
def fake():
    model = infer.load("fake", speculative="ngram")
    yield model
    model.close()


def test_greedy_text_drafted_by_draft_steps_is_the_plain_text_in_fewer_model_steps(fake):
    with installed(StepCounter()) as counter:
        fast = fake.generate(PROMPT, max_tokens=60, temperature=0, ignore_eos=True)
    plain = fake.generate(PROMPT, max_tokens=60, temperature=0, ignore_eos=True, speculative="off")
    assert fast.token_ids == plain.token_ids
    assert counter.steps["draft"] > 0
    # the fake's draft is right on four contexts in five: most tokens come out of verifications
    assert counter.steps["decode"] + counter.steps["verify"] < len(fast.token_ids) // 2


def test_a_seeded_sampled_request_gives_the_same_tokens_with_draft_steps(fake):
    for seed in range(5):
        params = {"max_tokens": 30, "temperature": 0.8, "seed": seed, "ignore_eos": True}
        assert fake.generate(PROMPT, **params).token_ids == fake.generate(PROMPT, **params, speculative="off").token_ids


def test_a_failing_draft_step_fails_its_request_with_a_typed_error_and_the_model_recovers():
    model = infer.load("fake", speculative="ngram", raise_at_step=4)  # step 1 prefill, 2-4 draft steps
    try:
        with installed(StepCounter()) as counter, pytest.raises(infer.BackendError, match="fault injected"):
            model.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
        assert counter.steps["draft"] >= 1
        again = model.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
        plain = model.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True, speculative="off")
        assert again.token_ids == plain.token_ids
    finally:
        model.close()


def test_a_model_without_draft_steps_speculates_by_lookup_only():
    registry = get_registry()
    backend = registry.register_backend(variant("nodraft", FakeModel, remove_capabilities={Cap.DRAFT}), name="nodraft")
    model = infer.load("fake", backend="nodraft", speculative="ngram")
    try:
        assert Cap.DRAFT not in model.capabilities
        with installed(StepCounter()) as counter:
            model.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
        assert counter.steps["draft"] == 0
        with pytest.raises(infer.BackendError, match="'draft' capability"):
            model.run_draft([model.new_sequence(4)], [1])
    finally:
        model.close()
        registry.unregister(backend.plugin)


def test_a_contract_1_2_backend_never_gets_draft_steps_even_if_it_declares_them():
    info = replace(infer.load("fake").info, contract_version="1.2")
    assert Cap.DRAFT in info.capabilities
    assert Cap.DRAFT not in usable_capabilities(info)
    assert Cap.DRAFT in usable_capabilities(replace(info, contract_version="1.3"))


def test_draft_steps_stop_where_the_draft_is_unsure_of_its_next_token():
    sure = np.full(50, -10.0, np.float32)
    sure[7] = 10.0
    assert StepDrafter.choose(sure) == (7, True)
    unsure = np.zeros(50, np.float32)
    unsure[3] = 0.5
    token, go_on = StepDrafter.choose(unsure)
    assert token == 3
    assert not go_on


def test_draft_length_grows_while_drafts_are_accepted_and_shrinks_to_what_was():
    steps = StepDrafter()
    start = steps.k
    steps.update(start, start)
    assert steps.k == start + 2
    steps.update(steps.k, 1)
    assert steps.k == 2
    assert (steps.proposed, steps.accepted) == (2 * start + 2, start + 1)


def test_a_lookup_draft_passed_over_still_moves_the_lookup_drafters_acceptance_share():
    from infer.speculative import NgramDrafter

    drafter = NgramDrafter()
    drafter.update(4, 0)  # a lookup draft rejected outright: below the share at which it is trusted
    low = drafter.rate
    drafter.observe(4, 4)  # scored against what draft steps then emitted: it would have been right
    assert drafter.rate > low
    assert (drafter.proposed, drafter.accepted) == (4, 0)  # only verified drafts count as proposed


def test_lookup_drafts_regain_the_lead_where_the_text_repeats_the_prompt():
    from broken_backends import EchoModel, loaded_variant

    with loaded_variant("echo-draft", EchoModel, load={"speculative": "ngram"}) as echo:
        prompt = "the cat sat on the mat and " * 6
        with installed(StepCounter()) as counter:
            fast = echo.generate(prompt, max_tokens=60, temperature=0, ignore_eos=True)
        plain = echo.generate(prompt, max_tokens=60, temperature=0, ignore_eos=True, speculative="off")
        assert fast.token_ids == plain.token_ids
        # the echo continues the repeating prompt, which lookup drafts at length for nothing
        assert counter.steps["verify"] > 0
        assert counter.steps["draft"] < counter.steps["verify"] * 2
