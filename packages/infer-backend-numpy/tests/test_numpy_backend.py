"""The numpy example backend: loads real weights, bounded honest caches, typed refusals."""

from __future__ import annotations

import numpy as np
import pytest

import infer
from infer_conformance.fixtures import TINY_LLAMA

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model():
    with infer.load(TINY_LLAMA, backend="numpy") as loaded:
        yield loaded


def test_greedy_text_follows_the_weights_not_a_table(model):
    import json

    from infer_conformance.fixtures import goldens_of

    prompt = json.loads(goldens_of(TINY_LLAMA)[1].read_text())["prompts"][0]
    got = model.generate(prompt["ids"], max_tokens=8, temperature=0, ignore_eos=True).token_ids
    assert list(got) == prompt["greedy"][:8]


def test_a_cache_refuses_tokens_past_its_capacity_and_keeps_its_length(model):
    seq = model.new_sequence(4)
    model.run_prefill([seq], [[1, 2, 3]])
    with pytest.raises(infer.ContextLengthError):
        model.run_prefill([seq], [[4, 5]])
    assert seq.length == 3
    seq.release()


def test_released_caches_hold_no_memory_and_refuse_steps(model):
    from infer_backend_numpy import NumpyKV

    seq = model.new_sequence(8)
    model.run_prefill([seq], [[1, 2, 3]])
    assert seq.nbytes > 0
    seq.release()
    assert seq.released and seq.nbytes == 0
    assert isinstance(seq, NumpyKV)
    with pytest.raises(infer.BackendError, match="released"):
        seq.cache(1)


def test_options_dtypes_and_devices_it_lacks_are_refused_by_name():
    for kwargs, name in (({"threads": 2}, "threads"), ({"dtype": "fp16"}, "dtype"), ({"device": "cuda"}, "device")):
        with pytest.raises(infer.InvalidParameterError) as raised:
            infer.load(TINY_LLAMA, backend="numpy", **kwargs)
        assert raised.value.parameter == name


def test_a_reference_that_is_not_a_bundle_is_declined(tmp_path):
    with pytest.raises(infer.UnsupportedModelError):
        infer.load(tmp_path, backend="numpy")


def test_logits_are_float32_copies_the_caller_owns(model):
    seq = model.new_sequence(4)
    first = model.run_prefill([seq], [[1, 2]])
    kept = first.copy()
    model.run_decode([seq], [3])
    assert first.dtype == np.float32 and np.array_equal(first, kept)
    seq.release()
