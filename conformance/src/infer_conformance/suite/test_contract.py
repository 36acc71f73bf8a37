"""The shape of the contract: what the backend declares and what its steps return."""

from __future__ import annotations

import numpy as np
import pytest

import infer
from infer.contract import contract_compatible

pytestmark = pytest.mark.conformance


def test_backend_info_is_complete_and_speaks_this_contract(info: infer.BackendInfo) -> None:
    assert isinstance(info, infer.BackendInfo)
    assert info.name and info.version
    assert contract_compatible(info.contract_version)
    assert info.devices and info.dtypes
    assert info.max_batch_size >= 1
    assert info.logits_atol >= 0
    assert info.available


def test_prefill_returns_float32_logits_of_shape_rows_by_vocab(model: infer.Model) -> None:
    seqs = [model.new_sequence(16), model.new_sequence(16)]
    logits = model.run_prefill(seqs, [[1, 2, 3], [4, 5]])
    assert logits.dtype == np.float32
    assert logits.shape == (2, model.vocab_size)
    assert np.isfinite(logits).all()
    for s in seqs:
        s.release()


def test_decode_returns_float32_logits_of_shape_rows_by_vocab(model: infer.Model) -> None:
    seq = model.new_sequence(8)
    model.run_prefill([seq], [[1, 2]])
    logits = model.run_decode([seq], [3])
    assert logits.dtype == np.float32
    assert logits.shape == (1, model.vocab_size)
    assert np.isfinite(logits).all()
    seq.release()


def test_vocab_covers_the_tokenizer(model: infer.Model) -> None:
    assert model.vocab_size >= model.tokenizer.vocab_size - 64  # models may pad or trim added tokens
    ids = model.encode("hello world")
    assert all(0 <= i < model.vocab_size for i in ids)
