"""GGUF import of the families beyond Llama: Gemma 3 and Qwen3 layouts, SentencePiece vocabularies,
and the architecture check that comes before the vocabulary is parsed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_gguf import add_sizes
from tokenizers import Tokenizer

from infer.bundle import Bundle
from infer.errors import UnsupportedModelError
from infer.gguf_import import import_gguf

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[3] / "conformance" / "src" / "infer_conformance" / "data"
MARK = "\u2581"

#: Hugging Face -> GGUF names of the Gemma 3 / Qwen3 layer tensors (llama.cpp's converter).
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GEMMA = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def sentencepiece_vocab(size: int) -> tuple[list[str], list[int]]:
    """A SentencePiece-style vocabulary of ``size`` pieces in merge-rank order, with llama.cpp types.

    Control tokens, the 256 byte pieces, single characters, a few multi-character pieces
    (ranked so that "▁th" + "e" beats "▁t" + "he"), and user-defined runs of spaces/newlines.
    """
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [3, 3, 3, 3]
    tokens += ["  ", "   ", "\n", "\n\n"]
    types += [4, 4, 4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = [MARK, *"etaoinshrdlucmfwypvbgkqjxz", *"TAOISHWC.,?!0123456789"]
    pieces += [MARK + "t", MARK + "th", "he", MARK + "the", "in", MARK + "a", "an", "nd", MARK + "and", "er", "on"]
    pieces += [MARK + "w", "or", MARK + "wor", "ld", "rld", MARK + "world", "ll", "lo", "llo", "he", "hello"]
    pieces = list(dict.fromkeys(pieces))
    filler = [f"{a}{b}{c}" for a in "xyzq" for b in "xyzqjk" for c in "xyzqjk"]
    pieces += [p for p in filler if p not in pieces][: size - len(tokens) - len(pieces)]
    tokens += pieces
    types += [1] * len(pieces)
    assert len(tokens) == size
    return tokens, types


def write_family_gguf(path: Path, fixture: str, arch: str) -> dict[str, np.ndarray]:
    """Write a tiny family fixture as llama.cpp would (Gemma norms stored as 1 + w); return its weights."""
    folder = DATA / fixture
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    gemma = arch == "gemma3"
    writer = gguf.GGUFWriter(str(path), arch)
    add_sizes(writer, config)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    if gemma:
        writer.add_rope_freq_base(config["rope_parameters"]["full_attention"]["rope_theta"])
        writer.add_sliding_window(config["sliding_window"])
    else:
        writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    tokens, types = sentencepiece_vocab(config["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(not gemma)
    names = _LAYER | (_GEMMA if gemma else {"post_attention_layernorm.weight": "ffn_norm.weight"})
    for name, w in weights.items():
        if name in _GLOBAL:
            gguf_name = _GLOBAL[name]
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, n, rest = name.split(".", 3)
            gguf_name = f"blk.{n}.{names[rest]}"
        stored = w + 1 if gemma and name.endswith("norm.weight") else w
        writer.add_tensor(gguf_name, np.ascontiguousarray(stored, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.mark.parametrize(("fixture", "arch"), [("tiny-gemma3", "gemma3"), ("tiny-qwen3", "qwen3")])
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
