"""Property: whatever token ids and parameters arrive, the answer is a result or a typed error."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infer

pytestmark = pytest.mark.conformance

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
)

params = st.fixed_dictionaries(
    {},
    optional={
        "temperature": numbers,
        "top_k": numbers,
        "top_p": numbers,
        "min_p": numbers,
        "repetition_penalty": numbers,
        "presence_penalty": numbers,
        "frequency_penalty": numbers,
        "seed": numbers,
        "max_tokens": st.one_of(st.integers(min_value=-3, max_value=6), st.none()),
        "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)),
        "logit_bias": st.dictionaries(st.integers(-3, 600), numbers, max_size=2),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=-5, max_value=2**33), max_size=12), kwargs=params)
def test_any_ids_and_parameters_give_a_result_or_a_typed_error(
    model: infer.Model, ids: list[int], kwargs: dict[str, Any]
) -> None:
    kwargs.setdefault("max_tokens", 4)
    try:
        completion = model.generate(ids, timeout=30, **kwargs)
    except infer.InferError:
        return
    assert isinstance(completion, infer.Completion)
    assert completion.usage.completion_tokens <= max(kwargs["max_tokens"] or 0, 0) or kwargs["max_tokens"] is None
    assert all(0 <= t < model.vocab_size for t in completion.token_ids)
    assert not any(isinstance(v, float) and math.isnan(v) for v in [completion.timings.total])
