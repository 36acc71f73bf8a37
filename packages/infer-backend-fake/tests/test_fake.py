"""The fake backend's own promises: deterministic, bounded, honest about its cache."""

from __future__ import annotations

import numpy as np
import pytest

import infer
from infer_backend_fake import FakeKV, FakeModel, FakeOptions
from infer_backend_fake.plugin import build_tokenizer, infer_backend_info

pytestmark = pytest.mark.integration


def test_logits_are_a_function_of_the_whole_context_only():
    model = FakeModel(FakeOptions())
    a, b = model.new_sequence(8), model.new_sequence(8)
    batch = infer.Batch
    one = model.forward(batch((a,), (np.array([1, 2, 3], np.int32),)))
    model.forward(batch((b,), (np.array([1, 2], np.int32),)))
    two = model.forward(batch((b,), (np.array([3], np.int32),)))
    assert np.array_equal(one, two)


def test_the_cache_is_bounded_by_its_capacity():
    cache = FakeKV(2)
    cache.append(np.array([1, 2], np.int32))
    with pytest.raises(infer.BackendError, match="cannot take 3"):
        cache.append(np.array([3], np.int32))
    assert cache.length == 2


def test_a_released_cache_refuses_further_steps():
    cache = FakeKV(4)
    cache.release()
    with pytest.raises(infer.BackendError, match="released"):
        cache.append(np.array([1], np.int32))


def test_returned_logits_are_the_callers_own_and_writing_them_changes_nothing_later():
    model = FakeModel(FakeOptions())
    a, b = model.new_sequence(2), model.new_sequence(2)
    first = model.forward(infer.Batch((a,), (np.array([1], np.int32),)))
    expected = first.copy()
    first[:] = 0.0
    again = model.forward(infer.Batch((b,), (np.array([1], np.int32),)))
    assert np.array_equal(again, expected)


def test_the_tokenizer_round_trips_any_text_byte_for_byte():
    tok = build_tokenizer(512)
    text = "plain, ünïcödé, 机器人, 🤖 and <|im_end|>"
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id("<|im_end|>") == 511


def test_options_reject_negative_values_and_unknown_keys():
    with pytest.raises(infer.InvalidParameterError, match="latency"):
        FakeOptions.parse({"latency": -1})
    with pytest.raises(infer.InvalidParameterError, match="colour"):
        FakeOptions.parse({"colour": 1})


def test_the_fake_declares_itself_as_the_lowest_priority_backend():
    info = infer_backend_info()
    assert info.name == "fake" and info.priority < 0
    assert infer.Capability.FAULT_INJECTION in info.capabilities
