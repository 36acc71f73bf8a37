"""Write the tiny Llama fixture as a GGUF file, the way llama.cpp's converter lays one out.

:func:`write_family_gguf` does the same for the Gemma 3 and Qwen3 family fixtures, with a
SentencePiece vocabulary. Used by the GGUF-import and pull tests: Q and K rows are permuted into llama.cpp's
interleaved rotary order and matrices are quantized with :func:`gguf.quants.quantize`, so the
importer's un-permutation and dequantization are checked without the 98 MB real model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

DATA = Path(__file__).resolve().parents[3] / "conformance" / "src" / "infer_conformance" / "data"
TINY = DATA / "tiny-llama"
#: SentencePiece's word-boundary mark.
MARK = "\u2581"

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """GGUF tensor name of a Hugging Face tensor name."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, n, rest = hf_name.split(".", 3)
    return f"blk.{n}.{_LAYER[rest]}"


def permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Reorder Q/K rows from the half-split layout into llama.cpp's interleaved pairs."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_sizes(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """The size keys every architecture has, from a Hugging Face config."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])


def round_trip(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """What a tensor becomes after quantizing to ``qtype`` and back (the importer's exact target)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return w
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def write_tiny_gguf(
    path: Path,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    *,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    tied: bool = False,
    edit: Callable[[gguf.GGUFWriter], None] | None = None,
) -> dict[str, np.ndarray]:
    """Write the tiny fixture to ``path``; 2-D weights in ``qtype``, norms in F32.

    Returns the Hugging Face weights the import should reproduce (after the quantization round trip).
    """
    config = json.loads((TINY / "config.json").read_text())
    tok = json.loads((TINY / "tokenizer.json").read_text())
    weights = load_file(TINY / "model.safetensors")
    if tied:
        weights["model.embed_tokens.weight"] = weights.pop("lm_head.weight")

    writer = gguf.GGUFWriter(str(path), arch)
    add_sizes(writer, config)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = tok["model"]["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(json.loads((TINY / "tokenizer_config.json").read_text())["chat_template"])
    if edit is not None:
        edit(writer)

    expected: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        stored = w
        if name.endswith("q_proj.weight"):
            stored = permute_rope(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            stored = permute_rope(w, config["num_key_value_heads"])
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
            expected[name] = round_trip(w, qtype)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(stored, dtype=np.float32))
            expected[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


#: Hugging Face -> GGUF names of the Gemma 3 / Qwen3 layer tensors (llama.cpp's converter).
_FAMILY_LAYER = {
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
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
}
_GEMMA = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_FAMILY_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


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


def write_family_gguf(
    path: Path, fixture: str, arch: str, *, edit: Callable[[gguf.GGUFWriter], None] | None = None
) -> dict[str, np.ndarray]:
    """Write a tiny family fixture as llama.cpp would (Gemma norms stored as 1 + w); return its weights."""
    folder = DATA / fixture
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    gemma = arch in ("gemma2", "gemma3")
    writer = gguf.GGUFWriter(str(path), arch)
    add_sizes(writer, config)
    if "head_dim" in config:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "gemma3":
        writer.add_rope_freq_base(config["rope_parameters"]["full_attention"]["rope_theta"])
        writer.add_sliding_window(config["sliding_window"])
    elif arch == "gemma2":
        writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
        writer.add_sliding_window(config["sliding_window"])
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    else:
        writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    if arch == "phi3":
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        writer.add_rope_dimension_count(int(head_dim * config["rope_parameters"]["partial_rotary_factor"]))
        writer.add_sliding_window(config["sliding_window"])
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
    if edit is not None:
        edit(writer)
    names = _FAMILY_LAYER | (_GEMMA if gemma else {"post_attention_layernorm.weight": "ffn_norm.weight"})
    for name, w in weights.items():
        if name in _FAMILY_GLOBAL:
            gguf_name = _FAMILY_GLOBAL[name]
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
