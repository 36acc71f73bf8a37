"""Import a GGUF file into a Hugging Face-layout bundle that :class:`infer.bundle.Bundle` opens.

What the import does:

* ``config.json`` from the GGUF metadata (``llama``, ``qwen2``, ``qwen3``, ``gemma2``,
  ``gemma3`` and ``phi3`` architectures; Llama 3.1+ ``rope_freqs`` become their llama3 scaling; the
  architecture is read from the file header before the rest is parsed);
* no weight file: the tensors stay in the GGUF (moved, hard-linked or referred to, see
  :func:`import_gguf`), and ``gguf_tensors.json`` records where each lives, its quant type and
  shape, whether the rotary permutation llama.cpp applies to the Q and K projections of
  ``llama`` models must be undone, and what to add back to Gemma's norms (stored as 1 + w);
  :mod:`infer.gguf_tensors` reads them in place, raw or dequantized one at a time (the earlier
  float32 copy made a 98 MB Q4_1 file a 517 MB bundle);
* ``tokenizer.json`` built with ``tokenizers`` from the vocabulary and merges (gpt2-style
  byte-level BPE, with the pre-tokenizer split the GGUF's ``tokenizer.ggml.pre`` names) or from
  a llama-style SentencePiece vocabulary (merges rebuilt from the piece order, byte fallback,
  the prefix space when ``add_space_prefix`` asks for it),
  ``tokenizer_config.json`` with the chat template and special tokens, and
  ``generation_config.json`` with the bos/eos/pad ids.

The bundle is written into a temporary sibling folder and renamed into place, so a crash or
an error never leaves a half-written bundle at ``out_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infer.errors import ModelError, ModelFormatError, ModelNotFoundError, UnsupportedModelError
from infer.gguf_tensors import write_manifest

if TYPE_CHECKING:
    from gguf import GGUFReader
    from tokenizers import Tokenizer

__all__ = ["import_gguf"]

#: Name of the GGUF file inside a bundle that holds it.
GGUF_NAME = "model.gguf"

#: GGUF architectures the registry (:mod:`infer.arch`) runs, with their config ``model_type``.
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}

#: Their ``architectures`` entry in config.json.
_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

#: llama.cpp's Gemma 3 constants that the GGUF does not store: one global layer in six, and the
#: RoPE base of the sliding-window layers.
_GEMMA3_PATTERN, _GEMMA3_LOCAL_BASE = 6, 10000.0
#: Layers of the 27B models, which llama.cpp scales queries by 1/sqrt(hidden / heads) instead
#: of 1/sqrt(head_dim) (their query_pre_attn_scalar).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

#: Per-layer GGUF tensor suffixes and their Hugging Face names.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer splits by ``tokenizer.ggml.pre``: the regular expressions the vocabularies were
# trained with. "gpt2" is the byte-level default; "digits" splits every digit first.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, str] = {
    "default": "gpt2",
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "jais": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "command-r": "digits",
    "codeshell": "digits",
    "exaone": "digits",
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}

#: Gemma's names where they differ: its ``ffn_norm`` is the norm in front of the MLP, and it has
#: norms after attention and after the MLP.
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}

#: Phi-3's fused matrices: ``attn_qkv`` (q, k, v rows) and ``ffn_up`` holding gate and up rows.
_PHI3_LAYER_NAMES = _LAYER_NAMES | {
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",
}

#: Hugging Face special-token id keys and the GGUF metadata keys holding them.
_SPECIAL_IDS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "padding_token_id",
    "unk_token_id": "unknown_token_id",
}

# llama.cpp token types: 1 = normal, 3 = control (special), 4 = user-defined (added, not
# special), 6 = byte (SentencePiece's <0xNN> fallback pieces).
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6

#: SentencePiece's word-boundary mark, which stands for a space inside pieces.
_SPACE_MARK = "\u2581"


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    move: bool = False,
) -> Path:
    """Import the GGUF file at ``gguf_path`` as a bundle folder at ``out_dir``; return ``out_dir``.

    The weights stay in the GGUF: with ``move`` the file is moved into the bundle (``model.gguf``;
    for a file the caller extracted and would delete); otherwise it is hard-linked there, or,
    where the file system cannot link, referred to by its absolute path (the bundle then needs
    the file to stay where it is, and says so when it is gone).
    ``progress(done, total)`` is called after each tensor is located, when given.

    ``out_dir`` must not exist, be empty, or hold an earlier bundle (which is replaced whole).
    Raises :class:`~infer.errors.ModelNotFoundError` when the file is missing,
    :class:`~infer.errors.ModelFormatError` when it is not a readable GGUF or lacks required
    metadata, and :class:`~infer.errors.UnsupportedModelError` for an architecture, tensor type
    or tokenizer the importer does not handle.
    """
    source, out = Path(gguf_path), Path(out_dir)
    if not source.is_file():
        raise ModelNotFoundError(f"GGUF file {str(source)!r} does not exist", path=source)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").is_file())):
        raise ModelError(
            f"{str(out)!r} exists and is not a model bundle; give a new or empty folder to import into", path=out
        )
    _check_architecture(source)
    reader = _open(source)
    meta = _Metadata(reader, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        tensors = _locate_tensors(reader, meta, progress)
        config = _config(
            meta, tied="lm_head.weight" not in tensors, biased="model.layers.0.self_attn.o_proj.bias" in tensors
        )
        _write_bundle(tmp, meta, config, tensors, move=move)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_architecture(source: Path) -> None:
    """Refuse an unsupported architecture from the file header, before the vocabulary is parsed.

    ``GGUFReader`` parses every metadata value when it opens a file (seconds for a 262k-token
    vocabulary); ``general.architecture`` comes first in files llama.cpp writes, so reading keys
    up to it costs microseconds. Files where it comes later are checked after the full parse.
    """
    import struct

    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    try:
        with source.open("rb") as f:
            magic, _version, _tensors, count = struct.unpack("<4sIQQ", f.read(24))
            if magic != b"GGUF":
                return  # _open reports the format error
            for _ in range(min(count, 8)):
                (length,) = struct.unpack("<Q", f.read(8))
                key = f.read(length).decode("utf-8", "replace")
                (kind,) = struct.unpack("<I", f.read(4))
                if kind == 8:
                    (size,) = struct.unpack("<Q", f.read(8))
                    value = f.read(size)
                    if key == "general.architecture":
                        arch = value.decode("utf-8", "replace")
                        if arch not in ARCHITECTURES:
                            raise UnsupportedModelError(
                                f"{source.name}: GGUF architecture {arch!r} is not supported; "
                                f"supported: {', '.join(ARCHITECTURES)}",
                                path=source,
                            )
                        return
                elif kind in scalar:
                    f.seek(scalar[kind], 1)
                else:
                    return  # an array before the architecture: leave it to the full parse
    except (struct.error, OSError):
        return  # truncated or unreadable: _open says so with the reader's own message


def _open(source: Path) -> GGUFReader:
    from gguf import GGUFReader

    try:
        return GGUFReader(source)
    except (ValueError, OSError, KeyError, IndexError, TypeError) as exc:
        raise ModelFormatError(
            f"{source.name} is not a readable GGUF file (corrupt or truncated): {exc}", path=source
        ) from exc


class _Metadata:
    """Typed access to the GGUF key/value metadata, with errors naming the file and key."""

    def __init__(self, reader: GGUFReader, source: Path) -> None:
        self.reader, self.source = reader, source
        arch = self.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source.name}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}",
                path=source,
            )
        self.arch: str = arch

    def get(self, key: str, default: Any = ...) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ModelFormatError(f"{self.source.name}: GGUF metadata {key!r} is missing", path=self.source)
            return default
        return field.contents()

    def arch_get(self, key: str, default: Any = ...) -> Any:
        return self.get(f"{self.arch}.{key}", default)


def _locate_tensors(
    reader: GGUFReader, meta: _Metadata, progress: Callable[[int, int], None] | None
) -> dict[str, dict[str, Any]]:
    """Manifest entries (see :func:`infer.gguf_tensors.write_manifest`) by Hugging Face name.

    Nothing is converted: each tensor is checked to be one :mod:`gguf` can dequantize (its first
    row is, which is cheap), so an unreadable type fails the import rather than a later load.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    heads = int(meta.arch_get("attention.head_count"))
    kv_heads = int(meta.arch_get("attention.head_count_kv", heads))
    entries: dict[str, dict[str, Any]] = {}
    for done, tensor in enumerate(reader.tensors, 1):
        if progress is not None:
            progress(done, len(reader.tensors))
        name = _hf_name(tensor.name, meta)
        if name is None:
            continue
        qtype = GGMLQuantizationType(tensor.tensor_type)
        # GGUF lists dimensions fastest-first; numpy wants them the other way round.
        shape = [int(d) for d in reversed(tensor.shape.tolist())]
        nbytes = int(tensor.n_bytes)
        try:
            dequantize(tensor.data[:1] if tensor.data.ndim > 1 else tensor.data, qtype)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"{meta.source.name}: tensor {tensor.name!r} has type {qtype.name}, which cannot be dequantized: {exc}",
                path=meta.source,
            ) from exc
        rope_heads = 0
        if meta.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            rope_heads = heads
        elif meta.arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            rope_heads = kv_heads
        entries[name] = {
            "gguf_name": tensor.name,
            "type": qtype.name,
            "shape": shape,
            "offset": int(tensor.data_offset),
            "nbytes": nbytes,
            "rope_heads": rope_heads,
        }
        if meta.arch in _GEMMA_27B_LAYERS and name.endswith("norm.weight"):
            # Gemma norms compute x * (1 + w); llama.cpp's converter stores 1 + w.
            entries[name]["add"] = -1.0
    if "model.embed_tokens.weight" not in entries:
        raise ModelFormatError(f"{meta.source.name}: tensor 'token_embd.weight' is missing", path=meta.source)
    return entries


def _hf_name(name: str, meta: _Metadata) -> str | None:
    """Hugging Face name of GGUF tensor ``name``; ``None`` for tensors the bundle does not need."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name == "rope_freqs.weight":
        return None  # read by _config: it becomes the llama3 rope scaling it was computed from
    if name in _LONGROPE_TENSORS:
        return None  # read by _config: the LongRoPE factors of the 128k-context Phi-3 models
    names = {"gemma2": _GEMMA_LAYER_NAMES, "gemma3": _GEMMA_LAYER_NAMES, "phi3": _PHI3_LAYER_NAMES}.get(
        meta.arch, _LAYER_NAMES
    )
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}"
    raise UnsupportedModelError(
        f"{meta.source.name}: tensor {name!r} has no place in a {meta.arch} bundle", path=meta.source
    )


def _config(meta: _Metadata, *, tied: bool, biased: bool = False) -> dict[str, Any]:
    heads = int(meta.arch_get("attention.head_count"))
    hidden = int(meta.arch_get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens")
    head_dim = int(meta.arch_get("attention.key_length", hidden // heads))
    config: dict[str, Any] = {
        "architectures": [_CLASSES[meta.arch]],
        "model_type": ARCHITECTURES[meta.arch],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch_get("feed_forward_length")),
        "num_hidden_layers": int(meta.arch_get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.arch_get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.arch_get("context_length")),
        "rms_norm_eps": _float32(meta.arch_get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(meta.arch_get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        # q/k/v/o biases (qwen2 has q/k/v biases whatever this says).
        "attention_bias": biased,
        "vocab_size": int(meta.arch_get("vocab_size", len(tokens))),
        "torch_dtype": "float32",
    }
    config["rope_scaling"] = _rope_scaling(meta, config["rope_theta"], head_dim)
    rope_dims = int(meta.arch_get("rope.dimension_count", head_dim))
    if meta.arch == "phi3":
        window = meta.arch_get("attention.sliding_window", None)
        # Phi-3 derives head_dim from hidden_size and rotates a share of it.
        config |= {
            "partial_rotary_factor": rope_dims / head_dim,
            "sliding_window": None if window is None else int(window),
        }
    elif rope_dims != head_dim:
        raise UnsupportedModelError(
            f"{meta.source.name}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported "
            f"for GGUF architecture {meta.arch!r}",
            path=meta.source,
        )
    if meta.arch in _GEMMA_27B_LAYERS:
        # Gemma names its activation hidden_activation.
        config = {k: v for k, v in config.items() if k != "hidden_act"} | _gemma_config(meta, config)
    for key, gguf_key in _SPECIAL_IDS.items():
        value = meta.get(f"tokenizer.ggml.{gguf_key}", None)
        if value is not None and key != "unk_token_id":
            config[key] = int(value)
    return config


def _gemma_config(meta: _Metadata, config: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 2 / 3 keys beyond the Llama ones, with llama.cpp's values where the GGUF is silent."""
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    scalar = config["hidden_size"] // heads if layers == _GEMMA_27B_LAYERS[meta.arch] else config["head_dim"]
    window = meta.arch_get("attention.sliding_window", None)
    gemma: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": None if window is None else int(window),
        "attn_logit_softcapping": meta.arch_get("attn_logit_softcapping", None),
        "final_logit_softcapping": meta.arch_get("final_logit_softcapping", None),
    }
    if meta.arch == "gemma3":
        gemma |= {"sliding_window_pattern": _GEMMA3_PATTERN, "rope_local_base_freq": _GEMMA3_LOCAL_BASE}
    else:
        # Gemma 2 alternates local and global layers, starting local (the registry's default).
        gemma["layer_types"] = [("sliding_attention" if n % 2 == 0 else "full_attention") for n in range(layers)]
    return gemma


def _float32(value: Any) -> float:
    """A GGUF float32 as the shortest decimal that reads back to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


#: The llama3 RoPE scaling parameters of Llama 3.1, 3.2 and 3.3 (only ``factor`` differs), tried
#: against a file's ``rope_freqs.weight``.
_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_freqs_scaling(meta: _Metadata, theta: float, head_dim: int) -> dict[str, Any] | None:
    """The llama3 scaling that ``rope_freqs.weight`` (per-frequency divisors) was computed from.

    llama.cpp's converter stores Llama 3.1+ scaling only as these divisors; they are matched
    against llama3's rule with Meta's published band parameters and the largest divisor as the
    factor, and refused by name when they follow another rule.
    """
    from infer.arch.spec import rope_inv_freq

    tensor = next((t for t in meta.reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    divisors = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    scaling = {"rope_type": "llama3", "factor": _float32(divisors.max()), **_LLAMA3_SCALING}
    plain = rope_inv_freq(theta, head_dim, None)
    if divisors.shape != plain.shape or not np.allclose(
        plain / rope_inv_freq(theta, head_dim, scaling), divisors, rtol=1e-5
    ):
        raise UnsupportedModelError(
            f"{meta.source.name}: rope_freqs.weight holds per-frequency factors that do not follow Llama 3's "
            f"rule (factor {scaling['factor']}, bands {_LLAMA3_SCALING}); such RoPE scaling is not supported",
            path=meta.source,
        )
    return scaling


#: LongRoPE's per-frequency factors as llama.cpp stores them, by their config.json key.
_LONGROPE_TENSORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}


def _longrope_scaling(meta: _Metadata) -> dict[str, Any] | None:
    """LongRoPE from ``rope_factors_short/long.weight`` and the ``rope.scaling.*`` keys, if present."""
    found = {t.name: t for t in meta.reader.tensors if t.name in _LONGROPE_TENSORS}
    if not found:
        return None
    if len(found) != len(_LONGROPE_TENSORS):
        raise ModelFormatError(
            f"{meta.source.name}: LongRoPE needs both {' and '.join(_LONGROPE_TENSORS)}", path=meta.source
        )
    scaling: dict[str, Any] = {"rope_type": "longrope"}
    for name, key in _LONGROPE_TENSORS.items():
        scaling[key] = [_float32(f) for f in np.asarray(found[name].data, dtype=np.float32).reshape(-1)]
    scaling["original_max_position_embeddings"] = int(meta.arch_get("rope.scaling.original_context_length"))
    attention = meta.arch_get("rope.scaling.attn_factor", None)
    if attention is not None:
        scaling["attention_factor"] = _float32(attention)
    return scaling


def _rope_scaling(meta: _Metadata, theta: float, head_dim: int) -> dict[str, Any] | None:
    longrope = _longrope_scaling(meta)
    if longrope is not None:
        return longrope
    from_freqs = _rope_freqs_scaling(meta, theta, head_dim)
    if from_freqs is not None:
        return from_freqs
    kind = meta.arch_get("rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    if kind != "linear":
        raise UnsupportedModelError(f"{meta.source.name}: rope scaling {kind!r} is not supported", path=meta.source)
    return {"rope_type": "linear", "factor": _float32(meta.arch_get("rope.scaling.factor"))}


def _write_bundle(
    folder: Path, meta: _Metadata, config: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Any]], *, move: bool
) -> None:
    tokenizer, special = _tokenizer(meta)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {k: config[k] for k in ("bos_token_id", "pad_token_id") if k in config}
    eos = [config["eos_token_id"]] if "eos_token_id" in config else []
    eot = meta.get("tokenizer.ggml.eot_token_id", None)
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    if eos:
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template", None)
    if template is not None:
        tokenizer_config["chat_template"] = str(template)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    size = meta.source.stat().st_size
    write_manifest(folder, _place_gguf(meta.source, folder, move=move), size, tensors)


def _place_gguf(source: Path, folder: Path, *, move: bool) -> str:
    """Put the GGUF where the bundle finds it; return what the manifest records (a name or a path)."""
    inside = folder / GGUF_NAME
    if move:
        os.replace(source, inside)
        return GGUF_NAME
    try:
        # A hard link costs no disk and survives the user deleting their copy.
        os.link(source, inside)
    except OSError:
        return str(source.resolve())
    return GGUF_NAME


def _tokenizer(meta: _Metadata) -> tuple[Tokenizer, dict[str, str]]:
    """The ``tokenizers.Tokenizer`` the GGUF describes and the special-token strings for tokenizer_config.json."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_tokenizer(meta)
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{meta.source.name}: tokenizer model {kind!r} is not supported (gpt2-style byte-level BPE and "
            "llama-style SentencePiece are); use a Hugging Face model folder with tokenizer.json instead",
            path=meta.source,
        )
    return _byte_level_tokenizer(meta)


def _byte_level_tokenizer(meta: _Metadata) -> tuple[Tokenizer, dict[str, str]]:
    """A gpt2-style byte-level BPE tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    split = _PRE_TOKENIZERS.get(pre)
    if split is None:
        raise UnsupportedModelError(
            f"{meta.source.name}: pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(_PRE_TOKENIZERS))}",
            path=meta.source,
        )
    tokens, types = _vocabulary(meta)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    vocab = _token_ids(tokens, meta)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel
    if split == "gpt2":
        tok.pre_tokenizer = byte_level(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level(add_prefix_space=False, use_regex=True)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                byte_level(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    special = _added_tokens(tok, tokens, types, meta)
    bos = _bos_template(special, vocab, meta)
    level = processors.ByteLevel(trim_offsets=False)
    tok.post_processor = level if bos is None else processors.Sequence([level, bos])
    return tok, special


def _sentencepiece_tokenizer(meta: _Metadata) -> tuple[Tokenizer, dict[str, str]]:
    """A llama-style SentencePiece BPE vocabulary (Llama 2, Mistral, Phi-3, Gemma) as a ``tokenizers`` BPE.

    SentencePiece BPE merges the adjacent pair whose joined piece ranks best; the GGUF keeps the
    pieces in that rank order (Gemma's scores do not follow it, the order does), so the merges
    are every split of each piece into two pieces of the vocabulary, in the order of the joined
    piece. Unknown characters fall back to the ``<0xNN>`` byte pieces; a space is the piece
    mark, and ``add_space_prefix`` puts one in front of the text as SentencePiece does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Gemma's runs of spaces and newlines are user-defined pieces spelled as in the text (real
    # spaces): added tokens match them whole in the raw text, before the normalizer marks spaces.
    tokens, types = _vocabulary(meta)
    vocab = _token_ids(tokens, meta)
    merges: list[tuple[str, str]] = []
    for piece, kind in zip(tokens, types, strict=True):
        if kind != _NORMAL or len(piece) < 2:
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", None)
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # Metaspace marks spaces and, like SentencePiece, puts the prefix mark before the start of
    # the text only, not after every added token that splits it.
    scheme = "first" if prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(_SPACE_MARK, prepend_scheme=scheme, split=False)
    steps: list[Any] = [decoders.Replace(_SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    special = _added_tokens(tok, tokens, types, meta)
    tok.post_processor = _bos_template(special, vocab, meta)
    return tok, special


def _vocabulary(meta: _Metadata) -> tuple[Sequence[str], Sequence[int]]:
    """The GGUF's tokens and their llama.cpp types, checked to pair up."""
    tokens: Sequence[str] = meta.get("tokenizer.ggml.tokens")
    types: Sequence[int] = meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ModelFormatError(
            f"{meta.source.name}: {len(types)} token types for {len(tokens)} tokens", path=meta.source
        )
    return tokens, types


def _token_ids(tokens: Sequence[str], meta: _Metadata) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelFormatError(f"{meta.source.name}: the vocabulary repeats tokens", path=meta.source)
    return vocab


def _added_tokens(tok: Tokenizer, tokens: Sequence[str], types: Sequence[int], meta: _Metadata) -> dict[str, str]:
    """Register control tokens as special and user-defined ones as plain added tokens (matched
    whole, before the model runs); return the special-token strings for tokenizer_config.json."""
    from tokenizers import AddedToken

    pairs = list(zip(tokens, types, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in pairs if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in pairs if k == _USER_DEFINED])
    special: dict[str, str] = {}
    for key, gguf_key in _SPECIAL_IDS.items():
        index = meta.get(f"tokenizer.ggml.{gguf_key}", None)
        if index is not None and 0 <= int(index) < len(tokens):
            special[key.removesuffix("_id")] = tokens[int(index)]
    return special


def _bos_template(special: Mapping[str, str], vocab: Mapping[str, int], meta: _Metadata) -> Any:
    """A post-processor putting the bos token first when the GGUF asks for it, else ``None``."""
    from tokenizers import processors

    bos = special.get("bos_token")
    if not meta.get("tokenizer.ggml.add_bos_token", False) or bos is None:
        return None
    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
    )


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished bundle ``tmp`` to ``out``, replacing an earlier bundle there."""
    tmp.chmod(0o755)  # mkdtemp makes the folder private; a model folder is ordinary data.
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
