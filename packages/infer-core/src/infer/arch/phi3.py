"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama layout with fused projections and partial rotary.

``self_attn.qkv_proj`` and ``mlp.gate_up_proj`` hold q/k/v and gate/up stacked by rows;
``partial_rotary_factor`` (top level, or in ``rope_parameters``) rotates only that share of
each head (Phi-4-mini: 0.75); ``sliding_window`` applies to every layer (Phi-3-mini-4k: 2047).
LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) runs with its short factors and attention factor,
the context capped at ``original_max_position_embeddings`` (4096 on those models): past it,
transformers switches to the long factors mid-sequence, which no KV cache can follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from infer.arch._config import ConfigReader
from infer.arch.llama import base_fields
from infer.arch.spec import ArchSpec

__all__ = ["MODEL_TYPES", "from_config"]

#: ``model_type`` values this module reads.
MODEL_TYPES: Final = ("phi3",)


def from_config(config: Mapping[str, Any], *, path: Path | None = None) -> ArchSpec:
    """Validate a Phi-3 ``config.json``; raise a typed error naming what is wrong."""
    read = ConfigReader(config, path)
    fields = base_fields(read, "phi3")
    fields["hidden_act"] = read.activation("hidden_act")
    # transformers' Phi-3 has no biases on its projections, whatever the config says.
    fields["attention_bias"] = fields["o_bias"] = fields["mlp_bias"] = False
    fields["fused_projections"] = True
    layers = fields["num_hidden_layers"]
    fields["sliding_windows"] = read.windows(
        read.sliding_layers(layers, [config.get("sliding_window") is not None] * layers)
    )
    params = config.get("rope_parameters")
    if not isinstance(params, Mapping):
        params = {}
    factor = config.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    factor = read.pos_float("partial_rotary_factor", factor)
    rotary = int(fields["head_dim"] * factor)
    if factor > 1 or rotary % 2:
        raise read.fail(f"partial_rotary_factor={factor} must give an even number of rotated dims of head_dim")
    fields["rotary_dim"] = rotary
    return ArchSpec(**fields)
