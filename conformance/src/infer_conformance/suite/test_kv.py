"""KV cache invariants: append-only, +1 per decode, release frees memory, and equivalence."""

from __future__ import annotations

import pytest

import infer
from infer_conformance.probes import track_caches, wait_idle
from infer_conformance.tolerances import assert_consistent

pytestmark = [pytest.mark.conformance, pytest.mark.certifies("contract:kv-cache")]

PROMPT = [5, 17, 42, 8, 99, 3, 61, 27, 14, 33, 71, 2]


def test_new_cache_is_empty_with_the_requested_capacity(model: infer.Model) -> None:
    seq = model.new_sequence(32)
    assert seq.length == 0
    assert seq.capacity >= 32
    assert not seq.released
    seq.release()


def test_prefill_appends_exactly_the_prompt_and_decode_appends_one(model: infer.Model) -> None:
    seq = model.new_sequence(len(PROMPT) + 4)
    model.run_prefill([seq], [PROMPT])
    assert seq.length == len(PROMPT)
    for step in range(1, 4):
        model.run_decode([seq], [7])
        assert seq.length == len(PROMPT) + step
    seq.release()


def test_prefill_in_chunks_continues_the_same_cache(model: infer.Model) -> None:
    whole = model.new_sequence(len(PROMPT))
    one = model.run_prefill([whole], [PROMPT])
    split = model.new_sequence(len(PROMPT))
    model.run_prefill([split], [PROMPT[:5]])
    assert split.length == 5
    two = model.run_prefill([split], [PROMPT[5:]])
    assert split.length == len(PROMPT)
    assert_consistent(one, two, model, "prefill in two chunks against one")
    whole.release()
    split.release()


def test_release_frees_the_cache_memory_and_is_idempotent(model: infer.Model) -> None:
    seq = model.new_sequence(64)
    model.run_prefill([seq], [PROMPT])
    assert seq.nbytes > 0
    seq.release()
    assert seq.released
    assert seq.nbytes == 0
    seq.release()
    assert seq.released


def test_prefill_then_decode_equals_prefill_of_the_whole_prompt(model: infer.Model) -> None:
    full = model.new_sequence(len(PROMPT))
    expected = model.run_prefill([full], [PROMPT])
    inc = model.new_sequence(len(PROMPT))
    model.run_prefill([inc], [PROMPT[:-1]])
    got = model.run_decode([inc], [PROMPT[-1]])
    assert_consistent(expected, got, model, "decode after prefill against one prefill")
    full.release()
    inc.release()


def test_several_decode_steps_equal_one_prefill(model: infer.Model) -> None:
    full = model.new_sequence(len(PROMPT))
    expected = model.run_prefill([full], [PROMPT])
    inc = model.new_sequence(len(PROMPT))
    model.run_prefill([inc], [PROMPT[:4]])
    for token in PROMPT[4:]:
        got = model.run_decode([inc], [token])
    assert_consistent(expected, got, model, "decode after prefill against one prefill")
    full.release()
    inc.release()


def test_every_cache_a_request_made_is_released_when_it_ends(fresh_model: infer.Model) -> None:
    made = track_caches(fresh_model)
    fresh_model.generate([1, 2, 3], max_tokens=5, temperature=0)
    with fresh_model.stream([1, 2, 3], max_tokens=50, temperature=0) as stream:
        next(iter(stream))
    wait_idle(fresh_model)
    assert len(made) == 2
    assert all(seq.released and seq.nbytes == 0 for seq in made)
