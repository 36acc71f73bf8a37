"""int4 results must not depend on what else shares the batch; other refs are declined untouched."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_helpers import load_spec, step

import infer
from infer.contract import LoadSpec
from infer_backend_onnx import plugin

pytestmark = pytest.mark.integration


def test_int4_gives_each_row_of_a_batch_its_solo_logits(load_tiny):
    model = load_tiny("int4")
    assert model.pad_single_rows and model.details["batch_invariant"]
    rows = [[5, 17, 42, 8], [3, 1], [9, 9, 9]]
    solo = [step(model, [model.new_sequence(8)], [row])[0] for row in rows]
    batched = step(model, [model.new_sequence(8) for _ in rows], rows)
    for i, row_logits in enumerate(solo):
        assert np.array_equal(row_logits, batched[i])


def test_int4_decode_alone_in_company_and_beside_free_rows_gives_identical_logits(load_tiny):
    model = load_tiny("int4")
    prompts = [[5, 17, 42, 8], [3, 1], [9, 9, 9]]

    def prefilled() -> list:
        caches = [model.new_sequence(16) for _ in prompts]
        for cache, prompt in zip(caches, prompts, strict=True):
            step(model, [cache], [prompt])
        return caches

    alone = prefilled()
    solo = [step(model, [cache], [[7]], decode=True)[0] for cache in alone]
    solo_two = [step(model, [alone[i]], [[11]], decode=True)[0] for i in (0, 2)]
    caches = prefilled()
    together = step(model, caches, [[7]] * 3, decode=True)
    caches[1].release()  # its row stands free in the next step
    step_two = step(model, [caches[0], caches[2]], [[11], [11]], decode=True)
    for i, expected in enumerate(solo):
        assert np.array_equal(together[i], expected)
    for row, expected in enumerate(solo_two):
        assert np.array_equal(step_two[row], expected)


def test_batched_int4_kernels_are_an_explicit_opt_in(load_tiny):
    model = load_tiny("int4", batch_invariant=False)
    assert not model.pad_single_rows and not model.details["batch_invariant"]


def test_fp32_runs_lone_rows_as_they_are_and_declares_the_backend_tolerance(tiny_fp32):
    assert not tiny_fp32.pad_single_rows
    assert tiny_fp32.logits_atol is None


def test_int4_declares_its_own_looser_tolerance(load_tiny):
    assert load_tiny("int4").logits_atol == pytest.approx(1.5)


def test_a_reference_that_is_not_ours_is_declined_before_options_are_judged():
    spec = LoadSpec(backend="onnx", ref="fake", path=None, bundle=None)
    assert plugin.infer_load(spec, {"vocab_size": 600}) is None


def test_a_bad_batch_invariant_value_is_refused_by_name(tiny_bundle):
    with pytest.raises(infer.InvalidParameterError, match="batch_invariant"):
        plugin.infer_load(load_spec(tiny_bundle), {"batch_invariant": "yes"})
