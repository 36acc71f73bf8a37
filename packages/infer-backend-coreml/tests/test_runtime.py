"""The handle's bookkeeping and its typed errors, driven through the numpy-evaluated graph."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from infer.contract import Batch, token_rows
from infer.errors import (
    BackendError,
    ContextLengthError,
    EmptyPromptError,
    InvalidParameterError,
    InvalidTokenError,
    ModelClosedError,
)
from infer_backend_coreml.runtime import CoreMLModel

pytestmark = pytest.mark.unit


def _feed(model: CoreMLModel, seq: object, tokens: list[int], *, decode: bool = False) -> object:
    batch = Batch((seq,), token_rows([tokens]))  # type: ignore[arg-type]
    return model.decode(batch) if decode else model.prefill(batch)


def test_decode_appends_one_token_to_the_cache(folded_model: Callable[..., CoreMLModel]) -> None:
    model = folded_model()
    seq = model.new_sequence(8)
    _feed(model, seq, [1, 2, 3])
    assert seq.length == 3
    _feed(model, seq, [4], decode=True)
    assert seq.length == 4


def test_prefill_past_the_sequence_capacity_raises_context_length(folded_model: Callable[..., CoreMLModel]) -> None:
    model = folded_model()
    seq = model.new_sequence(4)
    _feed(model, seq, [1, 2, 3])
    with pytest.raises(ContextLengthError):
        _feed(model, seq, [4, 5])
    assert seq.length == 3


def test_token_outside_the_vocabulary_raises_invalid_token(folded_model: Callable[..., CoreMLModel]) -> None:
    model = folded_model()
    with pytest.raises(InvalidTokenError) as caught:
        _feed(model, model.new_sequence(8), [1, model.vocab_size])
    assert caught.value.position == 1


def test_empty_row_raises_empty_prompt(folded_model: Callable[..., CoreMLModel]) -> None:
    model = folded_model()
    with pytest.raises(EmptyPromptError):
        _feed(model, model.new_sequence(8), [])


def test_decode_of_more_than_one_token_is_a_backend_error(folded_model: Callable[..., CoreMLModel]) -> None:
    model = folded_model()
    with pytest.raises(BackendError, match="exactly one"):
        _feed(model, model.new_sequence(8), [1, 2], decode=True)


def test_released_sequence_frees_its_bytes_and_refuses_more_tokens(folded_model: Callable[..., CoreMLModel]) -> None:
    model = folded_model()
    seq = model.new_sequence(8)
    assert seq.nbytes > 0
    seq.release()
    seq.release()
    assert seq.released and seq.nbytes == 0
    with pytest.raises(BackendError, match="released"):
        _feed(model, seq, [1])


def test_sequence_of_another_model_is_refused(folded_model: Callable[..., CoreMLModel]) -> None:
    a, b = folded_model(), folded_model()
    with pytest.raises(BackendError, match="not made by this"):
        _feed(a, b.new_sequence(8), [1])


@pytest.mark.parametrize("capacity", [0, 49, True, 2.5])
def test_capacity_beyond_the_built_context_is_invalid(
    folded_model: Callable[..., CoreMLModel], capacity: object
) -> None:
    with pytest.raises(InvalidParameterError):
        folded_model(context_length=48).new_sequence(capacity)  # type: ignore[arg-type]


def test_closed_model_refuses_new_work(folded_model: Callable[..., CoreMLModel]) -> None:
    model = folded_model()
    seq = model.new_sequence(8)
    model.close()
    with pytest.raises(ModelClosedError):
        _feed(model, seq, [1])
    with pytest.raises(ModelClosedError):
        model.new_sequence(8)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_truncate_then_decode_equals_never_having_fed_the_dropped_tokens(
    folded_model: Callable[..., CoreMLModel], dtype: str
) -> None:
    import numpy as np

    model = folded_model(dtype)
    rolled, fresh = model.new_sequence(16), model.new_sequence(16)
    _feed(model, rolled, [1, 2, 3, 4, 5, 6])  # a padded chunk, then more: stale keys past 3 in the state
    assert model.truncate(rolled, 3) is True
    assert rolled.length == 3
    _feed(model, fresh, [1, 2, 3])
    np.testing.assert_array_equal(_feed(model, rolled, [9], decode=True), _feed(model, fresh, [9], decode=True))
    # and a prefill after the roll-back, over the positions the dropped tokens held
    np.testing.assert_array_equal(_feed(model, rolled, [7, 8, 2]), _feed(model, fresh, [7, 8, 2]))
    assert rolled.length == fresh.length == 7


def test_truncate_refuses_a_sequence_it_did_not_make_or_released(folded_model: Callable[..., CoreMLModel]) -> None:
    model, other = folded_model(), folded_model()
    seq = other.new_sequence(8)
    _feed(other, seq, [1, 2])
    with pytest.raises(BackendError, match="not made by this"):
        model.truncate(seq, 1)
    seq.release()
    with pytest.raises(BackendError, match="released"):
        other.truncate(seq, 1)


def test_the_truncate_hook_answers_for_core_ml_handles_only(
    folded_model: Callable[..., CoreMLModel],
) -> None:
    from infer_backend_coreml import plugin

    model = folded_model()
    seq = model.new_sequence(8)
    _feed(model, seq, [1, 2, 3])
    assert plugin.infer_truncate(model, seq, 0) is True
    assert seq.length == 0
    assert plugin.infer_truncate(object(), seq, 0) is None  # another backend's handle
