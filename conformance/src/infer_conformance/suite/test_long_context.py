"""Long contexts: positions up to ``context_length`` work, and every position still matters.

A KV cache that silently wraps, a window that drops old tokens, or positions that saturate pass
every short test; these fill the context (prefill in chunks, then decode to the end), decode
across every power of two, and check that the first token still moves the last logits. When
the model is a bundle and the backend computes real logits, the end of the context is also
graded against the numpy reference forward, over at most ``REFERENCE_CONTEXT`` positions (the
reference is float64 numpy: a real model's full context would take it many minutes).
``--infer-max-context N`` loads the model with a
context of N instead, for quick runs on models with long contexts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pytest

import infer
from infer_conformance.plugin import SuiteConfig
from infer_conformance.tolerances import assert_consistent, grade_logits, model_bound

if TYPE_CHECKING:
    from infer_conformance.reference import ReferenceModel

pytestmark = [pytest.mark.conformance, pytest.mark.certifies("contract:long-context")]

CHUNK = 64
TAIL = 8  # tokens decoded one by one at the end of the context
#: Most positions graded against the numpy reference. It costs what a float64 forward of the
#: model costs: a real model's full context (SmolLM2's 8,192) would take the reference many
#: minutes, so the grading stops at 512 positions (twice the tiny fixtures' contexts),
#: past every boundary a short prompt never crosses; the contract checks still fill the context.
REFERENCE_CONTEXT = 512


def _tokens(model: infer.Model, n: int, seed: int = 0) -> list[int]:
    # Ids from the whole vocabulary except the last 64 (special tokens), seeded: the same every run.
    high = max(model.vocab_size - 64, 2)
    ids: list[int] = np.random.default_rng(seed).integers(1, high, size=n).tolist()
    return ids


def _prefill_chunked(model: infer.Model, seq: infer.KVCache, ids: list[int]) -> npt.NDArray[np.float32]:
    logits: npt.NDArray[np.float32] | None = None
    for start in range(0, len(ids), CHUNK):
        logits = model.run_prefill([seq], [ids[start : start + CHUNK]])
    assert logits is not None, "nothing to prefill"
    last: npt.NDArray[np.float32] = logits[0].copy()
    return last


@pytest.fixture(scope="module")
def long_model(suite: SuiteConfig, model: infer.Model) -> Iterator[infer.Model]:
    """The shared model, or one loaded with the context ``--infer-max-context`` asks for."""
    if suite.context(model) == model.context_length:
        yield model
        return
    with suite.load(context_length=suite.context(model)) as capped:
        yield capped


def _reference(suite: SuiteConfig, model: infer.Model) -> ReferenceModel | None:
    """The numpy reference of the model under test, or ``None`` when there is none to compare with."""
    if infer.Capability.SYNTHETIC in model.info.capabilities:
        return None
    from infer.bundle import Bundle, is_bundle
    from infer.resolve import resolve_model

    path = resolve_model(suite.model) or Path(suite.model)
    if not is_bundle(path):
        return None
    from infer_conformance.reference import ReferenceModel

    try:
        return ReferenceModel(Bundle.open(path))
    except infer.UnsupportedModelError:
        return None  # a family the reference does not model: nothing independent to grade against


def _fill(model: infer.Model, seq: infer.KVCache, ids: list[int]) -> list[npt.NDArray[np.float32]]:
    """Feed ``ids``: chunked prefill of all but the last ``TAIL``, then one decode each; the logits
    after the prefill and after every decode."""
    got = [_prefill_chunked(model, seq, ids[:-TAIL])]
    got += [model.run_decode([seq], [token])[0].copy() for token in ids[-TAIL:]]
    return got


def test_a_context_filled_by_chunked_prefill_then_decode_reaches_its_last_position(long_model: infer.Model) -> None:
    model = long_model
    ctx = model.context_length
    ids = _tokens(model, ctx)
    seq = model.new_sequence(ctx)
    got = _fill(model, seq, ids)
    assert seq.length == ctx
    seq.release()
    whole = model.new_sequence(ctx)
    assert_consistent(_prefill_chunked(model, whole, ids), got[-1], model, f"the last of {ctx} positions")
    whole.release()


def test_the_end_of_a_context_filled_in_chunks_matches_the_numpy_reference(
    suite: SuiteConfig, long_model: infer.Model
) -> None:
    model = long_model
    reference = _reference(suite, model)
    if reference is None:
        pytest.skip("no independent reference for this model: synthetic logits, not a bundle, or an unmodelled family")
    # The backend reaches the full context above; the float64 numpy reference grades at most
    # REFERENCE_CONTEXT positions of it, the same chunked prefill and decodes.
    n = min(model.context_length, REFERENCE_CONTEXT)
    ids = _tokens(model, n)
    seq = model.new_sequence(n)
    got = _fill(model, seq, ids)
    seq.release()
    cache = reference.new_cache()
    for start in range(0, n - TAIL, CHUNK):  # chunked: the score matrix stays CHUNK x n
        last = reference.step(cache, ids[start : min(start + CHUNK, n - TAIL)])[-1]
    expected = [last] + [reference.step(cache, [t])[-1] for t in ids[-TAIL:]]
    grade_logits(np.stack(got), np.stack(expected), model_bound(model), f"the last {TAIL + 1} of {n} positions")


def test_decode_across_every_power_of_two_equals_one_prefill(long_model: infer.Model) -> None:
    model = long_model
    ctx = model.context_length
    ids = _tokens(model, ctx, seed=1)
    power = 2
    while power < ctx:
        # Prefill up to just before the boundary, then decode across it.
        end = min(power + 2, ctx)
        seq = model.new_sequence(end)
        _prefill_chunked(model, seq, ids[: power - 1])
        for token in ids[power - 1 : end]:
            stepped = model.run_decode([seq], [token])[0].copy()
        seq.release()
        whole = model.new_sequence(end)
        assert_consistent(_prefill_chunked(model, whole, ids[:end]), stepped, model, f"decode across position {power}")
        whole.release()
        power *= 2


def test_the_first_token_still_changes_the_logits_at_the_end_of_the_context(long_model: infer.Model) -> None:
    model = long_model
    ctx = model.context_length
    ids = _tokens(model, ctx, seed=2)
    other = [1 if ids[0] != 1 else 2, *ids[1:]]
    last = []
    for prompt in (ids, other):
        seq = model.new_sequence(ctx)
        last.append(_prefill_chunked(model, seq, prompt))
        seq.release()
    assert not np.array_equal(last[0], last[1]), (
        f"changing the first of {ctx} tokens left the last logits unchanged: the start of the context is lost"
    )


def test_generation_runs_to_the_context_length_and_stops_there(long_model: infer.Model) -> None:
    model = long_model
    ctx = model.context_length
    prompt = _tokens(model, ctx - TAIL, seed=3)
    completion = model.generate(prompt, max_tokens=2 * TAIL, temperature=0, ignore_eos=True)
    assert completion.finish_reason == "length"
    assert completion.usage.prompt_tokens + completion.usage.completion_tokens == ctx
