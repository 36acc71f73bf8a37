"""The numpy reference forward: self-consistency, input checks, variants, and every family's goldens."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from infer.bundle import Bundle
from infer.errors import ContextLengthError, EmptyPromptError, InvalidTokenError
from infer_conformance.fixtures import FAMILY_FIXTURES, GEMMA3_GOLDENS, GOLDENS, SMOLLM2_GOLDENS, TINY_LLAMA
from infer_conformance.reference import ReferenceModel

pytestmark = pytest.mark.unit

Family = tuple[ReferenceModel, dict[str, np.ndarray], dict[str, Any]]

IDS = [5, 77, 300, 12, 12, 250, 3, 99, 180, 41, 7]


@pytest.fixture(scope="module")
def tiny() -> ReferenceModel:
    return ReferenceModel(Bundle.open(TINY_LLAMA))


def variant(
    tmp_path: Path, config: dict[str, object], edit: Callable[[dict[str, np.ndarray]], None] | None = None
) -> Bundle:
    """A copy of the tiny bundle with ``config`` merged into config.json and weights edited in place."""
    out = tmp_path / "variant"
    shutil.copytree(TINY_LLAMA, out)
    cfg = json.loads((out / "config.json").read_text()) | config
    (out / "config.json").write_text(json.dumps(cfg))
    if edit is not None:
        weights = load_file(out / "model.safetensors")
        edit(weights)
        save_file(weights, out / "model.safetensors")
    return Bundle.open(out)


def test_forward_returns_float32_logits_for_every_position(tiny: ReferenceModel) -> None:
    logits = tiny.forward(IDS)
    assert logits.shape == (len(IDS), tiny.vocab_size)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_prefill_then_decode_steps_match_the_full_forward(tiny: ReferenceModel) -> None:
    full = tiny.forward(IDS)
    cache = tiny.new_cache()
    parts = [tiny.step(cache, IDS[:4])] + [tiny.step(cache, [t]) for t in IDS[4:]]
    assert cache.length == len(IDS)
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-5, rtol=0)


def test_a_later_token_does_not_change_earlier_logits(tiny: ReferenceModel) -> None:
    np.testing.assert_allclose(tiny.forward(IDS)[:5], tiny.forward(IDS[:5]), atol=1e-5, rtol=0)


def test_out_of_vocabulary_id_raises_invalid_token_error_with_its_position(tiny: ReferenceModel) -> None:
    with pytest.raises(InvalidTokenError) as info:
        tiny.forward([1, 2, tiny.vocab_size])
    assert info.value.position == 2


def test_no_ids_raise_empty_prompt_error(tiny: ReferenceModel) -> None:
    with pytest.raises(EmptyPromptError):
        tiny.forward([])


def test_running_past_max_positions_raises_context_length_error(tiny: ReferenceModel) -> None:
    cache = tiny.new_cache()
    tiny.step(cache, [3] * tiny.spec.max_position_embeddings)
    with pytest.raises(ContextLengthError):
        tiny.step(cache, [3])


def test_rope_scaling_changes_logits_after_the_first_position(tiny: ReferenceModel, tmp_path: Path) -> None:
    scaled = ReferenceModel(variant(tmp_path, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    a, b = tiny.forward(IDS), scaled.forward(IDS)
    # Position 0 has angle 0 whatever the scaling.
    np.testing.assert_allclose(a[0], b[0], atol=1e-5, rtol=0)
    assert np.abs(a[1:] - b[1:]).max() > 1e-3


def test_tied_head_uses_the_embedding_matrix(tmp_path: Path) -> None:
    def drop_head(w: dict[str, np.ndarray]) -> None:
        del w["lm_head.weight"]

    def copy_embedding_to_head(w: dict[str, np.ndarray]) -> None:
        w["lm_head.weight"] = w["model.embed_tokens.weight"].copy()

    tied = ReferenceModel(variant(tmp_path / "tied", {"tie_word_embeddings": True}, drop_head))
    copied = ReferenceModel(variant(tmp_path / "copied", {}, copy_embedding_to_head))
    assert "lm_head.weight" not in tied.weights
    np.testing.assert_allclose(tied.forward(IDS), copied.forward(IDS), atol=1e-6, rtol=0)


def test_qwen2_qkv_bias_is_added(tiny: ReferenceModel, tmp_path: Path) -> None:
    spec = tiny.spec
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    rng = np.random.default_rng(0)

    def add_bias(scale: float) -> Callable[[dict[str, np.ndarray]], None]:
        def edit(w: dict[str, np.ndarray]) -> None:
            for n in range(spec.num_hidden_layers):
                p = f"model.layers.{n}.self_attn."
                for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                    w[p + name + ".bias"] = (scale * rng.standard_normal(size)).astype(np.float32)

        return edit

    zero = ReferenceModel(variant(tmp_path / "zero", {"model_type": "qwen2"}, add_bias(0.0)))
    np.testing.assert_allclose(zero.forward(IDS), tiny.forward(IDS), atol=1e-5, rtol=0)
    biased = ReferenceModel(variant(tmp_path / "biased", {"model_type": "qwen2"}, add_bias(0.5)))
    assert np.abs(biased.forward(IDS) - tiny.forward(IDS)).max() > 1e-2


FAMILIES = sorted(FAMILY_FIXTURES)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[ReferenceModel, dict[str, np.ndarray], dict[str, Any]]:
    """The reference of one family fixture with its transformers goldens."""
    folder = FAMILY_FIXTURES[request.param]
    npz, meta = GOLDENS / f"{folder.name}.npz", GOLDENS / f"{folder.name}.json"
    if not npz.is_file():
        pytest.skip(f"{npz} not generated yet (tools/py_ref/make_goldens.py)")
    with np.load(npz) as data:
        arrays = dict(data)
    return ReferenceModel(Bundle.open(folder)), arrays, json.loads(meta.read_text())


# float64 against transformers' float32: the goldens' own rounding grows with the logit scale.
GOLDEN_ATOL = 5e-5


def test_full_forward_matches_the_transformers_goldens(family: Family) -> None:
    model, arrays, meta = family
    for n, prompt in enumerate(meta["prompts"]):
        np.testing.assert_allclose(model.forward(prompt["ids"]), arrays[f"full_{n}"], atol=GOLDEN_ATOL, rtol=0)


def test_prefill_and_decode_match_the_transformers_goldens(family: Family) -> None:
    model, arrays, meta = family
    for n, prompt in enumerate(meta["prompts"]):
        ids = prompt["ids"]
        cache = model.new_cache()
        got = [model.step(cache, ids[:-1]), *(model.step(cache, [t]) for t in [ids[-1], *prompt["greedy"][:-1]])]
        np.testing.assert_allclose(got[0], arrays[f"prefill_{n}"], atol=GOLDEN_ATOL, rtol=0)
        np.testing.assert_allclose(np.concatenate(got[1:]), arrays[f"decode_{n}"], atol=GOLDEN_ATOL, rtol=0)


def test_greedy_continuations_match_the_transformers_goldens(family: Family) -> None:
    model, _, meta = family
    for prompt in meta["prompts"]:
        assert model.greedy(prompt["ids"], len(prompt["greedy"])) == prompt["greedy"]


def test_windowed_family_prompts_run_far_past_the_window(family: Family) -> None:
    model, _, meta = family
    windows = [w for w in model.spec.sliding_windows if w is not None]
    if windows:
        assert min(len(p["ids"]) for p in meta["prompts"]) > 3 * max(windows)


def test_chunked_prefill_past_the_window_matches_the_full_forward() -> None:
    model = ReferenceModel(Bundle.open(FAMILY_FIXTURES["gemma3"]))
    ids = [int(t) for t in np.random.default_rng(1).integers(0, model.vocab_size, 70)]
    cache = model.new_cache()
    chunks = [model.step(cache, ids[i : i + 13]) for i in range(0, len(ids), 13)]
    np.testing.assert_allclose(np.concatenate(chunks), model.forward(ids), atol=1e-5, rtol=0)


def test_sliding_window_changes_logits_only_past_the_window(tmp_path: Path) -> None:
    windowed = Bundle.open(FAMILY_FIXTURES["mistral"])
    window = windowed.spec.sliding_windows[0]
    assert window is not None
    out = tmp_path / "unwindowed"
    shutil.copytree(FAMILY_FIXTURES["mistral"], out)
    cfg = json.loads((out / "config.json").read_text()) | {"sliding_window": None}
    (out / "config.json").write_text(json.dumps(cfg))
    ids = [int(t) for t in np.random.default_rng(2).integers(0, windowed.spec.vocab_size, 3 * window)]
    a, b = ReferenceModel(windowed).forward(ids), ReferenceModel(Bundle.open(out)).forward(ids)
    # A query at position p sees `window` keys: up to p = window - 1 that is every key.
    np.testing.assert_allclose(a[:window], b[:window], atol=1e-6, rtol=0)
    assert np.abs(a[window:] - b[window:]).max(axis=-1).min() > 1e-4


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_greedy_matches_the_transformers_golden(tmp_path: Path) -> None:
    gguf = os.environ.get("INFER_SMOLLM2_GGUF")
    if not gguf:
        pytest.skip("set INFER_SMOLLM2_GGUF to the SmolLM2-135M-Instruct GGUF file to run")
    from infer.gguf_import import import_gguf

    golden = json.loads(SMOLLM2_GOLDENS.read_text())["cases"][0]
    model = ReferenceModel(Bundle.open(import_gguf(gguf, tmp_path / "smollm2")))
    assert model.greedy(golden["prompt_ids"], 8) == golden["greedy_ids"][:8]


@pytest.mark.slow
@pytest.mark.e2e
def test_gemma3_270m_greedy_matches_the_transformers_golden(tmp_path: Path) -> None:
    gguf = os.environ.get("INFER_GEMMA3_GGUF")
    if not gguf:
        pytest.skip("set INFER_GEMMA3_GGUF to the Gemma 3 270M Q4_K_M GGUF file to run")
    from infer.gguf_import import import_gguf

    golden = json.loads(GEMMA3_GOLDENS.read_text())["cases"][0]
    model = ReferenceModel(Bundle.open(import_gguf(gguf, tmp_path / "gemma3")))
    assert model.greedy(golden["prompt_ids"], 8) == golden["greedy_ids"][:8]
