"""Gemma 2: Gemma's layout without q/k norm, one RoPE base, and tanh soft-capping.

Attention scores are capped at ``attn_logit_softcapping`` and output logits at
``final_logit_softcapping``; layers alternate local (sliding window) and global, starting
local, unless ``layer_types`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from infer.arch._config import ConfigReader
from infer.arch.gemma3 import gemma_fields
from infer.arch.llama import base_fields
from infer.arch.spec import ArchSpec

__all__ = ["MODEL_TYPES", "from_config"]

#: ``model_type`` values this module reads.
MODEL_TYPES: Final = ("gemma2",)


def from_config(config: Mapping[str, Any], *, path: Path | None = None) -> ArchSpec:
    """Validate a Gemma 2 ``config.json``; raise a typed error naming what is wrong."""
    read = ConfigReader(config, path)
    fields = base_fields(read, "gemma2")
    layers = fields["num_hidden_layers"]
    sliding = read.sliding_layers(layers, [n % 2 == 0 for n in range(layers)])
    return ArchSpec(**(fields | gemma_fields(read, fields, sliding)))
