"""``infer eval``: perplexity on the fixed pydoc text, and agreement with a reference precision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_cli import infer_cli

import infer
from infer.errors import InvalidParameterError
from infer.evaluate import GREEDY_TOKENS, PROMPTS, eval_chunks, evaluate, greedy_agreement, perplexity, scoring

pytestmark = pytest.mark.integration


def test_chunks_are_the_same_fixed_cut_of_the_pydoc_text_every_time(fake: infer.Model) -> None:
    first = eval_chunks(fake, 3, chunk_tokens=64)
    assert [len(c) for c in first] == [64, 64, 64]
    assert eval_chunks(fake, 3, chunk_tokens=64) == first
    # Consecutive slices of one encoding: a longer cut starts with the shorter one.
    assert eval_chunks(fake, 1, chunk_tokens=128)[0] == first[0] + first[1]
    from pydoc_data.topics import topics

    assert fake.decode(first[0]).startswith(topics[sorted(topics)[0]][:20])


@pytest.mark.parametrize("by", ["decode", "all_logits"])
def test_perplexity_scored_either_way_equals_one_prefill_per_prefix(fake: infer.Model, by: str) -> None:
    chunks = eval_chunks(fake, 2, chunk_tokens=12)
    got, scored, best = perplexity(fake, chunks, by=by)
    # Independent path: a fresh prefill of every prefix, its last-token logits scoring the next token.
    nll, tops = 0.0, []
    for chunk in chunks:
        for pos in range(1, len(chunk)):
            cache = fake.new_sequence(len(chunk))
            logits = fake.run_prefill([cache], [chunk[:pos]])[0].astype(np.float64)
            cache.release()
            nll -= logits[chunk[pos]] - (np.log(np.exp(logits - logits.max()).sum()) + logits.max())
            tops.append(int(logits.argmax()))
    assert scored == 2 * 11
    assert got == pytest.approx(math.exp(nll / scored), rel=1e-9)
    assert best.reshape(-1).tolist() == tops


def test_a_backend_with_all_position_logits_is_scored_by_one_prefill_per_chunk(fake: infer.Model) -> None:
    assert scoring(fake) == "all_logits"  # the fake declares the all_logits capability
    report = evaluate(fake, chunks=1, chunk_tokens=32)
    assert report.scoring == "all_logits"
    assert report.perplexity == pytest.approx(perplexity(fake, eval_chunks(fake, 1, chunk_tokens=32), by="decode")[0])


def test_an_unknown_scoring_way_is_refused(fake: infer.Model) -> None:
    with pytest.raises(InvalidParameterError, match="by"):
        perplexity(fake, eval_chunks(fake, 1, chunk_tokens=8), by="sideways")


def test_a_model_agrees_with_itself_everywhere(fake: infer.Model) -> None:
    report = evaluate(fake, reference=fake, chunks=2, chunk_tokens=32)
    assert report.top1_agreement == 1.0
    assert report.reference_perplexity == report.perplexity
    assert report.greedy_leading_agreement is not None and 0 < report.greedy_leading_agreement <= GREEDY_TOKENS
    assert greedy_agreement(fake, fake) == report.greedy_leading_agreement


def test_a_different_model_disagrees_and_the_report_says_how_much() -> None:
    with infer.load("fake", backend="fake") as ours, infer.load("fake", backend="fake", seed=7) as other:
        report = evaluate(ours, reference=other, chunks=1, chunk_tokens=64)
    assert report.top1_agreement is not None and report.top1_agreement < 0.5
    assert report.greedy_leading_agreement is not None and report.greedy_leading_agreement < 1
    assert len(PROMPTS) == 8


def test_bad_chunk_requests_raise_typed_errors(fake: infer.Model) -> None:
    with pytest.raises(InvalidParameterError, match="chunks"):
        eval_chunks(fake, 0)
    with pytest.raises(InvalidParameterError, match="context length"):
        eval_chunks(fake, 1, chunk_tokens=fake.context_length + 1)
    with pytest.raises(InvalidParameterError, match="evaluation text"):
        eval_chunks(fake, 100_000, chunk_tokens=512)


def test_eval_command_prints_one_json_report() -> None:
    result = infer_cli("eval", "fake", "--backend", "fake", "--chunks", "1", "--chunk-tokens", "32", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chunks"] == 1 and report["scored_tokens"] == 31
    assert report["perplexity"] > 1 and report["reference_dtype"] is None  # fp32 is its own reference: skipped
