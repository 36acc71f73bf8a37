"""Model bundles: a Hugging Face-layout folder validated into a typed spec and lazy weights.

A bundle folder holds ``config.json``, ``*.safetensors`` (or a sharded index),
``tokenizer.json``, ``tokenizer_config.json`` and/or ``chat_template.jinja``, and optionally
``generation_config.json``. :meth:`Bundle.open` validates the configuration into an
:class:`ArchSpec`; weights stay on disk (memory-mapped) until a backend reads them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, final

import numpy as np
import numpy.typing as npt

from infer.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

__all__ = ["ArchSpec", "Bundle", "Weights", "is_bundle"]

#: ``model_type`` values of the Llama family that share one decoder layout.
SUPPORTED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "smollm"})


@final
@dataclass(frozen=True, slots=True)
class ArchSpec:
    """The decoder architecture a backend needs to build the model (Llama family)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    #: ``rope_scaling`` / ``rope_parameters`` as in config.json (``None``: plain RoPE).
    rope_scaling: Mapping[str, Any] | None = None
    tie_word_embeddings: bool = False
    #: Bias on the q/k/v projections (qwen2).
    attention_bias: bool = False
    #: Bias on the output projection of attention.
    o_bias: bool = False
    #: Bias on the MLP projections.
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, path: Path | None = None) -> ArchSpec:
        """Validate a parsed ``config.json``; raise a typed error naming what is wrong."""
        model_type = str(config.get("model_type", ""))
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}",
                path=path,
            )
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')", path=path)

        def need_int(key: str, default: int | None = None) -> int:
            value = config.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelFormatError(f"config.json: {key} must be a positive integer, got {value!r}", path=path)
            return value

        heads = need_int("num_attention_heads")
        hidden = need_int("hidden_size")
        head_dim = config.get("head_dim") or hidden // heads
        kv_heads = need_int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ModelFormatError(
                f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}",
                path=path,
            )
        rope_params = config.get("rope_parameters") or {}
        rope_theta = float(config.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        scaling = config.get("rope_scaling")
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = rope_params
        if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) not in (
            "default",
            "linear",
            "llama3",
        ):
            raise UnsupportedModelError(f"rope scaling {scaling!r} is not supported", path=path)
        # qwen2 always has q/k/v biases (its configs do not say so); llama-style configs set
        # attention_bias for q/k/v and o together.
        attention_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_hidden_layers=need_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            max_position_embeddings=need_int("max_position_embeddings", 2048),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling if scaling and scaling.get("rope_type", scaling.get("type")) != "default" else None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_bias=bool(config.get("attention_bias", False)) and model_type != "qwen2",
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor names and shapes this spec requires."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
            if self.attention_bias:
                shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)}
            if self.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            if self.mlp_bias:
                shapes |= {p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,), p + "mlp.down_proj.bias": (h,)}
        return shapes


class Weights(Mapping[str, npt.NDArray[np.floating[Any]]]):
    """Tensors of a bundle by Hugging Face name, read from memory-mapped safetensors on access."""

    def __init__(self, files: Mapping[str, Path]) -> None:
        self._files = dict(files)

    def __getitem__(self, name: str) -> npt.NDArray[np.floating[Any]]:
        from safetensors import safe_open

        try:
            path = self._files[name]
        except KeyError:
            raise KeyError(name) from None
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor(name)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def file_of(self, name: str) -> Path:
        """The safetensors file holding ``name``."""
        return self._files[name]


def is_bundle(path: Path) -> bool:
    """Whether ``path`` looks like a Hugging Face-layout model folder."""
    return path.is_dir() and (path / "config.json").is_file()


@final
@dataclass(frozen=True)
class Bundle:
    """A validated model folder."""

    path: Path
    spec: ArchSpec
    config: Mapping[str, Any]
    weights: Weights
    generation_config: Mapping[str, Any] = field(default_factory=dict)
    tokenizer_config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Open and validate the bundle at ``path``."""
        root = Path(path)
        if not root.is_dir():
            raise ModelNotFoundError(f"model folder {str(root)!r} does not exist", path=root)
        config = _read_json(root / "config.json", required=True)
        spec = ArchSpec.from_config(config, path=root / "config.json")
        weights = Weights(_index_safetensors(root))
        return cls(
            path=root,
            spec=spec,
            config=config,
            weights=weights,
            generation_config=_read_json(root / "generation_config.json", required=False),
            tokenizer_config=_read_json(root / "tokenizer_config.json", required=False),
        )

    @property
    def tokenizer_path(self) -> Path:
        """Path of ``tokenizer.json``."""
        return self.path / "tokenizer.json"

    @cached_property
    def chat_template(self) -> str | None:
        """The chat template (``chat_template.jinja`` or ``tokenizer_config.json``), if any."""
        jinja = self.path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = self.tokenizer_config.get("chat_template")
        return template if isinstance(template, str) else None

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end generation (generation_config.json first, then config.json)."""
        for source in (self.generation_config, self.config):
            eos = source.get("eos_token_id")
            if isinstance(eos, int):
                return (eos,)
            if isinstance(eos, list) and eos:
                return tuple(int(e) for e in eos)
        return ()

    @cached_property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence token id, if the model has one."""
        for source in (self.generation_config, self.config):
            bos = source.get("bos_token_id")
            if isinstance(bos, int):
                return bos
        return None

    def content_hash(self) -> str:
        """A sha256 over the config and weight files (name, size, mtime); stable while unchanged."""
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for file in sorted({*map(self.weights.file_of, self.weights)}):
            st = file.stat()
            h.update(f"{file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelNotFoundError(f"{path.name} is missing from model folder {str(path.parent)!r}", path=path)
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path.name} is not valid JSON: {exc}", path=path) from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path.name} must hold a JSON object", path=path)
    return data


def _index_safetensors(root: Path) -> dict[str, Path]:
    from safetensors import SafetensorError, safe_open

    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, required=True).get("weight_map", {})
        return {name: root / file for name, file in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in model folder {str(root)!r}", path=root)
    names: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                names.update(dict.fromkeys(f.keys(), file))
        except (SafetensorError, OSError) as exc:
            raise ModelFormatError(f"{file.name} is not a readable safetensors file: {exc}", path=file) from exc
    return names
