"""Contract 1.3 draft steps on ONNX: a second graph of the same weights at a lower precision,
run on the model's own KV blocks and thread pool, whose writes verification erases."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_helpers import PROMPT, Loader, load_spec, step

import infer
from infer.contract import Batch, token_rows
from infer_backend_onnx import plugin

pytestmark = pytest.mark.unit

DRAFTED = [33, 120, 5, 77]


def _prefilled(model, tokens):
    cache = model.new_sequence(64)
    step(model, [cache], [tokens])
    return cache


def test_a_model_with_a_draft_graph_declares_draft_steps(load_tiny: Loader) -> None:
    model = load_tiny("fp32", draft="int4")
    assert model.capabilities is None or infer.Capability.DRAFT in model.capabilities
    assert model.details["draft"] == "int4"
    cache = _prefilled(model, PROMPT)
    logits = plugin.infer_draft(model, Batch((cache,), token_rows([[DRAFTED[0]]])))
    assert logits.shape == (1, model.vocab_size)
    assert np.isfinite(logits).all()
    assert cache.length == len(PROMPT) + 1


def test_verifying_drafted_positions_erases_the_draft_graphs_writes_bit_for_bit(load_tiny: Loader) -> None:
    model = load_tiny("fp32", draft="int4")
    clean = _prefilled(model, PROMPT)
    expected = plugin.infer_prefill_all(model, Batch((clean,), token_rows([DRAFTED])))
    expected_next = step(model, [clean], [[9]], decode=True)
    drafted = _prefilled(model, PROMPT)
    for token in DRAFTED:
        plugin.infer_draft(model, Batch((drafted,), token_rows([[token]])))
    plugin.infer_truncate(model, drafted, len(PROMPT))
    got = plugin.infer_prefill_all(model, Batch((drafted,), token_rows([DRAFTED])))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(step(model, [drafted], [[9]], decode=True), expected_next)


def test_draft_logits_differ_from_the_models_as_a_lower_precision_does(load_tiny: Loader) -> None:
    model = load_tiny("fp32", draft="int4")
    exact = _prefilled(model, PROMPT)
    approx = _prefilled(model, PROMPT)
    full = step(model, [exact], [[DRAFTED[0]]], decode=True)
    draft = plugin.infer_draft(model, Batch((approx,), token_rows([[DRAFTED[0]]])))
    assert not np.array_equal(full, draft), "the draft step ran the model's own graph"
    assert np.abs(full - draft).max() < 1.5  # int4's declared tolerance


def test_a_model_without_a_draft_graph_lacks_draft_steps_and_says_how_to_get_them(load_tiny: Loader) -> None:
    model = load_tiny("fp32")
    assert infer.Capability.DRAFT not in model.capabilities
    assert infer.Capability.ALL_LOGITS in model.capabilities
    cache = _prefilled(model, PROMPT)
    with pytest.raises(infer.BackendError, match="draft='native' or 'int4'"):
        plugin.infer_draft(model, Batch((cache,), token_rows([[1]])))


@pytest.mark.parametrize(
    ("dtype", "draft", "reason"),
    [
        ("fp32", "int8", "none, native or int4"),
        ("int4", "int4", "below the model's own precision"),
        ("fp32", "native", "native drafts read a GGUF"),
    ],
)
def test_a_draft_that_cannot_be_built_is_refused_with_the_reason(tiny_bundle, build_dir, dtype, draft, reason) -> None:
    with pytest.raises(infer.InvalidParameterError, match=reason):
        plugin.infer_load(load_spec(tiny_bundle, dtype=dtype), {"cache_dir": build_dir, "threads": 1, "draft": draft})


def test_a_drafted_model_is_one_session_whose_graph_takes_a_use_draft_input(load_tiny: Loader) -> None:
    drafted = load_tiny("fp32", draft="int4")
    assert drafted.drafted
    assert "use_draft" in {i.name for i in drafted.session.get_inputs()}
    assert "+draft-int4" in drafted.details["graph"]
    plain = load_tiny("fp32")
    assert not plain.drafted
    assert "use_draft" not in {i.name for i in plain.session.get_inputs()}


def test_the_models_own_steps_in_a_drafted_graph_equal_a_graph_without_a_draft(load_tiny: Loader) -> None:
    drafted, plain = load_tiny("fp32", draft="int4"), load_tiny("fp32")
    a, b = _prefilled(drafted, PROMPT), _prefilled(plain, PROMPT)
    np.testing.assert_array_equal(
        plugin.infer_prefill_all(drafted, Batch((a,), token_rows([DRAFTED]))),
        plugin.infer_prefill_all(plain, Batch((b,), token_rows([DRAFTED]))),
    )
    np.testing.assert_array_equal(step(drafted, [a], [[9]], decode=True), step(plain, [b], [[9]], decode=True))
