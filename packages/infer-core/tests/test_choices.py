"""``n`` choices of one prompt: the prompt is prefilled once and forked, each choice as if alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
from broken_backends import loaded_variant

import infer
from infer_backend_fake import FakeModel
from infer_conformance.probes import installed, wait_idle

pytestmark = pytest.mark.unit


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


PROMPT = list(range(40, 140))
SAMPLED = infer.SamplingParams(max_tokens=16, temperature=0.9, ignore_eos=True)


class PrefillCounter:
    """Counts prefill calls and the prompt tokens they carry."""

    def __init__(self) -> None:
        self.calls = 0
        self.tokens = 0

    @infer.hookimpl(wrapper=True)
    def infer_prefill(self, model, batch):
        self.calls += 1
        self.tokens += sum(len(t) for t in batch.tokens)
        return (yield)


class ForkCounter:
    def __init__(self) -> None:
        self.forks: list[int] = []

    @infer.hookimpl(wrapper=True)
    def infer_fork(self, model, sequence, length, capacity):
        self.forks.append(length)
        return (yield)


@pytest.fixture
def model():
    m = infer.load("fake", backend="fake")
    yield m
    m.close()


def _seeded(n: int) -> list[infer.SamplingParams]:
    return [replace(SAMPLED, seed=10 + j) for j in range(n)]


def test_four_choices_prefill_the_prompt_once_and_fork_it_three_times(model):
    with installed(PrefillCounter()) as prefills, installed(ForkCounter()) as forks:
        streams = model.stream_choices(PROMPT, params=_seeded(4))
        results = [s.result() for s in streams]
    assert prefills.tokens == len(PROMPT)
    assert prefills.calls == 1
    assert forks.forks == [len(PROMPT)] * 3
    assert [r.usage.cached_tokens for r in results] == [0, len(PROMPT), len(PROMPT), len(PROMPT)]


def test_each_forked_choice_gives_the_tokens_of_its_request_alone(model):
    results = [s.result() for s in model.stream_choices(PROMPT, params=_seeded(4))]
    alone = [model.generate(PROMPT, params=p).token_ids for p in _seeded(4)]
    assert [r.token_ids for r in results] == alone
    assert len({r.token_ids for r in results}) > 1  # different seeds: different choices


@pytest.mark.anyio
async def test_async_choices_share_the_prompt_too(model):
    with installed(PrefillCounter()) as prefills:
        streams = model.astream_choices(PROMPT, params=_seeded(3))
        results = [await s.result() for s in streams]
    assert prefills.tokens == len(PROMPT)
    assert [r.token_ids for r in results] == [model.generate(PROMPT, params=p).token_ids for p in _seeded(3)]


def test_a_cancelled_first_choice_lets_the_others_prefill_alone(model):
    streams = model.stream_choices(PROMPT, params=_seeded(3))
    streams[0].close()  # before the scheduler prefilled anything: the others must not wait forever
    results = [s.result() for s in streams[1:]]
    assert [r.token_ids for r in results] == [model.generate(PROMPT, params=p).token_ids for p in _seeded(3)[1:]]


def test_choices_without_the_fork_capability_each_prefill_the_prompt():
    gone = frozenset({infer.Capability.FORK})
    with (
        loaded_variant("fake-nofork", FakeModel, remove_capabilities=gone) as model,
        installed(PrefillCounter()) as prefills,
    ):
        results = [s.result() for s in model.stream_choices(PROMPT, params=_seeded(2))]
    assert prefills.tokens == 2 * len(PROMPT)
    assert all(r.usage.cached_tokens == 0 for r in results)


def test_choices_need_a_list_of_params(model):
    with pytest.raises(infer.InvalidParameterError, match="params"):
        model.stream_choices(PROMPT, params=[])
    with pytest.raises(infer.InvalidParameterError, match="params"):
        model.stream_choices(PROMPT, params=SAMPLED)  # type: ignore[arg-type]


def test_a_bad_choice_refuses_the_whole_group_and_leaves_nothing_running(model):
    with pytest.raises(infer.InvalidParameterError):
        model.stream_choices(PROMPT, params=[SAMPLED, replace(SAMPLED, temperature=-1.0)])
    wait_idle(model)  # the valid first choice was cancelled, not left running
    assert model.generate(PROMPT, params=replace(SAMPLED, seed=1)).usage.completion_tokens == 16
