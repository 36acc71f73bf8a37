"""GGUF import of the families beyond Llama: Gemma 3 and Qwen3 layouts, SentencePiece vocabularies,
and the architecture check that comes before the vocabulary is parsed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_gguf import DATA, MARK, write_family_gguf
from tokenizers import Tokenizer

from infer.bundle import Bundle
from infer.errors import ModelFormatError, UnsupportedModelError
from infer.gguf_import import import_gguf

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("fixture", "arch"),
    [("tiny-gemma3", "gemma3"), ("tiny-gemma2", "gemma2"), ("tiny-qwen3", "qwen3"), ("tiny-phi3", "phi3")],
)
def test_family_gguf_imports_to_the_hugging_face_weights_and_spec(tmp_path: Path, fixture: str, arch: str) -> None:
    expected = write_family_gguf(tmp_path / "m.gguf", fixture, arch)
    bundle = Bundle.open(import_gguf(tmp_path / "m.gguf", tmp_path / "out"))
    original = Bundle.open(DATA / fixture).spec
    assert set(bundle.weights) == set(expected)
    for name, w in expected.items():
        np.testing.assert_allclose(bundle.weights[name], w, atol=1e-6, rtol=0, err_msg=name)
    s = bundle.spec
    # Windows and query scale follow llama.cpp's constants (checked below), not the fixture's config.
    ignored = {"sliding_window", "local_rope", "attention_scale"}
    assert s.features() - ignored == original.features() - ignored
    same = ("hidden_size", "head_dim", "num_key_value_heads", "qk_norm", "norm_offset", "hidden_act", "attention_bias")
    same += ("rotary_dim", "fused_projections", "attention_softcap", "final_softcap")
    assert all(getattr(s, f) == getattr(original, f) for f in same)


def test_gemma3_gguf_gets_llama_cpp_window_pattern_local_base_and_query_scale(tmp_path: Path) -> None:
    write_family_gguf(tmp_path / "m.gguf", "tiny-gemma3", "gemma3")
    config = json.loads((import_gguf(tmp_path / "m.gguf", tmp_path / "out") / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert (config["sliding_window"], config["sliding_window_pattern"]) == (16, 6)
    assert config["rope_local_base_freq"] == 10000.0 and config["rope_theta"] == 1000000.0
    # llama.cpp scales queries by 1/sqrt(head_dim) below 27B, whatever the original scalar was.
    assert config["query_pre_attn_scalar"] == config["head_dim"]


def test_sentencepiece_tokens_merge_in_piece_order_and_fall_back_to_bytes(tmp_path: Path) -> None:
    write_family_gguf(tmp_path / "m.gguf", "tiny-qwen3", "qwen3")
    tok = Tokenizer.from_file(str(import_gguf(tmp_path / "m.gguf", tmp_path / "out") / "tokenizer.json"))
    # add_space_prefix: "the" is "▁the", one piece; bos comes first.
    assert [tok.id_to_token(i) for i in tok.encode("the world").ids] == ["<bos>", MARK + "the", MARK + "world"]
    # "é" is not a piece: its two UTF-8 bytes are.
    assert [tok.id_to_token(i) for i in tok.encode("é", add_special_tokens=False).ids] == [
        MARK,
        "<0xC3>",
        "<0xA9>",
    ]
    for text in ["hello world", "Café?  Ok\n\nthe end 42", "tabs\tand ünïcödé 🙂"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text


def test_gemma_style_vocabulary_adds_no_prefix_and_matches_space_runs_whole(tmp_path: Path) -> None:
    write_family_gguf(tmp_path / "m.gguf", "tiny-gemma3", "gemma3")
    tok = Tokenizer.from_file(str(import_gguf(tmp_path / "m.gguf", tmp_path / "out") / "tokenizer.json"))
    pieces = [tok.id_to_token(i) for i in tok.encode("hello   world\n\nthe", add_special_tokens=False).ids]
    assert pieces == ["hello", "   ", "w", "or", "ld", "\n\n", "t", "he"]


def test_unsupported_architecture_is_refused_before_the_vocabulary_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_family_gguf(tmp_path / "m.gguf", "tiny-qwen3", "gptneox")

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole file was parsed")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", no_parse)
    with pytest.raises(UnsupportedModelError, match="architecture 'gptneox'"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.e2e
def test_gemma3_270m_tokenizer_matches_transformers_ids_and_round_trips(tmp_path: Path) -> None:
    path = os.environ.get("INFER_GEMMA3_GGUF")
    if not path:
        pytest.skip("set INFER_GEMMA3_GGUF to the Gemma 3 270M Q4_K_M GGUF file to run")
    golden = json.loads((DATA / "goldens" / "gemma3-270m.json").read_text())
    bundle = Bundle.open(import_gguf(path, tmp_path / "gemma3"))
    assert bundle.chat_template is None and bundle.eos_token_ids[0] == 1
    tok = Tokenizer.from_file(str(bundle.tokenizer_path))
    for case in golden["tokenizer_cases"]:
        ids = tok.encode(case["text"], add_special_tokens=False).ids
        assert ids == case["ids"], case["text"]
        assert tok.decode(ids, skip_special_tokens=False) == case["text"]
    for case in golden["cases"]:
        assert tok.encode(case["prompt"]).ids == case["prompt_ids"]


def llama3_divisors(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3.1+ (bands 1 and 4 of 8192)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, factor, mid)).astype(np.float32)


def test_llama3_rope_freqs_become_the_llama3_scaling_they_encode(tmp_path: Path) -> None:
    from tiny_gguf import write_tiny_gguf

    divisors = llama3_divisors(10000.0, 16, 8.0)
    assert 1.0 < divisors[6] < 8.0 and divisors[0] == 1.0 and divisors[-1] == 8.0  # all three bands present
    write_tiny_gguf(tmp_path / "m.gguf", edit=lambda w: w.add_tensor("rope_freqs.weight", divisors))
    bundle = Bundle.open(import_gguf(tmp_path / "m.gguf", tmp_path / "out"))
    assert bundle.spec.rope_scaling is not None and bundle.spec.rope_scaling["rope_type"] == "llama3"
    plain = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(bundle.spec.rope_inv_freq(), plain / divisors, rtol=1e-6)
    assert "rope_freqs.weight" not in bundle.weights


def test_rope_freqs_following_another_rule_are_refused_by_name(tmp_path: Path) -> None:
    from tiny_gguf import write_tiny_gguf

    odd = np.linspace(1.0, 3.0, 8, dtype=np.float32)
    write_tiny_gguf(tmp_path / "m.gguf", edit=lambda w: w.add_tensor("rope_freqs.weight", odd))
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_phi3_longrope_factors_import_as_longrope(tmp_path: Path) -> None:
    short, long = np.linspace(1, 2, 8, dtype=np.float32), np.linspace(1, 9, 8, dtype=np.float32)

    def add_longrope(w: gguf.GGUFWriter) -> None:
        w.add_tensor("rope_factors_short.weight", short)
        w.add_tensor("rope_factors_long.weight", long)
        w.add_rope_scaling_orig_ctx_len(128)
        w.add_rope_scaling_attn_factors(1.25)

    write_family_gguf(tmp_path / "m.gguf", "tiny-phi3", "phi3", edit=add_longrope)
    bundle = Bundle.open(import_gguf(tmp_path / "m.gguf", tmp_path / "out"))
    scaling = bundle.spec.rope_scaling
    assert scaling is not None and scaling["rope_type"] == "longrope"
    np.testing.assert_allclose(scaling["long_factor"], long)
    assert (bundle.spec.max_position_embeddings, bundle.spec.rope_attention_factor()) == (128, 1.25)
    plain = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(bundle.spec.rope_inv_freq(), plain / short, rtol=1e-6)


def test_longrope_with_one_factor_tensor_missing_is_a_format_error(tmp_path: Path) -> None:
    from tiny_gguf import write_tiny_gguf

    factors = np.ones(8, dtype=np.float32)
    write_tiny_gguf(tmp_path / "m.gguf", edit=lambda w: w.add_tensor("rope_factors_long.weight", factors))
    with pytest.raises(ModelFormatError, match="LongRoPE needs both"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out")
