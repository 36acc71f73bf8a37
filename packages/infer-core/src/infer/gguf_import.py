"""Import a GGUF file into a Hugging Face-layout bundle that :class:`infer.bundle.Bundle` opens.

What the import does:

* ``config.json`` from the GGUF metadata (``llama`` and ``qwen2`` architectures);
* no weight file: the tensors stay in the GGUF (moved, hard-linked or referred to, see
  :func:`import_gguf`), and ``gguf_tensors.json`` records where each lives, its quant type and
  shape, and whether the rotary permutation llama.cpp applies to the Q and K projections of
  ``llama`` models must be undone; :mod:`infer.gguf_tensors` reads them in place, raw or
  dequantized one at a time (the earlier float32 copy made a 98 MB Q4_1 file a 517 MB bundle);
* ``tokenizer.json`` built with ``tokenizers`` from the vocabulary and merges (gpt2-style
  byte-level BPE, with the pre-tokenizer split the GGUF's ``tokenizer.ggml.pre`` names),
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

#: GGUF architectures whose tensors map onto the Llama-family layout, with their config ``model_type``.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

#: Per-layer GGUF tensor suffixes and their Hugging Face names.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
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

#: Hugging Face special-token id keys and the GGUF metadata keys holding them.
_SPECIAL_IDS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "padding_token_id",
    "unk_token_id": "unknown_token_id",
}

# llama.cpp token types: 3 = control (special), 4 = user-defined (added, not special).
_CONTROL, _USER_DEFINED = 3, 4


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
    reader = _open(source)
    meta = _Metadata(reader, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        tensors = _locate_tensors(reader, meta, progress)
        config = _config(meta, tied="lm_head.weight" not in tensors)
        _write_bundle(tmp, meta, config, tensors, move=move)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
    if "model.embed_tokens.weight" not in entries:
        raise ModelFormatError(f"{meta.source.name}: tensor 'token_embd.weight' is missing", path=meta.source)
    return entries


def _hf_name(name: str, meta: _Metadata) -> str | None:
    """Hugging Face name of GGUF tensor ``name``; ``None`` for tensors the bundle does not need."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name == "rope_freqs.weight":
        raise UnsupportedModelError(
            f"{meta.source.name}: per-frequency rope factors (rope_freqs.weight) are not supported", path=meta.source
        )
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise UnsupportedModelError(
        f"{meta.source.name}: tensor {name!r} has no place in a {meta.arch} bundle", path=meta.source
    )


def _config(meta: _Metadata, *, tied: bool) -> dict[str, Any]:
    heads = int(meta.arch_get("attention.head_count"))
    hidden = int(meta.arch_get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens")
    head_dim = int(meta.arch_get("attention.key_length", hidden // heads))
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if meta.arch == "qwen2" else "LlamaForCausalLM"],
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
        "rope_scaling": _rope_scaling(meta),
        "tie_word_embeddings": tied,
        "vocab_size": int(meta.arch_get("vocab_size", len(tokens))),
        "torch_dtype": "float32",
    }
    rope_dims = int(meta.arch_get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise UnsupportedModelError(
            f"{meta.source.name}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported",
            path=meta.source,
        )
    for key, gguf_key in _SPECIAL_IDS.items():
        value = meta.get(f"tokenizer.ggml.{gguf_key}", None)
        if value is not None and key != "unk_token_id":
            config[key] = int(value)
    return config


def _float32(value: Any) -> float:
    """A GGUF float32 as the shortest decimal that reads back to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: _Metadata) -> dict[str, Any] | None:
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
    """A byte-level BPE ``tokenizers.Tokenizer`` and the special-token strings for tokenizer_config.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{meta.source.name}: tokenizer model {kind!r} is not supported (only gpt2-style byte-level BPE); "
            "use a Hugging Face model folder with tokenizer.json instead",
            path=meta.source,
        )
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    split = _PRE_TOKENIZERS.get(pre)
    if split is None:
        raise UnsupportedModelError(
            f"{meta.source.name}: pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(_PRE_TOKENIZERS))}",
            path=meta.source,
        )
    tokens: Sequence[str] = meta.get("tokenizer.ggml.tokens")
    types: Sequence[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise ModelFormatError(
            f"{meta.source.name}: {len(types)} token types for {len(tokens)} tokens", path=meta.source
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelFormatError(f"{meta.source.name}: the vocabulary repeats tokens", path=meta.source)
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
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == _CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )

    special: dict[str, str] = {}
    for key, gguf_key in _SPECIAL_IDS.items():
        index = meta.get(f"tokenizer.ggml.{gguf_key}", None)
        if index is not None and 0 <= int(index) < len(tokens):
            special[key.removesuffix("_id")] = tokens[int(index)]
    bos = special.get("bos_token")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, special


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
