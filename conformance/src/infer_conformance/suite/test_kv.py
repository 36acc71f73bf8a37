"""KV cache invariants: append-only, +1 per decode, release frees memory, and equivalence."""

from __future__ import annotations

import numpy as np
import pytest

from infer_conformance.probes import track_caches, wait_idle

pytestmark = pytest.mark.conformance

PROMPT = [5, 17, 42, 8, 99, 3, 61, 27, 14, 33, 71, 2]


def _close(a, b, model):
    tolerance = max(model.logits_atol, 1e-7)
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    assert diff <= tolerance, f"logits differ by {diff:g}, more than the declared logits_atol {model.logits_atol:g}"


def test_new_cache_is_empty_with_the_requested_capacity(model):
    seq = model.new_sequence(32)
    assert seq.length == 0
    assert seq.capacity >= 32
    assert not seq.released
    seq.release()


def test_prefill_appends_exactly_the_prompt_and_decode_appends_one(model):
    seq = model.new_sequence(len(PROMPT) + 4)
    model.run_prefill([seq], [PROMPT])
    assert seq.length == len(PROMPT)
    for step in range(1, 4):
        model.run_decode([seq], [7])
        assert seq.length == len(PROMPT) + step
    seq.release()


def test_prefill_in_chunks_continues_the_same_cache(model):
    whole = model.new_sequence(len(PROMPT))
    one = model.run_prefill([whole], [PROMPT])
    split = model.new_sequence(len(PROMPT))
    model.run_prefill([split], [PROMPT[:5]])
    assert split.length == 5
    two = model.run_prefill([split], [PROMPT[5:]])
    assert split.length == len(PROMPT)
    _close(one, two, model)
    whole.release()
    split.release()


def test_release_frees_the_cache_memory_and_is_idempotent(model):
    seq = model.new_sequence(64)
    model.run_prefill([seq], [PROMPT])
    assert seq.nbytes > 0
    seq.release()
    assert seq.released
    assert seq.nbytes == 0
    seq.release()
    assert seq.released


def test_prefill_then_decode_equals_prefill_of_the_whole_prompt(model):
    full = model.new_sequence(len(PROMPT))
    expected = model.run_prefill([full], [PROMPT])
    inc = model.new_sequence(len(PROMPT))
    model.run_prefill([inc], [PROMPT[:-1]])
    got = model.run_decode([inc], [PROMPT[-1]])
    _close(expected, got, model)
    full.release()
    inc.release()


def test_several_decode_steps_equal_one_prefill(model):
    full = model.new_sequence(len(PROMPT))
    expected = model.run_prefill([full], [PROMPT])
    inc = model.new_sequence(len(PROMPT))
    model.run_prefill([inc], [PROMPT[:4]])
    for token in PROMPT[4:]:
        got = model.run_decode([inc], [token])
    _close(expected, got, model)
    full.release()
    inc.release()


def test_a_batch_gives_the_same_logits_as_each_row_alone(model):
    rows = [PROMPT, PROMPT[:3], PROMPT[2:9], [11], PROMPT[::-1]]
    singles = []
    for row in rows:
        seq = model.new_sequence(len(row) + 2)
        prefill = model.run_prefill([seq], [row])
        decode = model.run_decode([seq], [9])
        singles.append((prefill[0], decode[0]))
        seq.release()
    seqs = [model.new_sequence(len(row) + 2) for row in rows]
    prefill = model.run_prefill(seqs, rows)
    decode = model.run_decode(seqs, [9] * len(rows))
    for i, (p, d) in enumerate(singles):
        _close(p, prefill[i], model)
        _close(d, decode[i], model)
        assert seqs[i].length == len(rows[i]) + 1
    for seq in seqs:
        seq.release()


def test_every_cache_a_request_made_is_released_when_it_ends(fresh_model):
    made = track_caches(fresh_model)
    fresh_model.generate([1, 2, 3], max_tokens=5, temperature=0)
    with fresh_model.stream([1, 2, 3], max_tokens=50, temperature=0) as stream:
        next(iter(stream))
    wait_idle(fresh_model)
    assert len(made) == 2
    assert all(seq.released and seq.nbytes == 0 for seq in made)
