"""Contract 1.1 KV capabilities: truncate, fork and all-position logits, each tested when declared;
and contract 1.3's draft steps, tested when the model under test has them.

Each is an equivalence with what the 1.0 contract already guarantees: a truncated cache behaves
as if the dropped tokens had never been fed, a fork as a prefill of the same prefix, and the
all-position logits of a chunk as the successive decodes of its tokens, all within the
backend's declared ``logits_atol``. A backend that does not declare a capability is skipped here,
with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import infer
from infer_conformance.plugin import SuiteConfig, require
from infer_conformance.tolerances import assert_consistent, model_bound

pytestmark = pytest.mark.conformance

PROMPT = [5, 17, 42, 8, 99, 3, 61, 27, 14, 33, 71, 2]
DRAFT = [7, 9, 11, 13]
Cap = infer.Capability


def _prefilled(
    model: infer.Model, tokens: list[int], capacity: int = 32
) -> tuple[infer.KVCache, npt.NDArray[np.float32]]:
    seq = model.new_sequence(capacity)
    logits: npt.NDArray[np.float32] = model.run_prefill([seq], [tokens]).copy()
    return seq, logits


# -- truncate ---------------------------------------------------------------------------------


@pytest.mark.certifies("capability:truncate")
def test_truncate_then_decode_equals_never_having_appended(model: infer.Model, info: infer.BackendInfo) -> None:
    require(info, Cap.TRUNCATE)
    clean, _ = _prefilled(model, PROMPT[:8])
    expected = model.run_decode([clean], [PROMPT[8]]).copy()
    rolled, _ = _prefilled(model, PROMPT[:8])
    model.run_prefill([rolled], [DRAFT])  # speculative tokens, then rejected
    model.truncate(rolled, 8)
    assert rolled.length == 8
    got = model.run_decode([rolled], [PROMPT[8]])
    assert_consistent(expected, got, model, "decode after truncating drafted tokens against never feeding them")
    clean.release()
    rolled.release()


@pytest.mark.certifies("capability:truncate")
def test_truncate_inside_the_prompt_then_prefill_equals_a_prefill_of_the_kept_tokens(
    model: infer.Model, info: infer.BackendInfo
) -> None:
    require(info, Cap.TRUNCATE)
    whole, expected = _prefilled(model, PROMPT[:3] + PROMPT[6:])
    cut, _ = _prefilled(model, PROMPT)
    model.truncate(cut, 3)
    got = model.run_prefill([cut], [PROMPT[6:]])
    assert cut.length == len(PROMPT) - 3
    assert_consistent(expected, got, model, "prefill after truncating to 3 tokens against a prefill of the kept ones")
    whole.release()
    cut.release()


# -- fork -------------------------------------------------------------------------------------


@pytest.mark.certifies("capability:fork")
def test_a_fork_equals_a_prefill_of_the_same_prefix(model: infer.Model, info: infer.BackendInfo) -> None:
    require(info, Cap.FORK)
    source, _ = _prefilled(model, PROMPT)
    fork = model.fork(source, 6, 32)
    assert fork.length == 6
    assert fork.capacity >= 32
    fresh, _ = _prefilled(model, PROMPT[:6])
    expected = model.run_decode([fresh], [DRAFT[0]]).copy()
    got = model.run_decode([fork], [DRAFT[0]])
    assert_consistent(expected, got, model, "decode on a fork of 6 tokens against a prefill of those tokens")
    for seq in (source, fork, fresh):
        seq.release()


@pytest.mark.certifies("capability:fork")
def test_a_fork_and_its_source_are_independent(model: infer.Model, info: infer.BackendInfo) -> None:
    require(info, Cap.FORK)
    source, _ = _prefilled(model, PROMPT[:8])
    twin, _ = _prefilled(model, PROMPT[:8])
    fork = model.fork(source, 8)
    model.run_prefill([fork], [DRAFT])  # the fork grows on its own...
    fork.release()  # ...and goes: the source must not notice either
    assert source.length == 8
    expected = model.run_decode([twin], [PROMPT[8]]).copy()
    got = model.run_decode([source], [PROMPT[8]])
    assert_consistent(expected, got, model, "decode on a cache whose fork grew and was released")
    source.release()
    twin.release()


# -- all-position logits ----------------------------------------------------------------------


@pytest.mark.certifies("capability:all_logits")
def test_all_position_logits_equal_successive_decodes(model: infer.Model, info: infer.BackendInfo) -> None:
    require(info, Cap.ALL_LOGITS)
    start = PROMPT[:4]
    stepped, _ = _prefilled(model, start)
    expected = [model.run_decode([stepped], [t]).copy() for t in PROMPT[4:]]
    seq, _ = _prefilled(model, start)
    (rows,) = model.run_prefill_all([seq], [PROMPT[4:]])
    assert rows.shape == (len(PROMPT) - 4, model.vocab_size)
    assert seq.length == len(PROMPT)
    for j, want in enumerate(expected):
        assert_consistent(want[0], rows[j], model, f"all-position logits at position {4 + j} against a decode")
    stepped.release()
    seq.release()


@pytest.mark.certifies("capability:all_logits")
def test_all_position_logits_of_a_ragged_batch_come_row_after_row(model: infer.Model, info: infer.BackendInfo) -> None:
    require(info, Cap.ALL_LOGITS)
    a, b = PROMPT[:5], DRAFT[:2]
    solo = [model.new_sequence(8), model.new_sequence(8)]
    alone_a = model.run_prefill_all(solo[:1], [a])[0].copy()
    alone_b = model.run_prefill_all(solo[1:], [b])[0].copy()
    seqs = [model.new_sequence(8), model.new_sequence(8)]
    got_a, got_b = model.run_prefill_all(seqs, [a, b])
    assert got_a.shape[0] == len(a)
    assert got_b.shape[0] == len(b)
    assert_consistent(alone_a, got_a, model, "row 0 of a ragged all-position prefill against alone")
    assert_consistent(alone_b, got_b, model, "row 1 of a ragged all-position prefill against alone")
    for seq in (*solo, *seqs):
        seq.release()


# -- what the engine builds on them -----------------------------------------------------------

SHARED = [(7 * i + 3) % 200 + 10 for i in range(40)]  # a 40-token shared prefix: two and a half blocks


def _assert_same_greedy(hit: infer.Completion, plain: infer.Completion, model: infer.Model, what: str) -> None:
    """Equal greedy tokens; at a quantized precision, equal up to a near tie the chunking may flip.

    A prefix-cache hit prefills only the suffix: its logits are the chunked prefill's, which the
    backend's declared ``logits_atol`` bounds against the whole prefill (:func:`assert_consistent`
    elsewhere). At fp32/fp16 that tolerance is far below any real margin, so the tokens must be
    equal. Quantized kernels with quantized activations (ONNX int4 and GGUF native: int8
    activations per row) round a one-token step differently from a many-token prefill, and the
    declared tolerance is then large (1.5 on SmolLM2's logits): the hit may part from the plain
    run, but only at a step where the plain run's favourite led the hit's token by at most twice
    that tolerance (each run within it of the true logits), and never before.
    """
    if not model_bound(model).quantized or hit.token_ids == plain.token_ids:
        assert hit.token_ids == plain.token_ids, what
        return
    assert plain.logprobs is not None
    step = next(i for i, (a, b) in enumerate(zip(hit.token_ids, plain.token_ids, strict=True)) if a != b)
    event = plain.logprobs[step]
    alternatives = dict(event.top_logprobs)
    token = hit.token_ids[step]
    assert token in alternatives, (
        f"{what}: at step {step} the hit chose {token}, not among the plain run's top {len(alternatives)}"
    )
    assert event.logprob is not None
    margin = event.logprob - alternatives[token]
    tolerance = 2 * max(model.logits_atol or 0.0, 1e-7)
    assert margin <= tolerance, (
        f"{what}: at step {step} the hit chose {token}, which the plain run put {margin:.3g} below its favourite "
        f"{plain.token_ids[step]}: more than twice the declared logits_atol ({tolerance:g}) can explain"
    )


@pytest.mark.certifies("capability:fork")
def test_requests_served_from_the_prefix_cache_give_the_plain_greedy_tokens(
    suite: SuiteConfig, model: infer.Model, info: infer.BackendInfo
) -> None:
    require(info, Cap.FORK)
    cached = suite.load(prefix_cache=True)
    try:
        greedy: dict[str, Any] = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
        cached.generate([*SHARED, 1, 2], **greedy)
        for tail in ([3], [4, 5, 6], [1, 2]):
            hit = cached.generate([*SHARED, *tail], **greedy)
            assert hit.usage.cached_tokens >= len(SHARED)
            plain = model.generate([*SHARED, *tail], **greedy, logprobs=True, top_logprobs=5)
            _assert_same_greedy(hit, plain, model, f"tail {tail}")
    finally:
        cached.close()


# -- draft steps (contract 1.3) ---------------------------------------------------------------


def _require_draft(model: infer.Model) -> None:
    if Cap.DRAFT not in model.capabilities:
        pytest.skip(
            f"this model on {model.backend!r} has no draft steps (the 'draft' capability; "
            "load it with the backend option that gives it a draft, e.g. --infer-option draft=int4 on onnx)"
        )


@pytest.mark.certifies("capability:draft")
def test_drafted_positions_leave_no_trace_once_truncated_and_verified(model: infer.Model) -> None:
    _require_draft(model)
    clean, _ = _prefilled(model, PROMPT[:8])
    expected = np.concatenate(model.run_prefill_all([clean], [DRAFT]))
    expected_next = model.run_decode([clean], [PROMPT[8]]).copy()
    drafted, _ = _prefilled(model, PROMPT[:8])
    for token in DRAFT:
        model.run_draft([drafted], [token])
    assert drafted.length == 8 + len(DRAFT), "a draft step advances its cache by one position, as decode does"
    model.truncate(drafted, 8)
    got = np.concatenate(model.run_prefill_all([drafted], [DRAFT]))
    assert_consistent(expected, got, model, "verification after draft steps against verification alone")
    got_next = model.run_decode([drafted], [PROMPT[8]])
    assert_consistent(expected_next, got_next, model, "decode after a verified draft against one never drafted")
    clean.release()
    drafted.release()


@pytest.mark.certifies("capability:draft")
def test_draft_steps_give_finite_logits_for_every_row_of_a_batch(model: infer.Model) -> None:
    _require_draft(model)
    seqs = [_prefilled(model, PROMPT[:n])[0] for n in (3, 8)]
    logits = model.run_draft(seqs, [DRAFT[0], DRAFT[1]])
    assert logits.shape == (2, model.vocab_size)
    assert np.isfinite(logits).all(), "draft logits must be finite"
    assert [s.length for s in seqs] == [4, 9]
    for seq in seqs:
        seq.release()
