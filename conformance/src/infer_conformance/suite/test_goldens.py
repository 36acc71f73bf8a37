"""Graded against goldens from an independent implementation (transformers, via tools/py_ref).

For every family fixture the backend claims (loads without ``UnsupportedModelError``): the
last-position logits after prefill, the logits of 16 teacher-forced decode steps, and the greedy
continuation, within the suite's bound for the precision loaded (:mod:`infer_conformance.tolerances`).
A backend declaring :attr:`~infer.Capability.SYNTHETIC` computes no real logits and is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import infer
from infer_conformance.fixtures import FAMILY_FIXTURES, SMOLLM2_GOLDENS, goldens_of
from infer_conformance.plugin import SuiteConfig
from infer_conformance.tolerances import grade_logits, model_bound

pytestmark = pytest.mark.conformance


def _skip_synthetic(info: infer.BackendInfo) -> None:
    if infer.Capability.SYNTHETIC in info.capabilities:
        pytest.skip(f"backend {info.name!r} declares its logits synthetic: there are no real weights to grade")


class Graded:
    """A family fixture loaded on the backend under test, with its goldens and bound."""

    def __init__(self, model: infer.Model, fixture: Path) -> None:
        npz, meta = goldens_of(fixture)
        self.model = model
        self.arrays = dict(np.load(npz))
        self.prompts = json.loads(meta.read_text())["prompts"]
        try:
            self.bound = model_bound(model)
        except KeyError as exc:
            pytest.fail(str(exc))

    def label(self, n: int) -> str:
        return f"{self.model.dtype} prompt {n} ({self.prompts[n]['text'][:30]!r})"


FAMILIES = [pytest.param(family, marks=pytest.mark.certifies(f"family:{family}")) for family in sorted(FAMILY_FIXTURES)]


@pytest.fixture(scope="module", params=FAMILIES)
def graded(request: pytest.FixtureRequest, suite: SuiteConfig) -> Iterator[Graded]:
    """Each family fixture loaded on the backend under test (skipped when the backend refuses the family)."""
    _skip_synthetic(suite.info())
    family = request.param
    try:
        model = suite.load_ref(FAMILY_FIXTURES[family])
    except infer.UnsupportedModelError as exc:
        pytest.skip(f"backend {suite.backend!r} does not claim the {family} family: {exc}")
    yield Graded(model, FAMILY_FIXTURES[family])
    model.close()


def test_last_position_logits_after_prefill_match_the_goldens(graded: Graded) -> None:
    model = graded.model
    for n, prompt in enumerate(graded.prompts):
        ids = prompt["ids"]
        for fed, golden in ((ids, graded.arrays[f"full_{n}"][-1]), (ids[:-1], graded.arrays[f"prefill_{n}"][-1])):
            seq = model.new_sequence(len(fed))
            got = model.run_prefill([seq], [fed])
            seq.release()
            grade_logits(got, golden, graded.bound, f"prefill of {len(fed)} tokens, {graded.label(n)}")


def test_teacher_forced_decode_logits_match_the_goldens(graded: Graded) -> None:
    model = graded.model
    for n, prompt in enumerate(graded.prompts):
        ids, golden = prompt["ids"], graded.arrays[f"decode_{n}"]
        fed = [ids[-1], *prompt["greedy"][:-1]]
        seq = model.new_sequence(len(ids) - 1 + len(fed))
        model.run_prefill([seq], [ids[:-1]])
        got = np.concatenate([model.run_decode([seq], [token]) for token in fed])
        seq.release()
        grade_logits(got, golden[: len(fed)], graded.bound, f"teacher-forced decode, {graded.label(n)}")


def test_greedy_continuations_match_the_goldens(graded: Graded) -> None:
    model, bound = graded.model, graded.bound
    for n, prompt in enumerate(graded.prompts):
        expected = prompt["greedy"]
        got = list(model.generate(prompt["ids"], max_tokens=len(expected), temperature=0, ignore_eos=True).token_ids)
        if not bound.quantized:
            assert got == expected, f"greedy continuation of {graded.label(n)} differs from the goldens"
        else:
            top = np.argsort(-graded.arrays[f"decode_{n}"][0], kind="stable")[: bound.top_k].tolist()
            assert got[0] in top, f"{graded.label(n)}: first greedy token {got[0]} not in the golden top {top}"


def _teacher_forced_ranks(model: infer.Model, prompt: list[int], continuation: list[int]) -> list[int]:
    """Rank of each golden token among the backend's logits when fed the golden continuation."""
    seq = model.new_sequence(len(prompt) + len(continuation))
    logits = model.run_prefill([seq], [prompt])[0]
    ranks = []
    for token in continuation:
        ranks.append(int(np.count_nonzero(logits > logits[token])))
        logits = model.run_decode([seq], [token])[0]
    seq.release()
    return ranks


@pytest.mark.certifies("family:smollm2-135m-instruct")
def test_smollm2_greedy_continuations_match_transformers(suite: SuiteConfig, model: infer.Model) -> None:
    if "smollm2" not in Path(suite.model).name.lower():
        pytest.skip("the model under test is not SmolLM2-135M-Instruct (pass its GGUF or bundle as --infer-model)")
    _skip_synthetic(model.info)
    bound = model_bound(model)
    cases = json.loads(SMOLLM2_GOLDENS.read_text())["cases"]
    ranks = []
    for case in cases:
        assert model.encode(case["prompt_text"], add_special_tokens=False) == case["prompt_ids"]
        # 32 tokens: the point past which fp32 kernels may legitimately part at a near tie.
        expected = case["greedy_ids"][:32]
        if bound.quantized:
            ranks += _teacher_forced_ranks(model, case["prompt_ids"], expected)
            continue
        completion = model.generate(case["prompt_ids"], temperature=0, max_tokens=len(expected), ignore_eos=True)
        assert list(completion.token_ids) == expected, f"{model.dtype}: greedy continuation of {case['prompt_text']!r}"
    if bound.quantized:
        top1 = float(np.mean(np.array(ranks) == 0))
        top_k = float(np.mean(np.array(ranks) < bound.top_k))
        assert top1 >= bound.teacher_forced_top1, f"{model.dtype}: the golden token is the favourite at {top1:.0%}"
        assert top_k >= bound.teacher_forced_top_k, (
            f"{model.dtype}: the golden token is in the top {bound.top_k} at {top_k:.0%} of the steps"
        )
