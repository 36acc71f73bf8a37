"""Automatic prefix caching: same tokens as without it, fewer tokens prefilled, bounded memory."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from broken_backends import variant

import infer
from infer.contract import KV_CAPABILITIES, usable_capabilities
from infer.plugins import get_registry
from infer.prefix_cache import BLOCK, PrefixCache
from infer_backend_fake import FakeKV, FakeModel
from infer_backend_fake import plugin as fake_backend
from infer_conformance.probes import installed, wait_idle

pytestmark = pytest.mark.unit

SYSTEM = list(range(40, 140))  # a 100-token shared prefix
GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}


class PrefillCounter:
    """Counts the prompt tokens each model's backend is asked to prefill."""

    def __init__(self) -> None:
        self.tokens = 0

    @infer.hookimpl(wrapper=True)
    def infer_prefill(self, model, batch):
        self.tokens += sum(len(t) for t in batch.tokens)
        return (yield)


@pytest.fixture
def cached():
    model = infer.load("fake", backend="fake", prefix_cache=True)
    yield model
    model.close()


@pytest.fixture
def plain():
    model = infer.load("fake", backend="fake")
    yield model
    model.close()


def test_a_repeated_prefix_gives_the_same_tokens_and_is_not_prefilled_again(cached, plain):
    first, second = [*SYSTEM, 1, 2, 3], [*SYSTEM, 7, 8]
    cached.generate(first, **GREEDY)
    with installed(PrefillCounter()) as counter:
        hit = cached.generate(second, **GREEDY)
    assert hit.usage.cached_tokens == len(SYSTEM)
    assert counter.tokens == len(second) - len(SYSTEM)
    assert hit.token_ids == plain.generate(second, **GREEDY).token_ids
    stats = cached.prefix_cache_stats
    assert (stats.lookups, stats.hits, stats.cached_tokens, stats.hit_rate) == (2, 1, len(SYSTEM), 0.5)
    assert plain.prefix_cache_stats is None


def test_a_seeded_sampled_request_gives_the_same_tokens_from_a_cached_prefix(cached, plain):
    params = {"max_tokens": 20, "temperature": 0.9, "seed": 3, "ignore_eos": True}
    cached.generate([*SYSTEM, 5], **params)
    hit = cached.generate([*SYSTEM, 6], **params)
    assert hit.usage.cached_tokens > 0
    assert hit.token_ids == plain.generate([*SYSTEM, 6], **params).token_ids


def test_the_next_chat_turn_starts_from_the_previous_turns_cache(cached):
    messages = [{"role": "system", "content": "You answer briefly. " * 10}, {"role": "user", "content": "hi"}]
    turn = cached.generate(messages=messages, **GREEDY)
    messages += [{"role": "assistant", "content": turn.text}, {"role": "user", "content": "and then?"}]
    follow_up = cached.generate(messages=messages, **GREEDY)
    # everything up to the first turn's user message at least: the template wraps the rest
    assert follow_up.usage.cached_tokens >= turn.usage.prompt_tokens - 4
    assert follow_up.usage.cached_tokens < follow_up.usage.prompt_tokens


def test_prefix_hits_keep_tokens_under_chunked_prefill_and_continuous_batching(plain):
    model = infer.load("fake", backend="fake", prefix_cache=True, prefill_chunk_size=8)
    try:
        model.generate([*SYSTEM, 1], **GREEDY)
        prompts = [[*SYSTEM, 2, 3], [*SYSTEM[:50], 9], [*SYSTEM, 4]]
        streams = [model.stream(p, **GREEDY) for p in prompts]
        results = [[e.token_id for e in s] for s in streams]
        for prompt, tokens in zip(prompts, results, strict=True):
            assert tuple(tokens) == plain.generate(prompt, **GREEDY).token_ids
    finally:
        model.close()


def test_a_running_requests_prompt_is_shared_with_a_request_that_arrives_meanwhile(cached, plain):
    with cached.stream([*SYSTEM, 1], max_tokens=200, temperature=0, ignore_eos=True) as running:
        next(iter(running))  # its prompt is prefilled and it is decoding
        meanwhile = cached.generate([*SYSTEM, 2], **GREEDY)
    assert meanwhile.usage.cached_tokens == len(SYSTEM)
    assert meanwhile.token_ids == plain.generate([*SYSTEM, 2], **GREEDY).token_ids


def test_a_prompt_shorter_than_one_block_is_never_served_from_cache(cached):
    cached.generate(SYSTEM[: BLOCK - 2], **GREEDY)
    assert cached.generate(SYSTEM[: BLOCK - 2], **GREEDY).usage.cached_tokens == 0


def test_a_failed_requests_cache_is_not_reused():
    model = infer.load("fake", backend="fake", prefix_cache=True, raise_at_step=2)
    try:
        with pytest.raises(infer.BackendError):
            model.generate([*SYSTEM, 1], **GREEDY)
        assert len(model._engine.prefix_cache) == 0
        assert model.generate([*SYSTEM, 1], **GREEDY).usage.cached_tokens == 0
    finally:
        model.close()


def test_a_finished_request_is_kept_as_a_compact_copy_released_when_the_model_closes():
    model = infer.load("fake", backend="fake", prefix_cache=True)
    made = []
    original = model.handle.new_sequence
    model.handle.new_sequence = lambda capacity: made.append(original(capacity)) or made[-1]
    result = model.generate([*SYSTEM, 1], **GREEDY)
    wait_idle(model)
    kept = [entry.kv for entry in model._engine.prefix_cache._entries.values()]
    held = len(SYSTEM) + 1 + len(result.token_ids) - 1  # the last token drawn was never fed
    # the request's own cache (sized for the whole request) goes; a copy of what it held stays
    assert [kv.released for kv in made] == [True]
    assert [(kv.length, kv.capacity, kv.released) for kv in kept] == [(held, held, False)]
    model.close()
    assert kept[0].released


def test_prefix_cache_on_a_backend_without_fork_is_refused_by_name():
    registry = get_registry()
    backend = registry.register_backend(variant("fake-1.0", FakeModel, contract_version="1.0"), name="fake-1.0")
    try:
        with pytest.raises(infer.InvalidParameterError, match="fork"):
            infer.load("fake", backend="fake-1.0", prefix_cache=True)
        model = infer.load("fake", backend="fake-1.0", prefix_cache="auto")
        assert model._engine.prefix_cache is None
        model.close()
    finally:
        registry.unregister(backend.plugin)


@pytest.mark.parametrize("value", [0, -5, "yes", 1.5, None])
def test_a_bad_prefix_cache_value_is_refused(value):
    with pytest.raises(infer.InvalidParameterError, match="prefix_cache"):
        infer.load("fake", backend="fake", prefix_cache=value)


# -- the index alone ------------------------------------------------------------------------


def _kv(tokens, capacity=64):
    kv = FakeKV(capacity)
    kv.append(np.asarray(tokens, np.int32))
    return kv


def test_the_longest_shared_prefix_wins_and_extends_past_the_last_whole_block():
    index = PrefixCache(budget=1 << 20)
    short, long_ = list(range(20)), [*range(40), 99]
    index.adopt(_kv(short), np.asarray(short, np.int32))
    index.adopt(_kv(long_), np.asarray(long_, np.int32))
    hit = index.lookup(np.asarray([*range(37), 5, 5], np.int32))
    assert hit is not None
    assert hit.length == 37
    assert index.stats.hits == 1
    assert index.stats.cached_tokens == 37


def test_a_block_hash_collision_never_gives_another_prompts_tokens():
    index = PrefixCache(budget=1 << 20)
    tokens = np.arange(32, dtype=np.int32)
    index.adopt(_kv(tokens), tokens)
    entry = next(iter(index._entries.values()))
    entry.tokens = entry.tokens.copy()
    entry.tokens[3] = 999  # the hashes still say blocks match; the tokens do not
    hit = index.lookup(np.arange(40, dtype=np.int32))
    assert hit is None


def test_owned_caches_over_the_budget_are_evicted_least_recently_used_first():
    size = _kv(range(16)).nbytes
    index = PrefixCache(budget=2 * size)
    a, b, c = (np.arange(16, dtype=np.int32) + 100 * i for i in range(3))
    kvs = [_kv(t) for t in (a, b, c)]
    index.adopt(kvs[0], a)
    index.adopt(kvs[1], b)
    assert index.lookup(np.append(a, 1).astype(np.int32)) is not None  # a is now the most recent
    index.adopt(kvs[2], c)
    assert kvs[1].released and not kvs[0].released and not kvs[2].released
    assert index.stats.evictions == 1
    assert index.nbytes <= index.budget


# -- contract 1.1 on a 1.0 backend ----------------------------------------------------------


def test_a_contract_1_0_backend_gets_none_of_the_1_1_capabilities_it_lists():
    info = replace(fake_backend.infer_backend_info(), contract_version="1.0")
    usable = usable_capabilities(info)
    assert infer.Capability.BATCH in usable
    assert not usable & KV_CAPABILITIES


def test_truncate_on_a_backend_without_the_capability_is_a_typed_error_naming_it():
    registry = get_registry()
    backend = registry.register_backend(variant("fake-1.0", FakeModel, contract_version="1.0"), name="fake-1.0")
    try:
        model = infer.load("fake", backend="fake-1.0")
        seq = model.new_sequence(8)
        model.run_prefill([seq], [[1, 2, 3]])
        with pytest.raises(infer.BackendError, match="'truncate' capability"):
            model.truncate(seq, 1)
        with pytest.raises(infer.BackendError, match="'all_logits' capability"):
            model.run_prefill_all([seq], [[4]])
        model.close()
    finally:
        registry.unregister(backend.plugin)


def test_truncate_and_fork_refuse_lengths_the_cache_does_not_hold(fake):
    seq = fake.new_sequence(8)
    fake.run_prefill([seq], [[1, 2, 3]])
    with pytest.raises(infer.InvalidParameterError, match="length"):
        fake.truncate(seq, 4)
    with pytest.raises(infer.InvalidParameterError, match="length"):
        fake.fork(seq, 0)
    with pytest.raises(infer.InvalidParameterError, match="capacity"):
        fake.fork(seq, 3, 2)
