"""Qwen3 dense: the Llama layout with per-head q/k RMSNorm before RoPE and an explicit head_dim.

No q/k/v biases unless ``attention_bias`` says so (unlike Qwen2); sliding windows follow
Qwen2's ``use_sliding_window`` / ``max_window_layers`` rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from infer.arch._config import ConfigReader
from infer.arch.llama import base_fields, qwen_sliding
from infer.arch.spec import ArchSpec

__all__ = ["MODEL_TYPES", "from_config"]

#: ``model_type`` values this module reads.
MODEL_TYPES: Final = ("qwen3",)


def from_config(config: Mapping[str, Any], *, path: Path | None = None) -> ArchSpec:
    """Validate a Qwen3 ``config.json``; raise a typed error naming what is wrong."""
    read = ConfigReader(config, path)
    fields = base_fields(read, "qwen3")
    fields["hidden_act"] = read.activation("hidden_act")
    fields["attention_bias"] = fields["o_bias"] = read.flag("attention_bias")
    fields["qk_norm"] = True
    fields["sliding_windows"] = qwen_sliding(read, fields["num_hidden_layers"])
    return ArchSpec(**fields)
