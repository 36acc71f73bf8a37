"""The Llama layout and the families that share it unchanged: Llama, Mistral, Qwen2, SmolLM.

Pre-norm decoder layers (RMSNorm, grouped-query attention with RoPE, SwiGLU MLP). Mistral
attends through a sliding window on every layer when ``sliding_window`` is set; Qwen2 on the
layers from ``max_window_layers`` on when ``use_sliding_window`` is true (transformers' rule).
:func:`base_fields` is the part other families start from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from infer.arch._config import ConfigReader
from infer.arch.spec import ArchSpec

__all__ = ["MODEL_TYPES", "base_fields", "from_config"]

#: ``model_type`` values this module reads.
MODEL_TYPES: Final = ("llama", "mistral", "qwen2", "smollm")


def base_fields(read: ConfigReader, model_type: str) -> dict[str, Any]:
    """The :class:`ArchSpec` fields every family reads the same way (sizes, heads, RoPE, tying)."""
    heads, kv_heads, head_dim = read.heads()
    theta, scaling = read.rope()
    return {
        "model_type": model_type,
        "vocab_size": read.pos_int("vocab_size"),
        "hidden_size": read.pos_int("hidden_size"),
        "intermediate_size": read.pos_int("intermediate_size"),
        "num_hidden_layers": read.pos_int("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": read.pos_int("max_position_embeddings", 2048),
        "rms_norm_eps": read.pos_float("rms_norm_eps", read.config.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": read.flag("tie_word_embeddings"),
        "mlp_bias": read.flag("mlp_bias"),
    }


def qwen_sliding(read: ConfigReader, layers: int) -> tuple[int | None, ...]:
    """Qwen2/Qwen3 windows: with ``use_sliding_window``, layers from ``max_window_layers`` on."""
    if not read.flag("use_sliding_window"):
        return (None,) * layers
    first = read.config.get("max_window_layers", layers)
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise read.fail(f"max_window_layers must be a non-negative integer, got {first!r}")
    return read.windows(read.sliding_layers(layers, [n >= first for n in range(layers)]))


def from_config(config: Mapping[str, Any], *, path: Path | None = None) -> ArchSpec:
    """Validate a Llama-layout ``config.json``; raise a typed error naming what is wrong."""
    read = ConfigReader(config, path)
    model_type = str(config.get("model_type"))
    fields = base_fields(read, model_type)
    fields["hidden_act"] = read.activation("hidden_act")
    if fields["hidden_act"] != "silu":
        raise read.refuse(f"hidden_act {config.get('hidden_act')!r} is not supported for {model_type} (only 'silu')")
    layers = fields["num_hidden_layers"]
    if model_type == "qwen2":
        # qwen2 always has q/k/v biases (its configs do not say so) and none on o_proj.
        fields["attention_bias"] = True
        fields["sliding_windows"] = qwen_sliding(read, layers)
    else:
        # llama-style configs set attention_bias for q/k/v and o together.
        fields["attention_bias"] = fields["o_bias"] = read.flag("attention_bias")
        sliding = config.get("sliding_window") is not None and model_type == "mistral"
        fields["sliding_windows"] = read.windows(read.sliding_layers(layers, [sliding] * layers))
    return ArchSpec(**fields)
