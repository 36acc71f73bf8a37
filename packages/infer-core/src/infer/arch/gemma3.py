"""Gemma 3 text (``gemma3_text``, and the text half of ``gemma3`` multimodal configs).

Differences from the Llama layout, all carried by :class:`ArchSpec` fields:

* embeddings multiplied by sqrt(hidden_size); ``(1 + w)`` RMSNorm everywhere;
* four norms per layer (input, post-attention, pre- and post-feedforward) and q/k norm;
* attention scaled by ``query_pre_attn_scalar ** -0.5``; GELU-tanh gated MLP;
* sliding-window layers (5 local : 1 global by default) with their own RoPE base
  (``rope_local_base_freq``, 10 000), the global ones with ``rope_theta`` and its scaling
  (linear x8 on the 4B+ models);
* tied embeddings by default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from infer.arch._config import ConfigReader
from infer.arch.llama import base_fields
from infer.arch.spec import ArchSpec

__all__ = ["MODEL_TYPES", "from_config", "gemma_fields"]

#: ``model_type`` values this module reads.
MODEL_TYPES: Final = ("gemma3_text", "gemma3")

#: One global layer after this many minus one local ones when the config names no layer types.
_DEFAULT_PATTERN: Final = 6


def from_config(config: Mapping[str, Any], *, path: Path | None = None) -> ArchSpec:
    """Validate a Gemma 3 ``config.json``; raise a typed error naming what is wrong."""
    if config.get("model_type") == "gemma3":
        # The multimodal checkpoints nest the decoder's config; the vision tower is not run.
        text = config.get("text_config")
        if not isinstance(text, Mapping):
            raise ConfigReader(config, path).fail("a gemma3 config needs a text_config object")
        config = {"tie_word_embeddings": config.get("tie_word_embeddings", True), **text}
    read = ConfigReader(config, path)
    params = config.get("rope_parameters")
    nested = isinstance(params, Mapping) and "full_attention" in params
    if isinstance(params, Mapping) and nested:
        # transformers 5: one rope_parameters entry per layer type.
        global_theta, scaling = read.rope(_entry(read, params, "full_attention"))
        local_theta, local_scaling = read.rope(_entry(read, params, "sliding_attention"))
        if local_scaling is not None:
            raise read.refuse("rope scaling on the sliding-attention layers is not supported")
    else:
        global_theta, scaling = read.rope()
        local_theta = read.pos_float("rope_local_base_freq", config.get("rope_local_base_freq", 10000.0))
    fields = base_fields(read, "gemma3_text") if not nested else _without_rope(read)
    fields |= {"rope_theta": global_theta, "rope_scaling": scaling}
    layers = fields["num_hidden_layers"]
    pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", _DEFAULT_PATTERN))
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
        raise read.fail(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
    sliding = read.sliding_layers(layers, [(n + 1) % pattern != 0 for n in range(layers)])
    fields |= gemma_fields(read, fields, sliding) | {
        "qk_norm": True,
        "local_rope_theta": local_theta if any(sliding) else None,
    }
    return ArchSpec(**fields)


def gemma_fields(read: ConfigReader, fields: dict[str, Any], sliding: tuple[bool, ...]) -> dict[str, Any]:
    """What Gemma 2 and 3 share: (1 + w) norms, four per layer, scaled embeddings and queries,
    GELU-tanh, soft-capping when configured, tied embeddings by default, windows on ``sliding``."""
    scalar = read.pos_float("query_pre_attn_scalar", read.config.get("query_pre_attn_scalar", fields["head_dim"]))
    scale = scalar**-0.5
    return {
        "tie_word_embeddings": read.flag("tie_word_embeddings", default=True),
        "attention_bias": read.flag("attention_bias"),
        "o_bias": read.flag("attention_bias"),
        "hidden_act": read.activation("hidden_activation", "hidden_act", default="gelu_tanh"),
        "norm_offset": 1.0,
        "sandwich_norms": True,
        "embedding_scale": math.sqrt(fields["hidden_size"]),
        # None: the default 1/sqrt(head_dim), so a backend without the feature still runs it.
        "attention_scale": None if scalar == fields["head_dim"] else scale,
        "sliding_windows": read.windows(sliding),
        "attention_softcap": read.optional_float("attn_logit_softcapping"),
        "final_softcap": read.optional_float("final_logit_softcapping"),
    }


def _entry(read: ConfigReader, params: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    entry = params.get(kind)
    if not isinstance(entry, Mapping):
        raise read.fail(f"rope_parameters.{kind} must be an object, got {entry!r}")
    return entry


def _without_rope(read: ConfigReader) -> dict[str, Any]:
    """Base fields of a config whose rope_parameters are per layer type (read separately)."""
    flat = {k: v for k, v in read.config.items() if k != "rope_parameters"}
    return base_fields(ConfigReader(flat, read.path), "gemma3_text")
