"""SmolLM3: the Llama layout with NoPE layers (no rotary embedding on every fourth layer).

``no_rope_layers`` lists, per layer, 1 where RoPE rotates queries and keys and 0 where it does
not; without it, every ``no_rope_layer_interval``-th layer (4) is left unrotated. Sliding
windows follow the Qwen2 rule (``use_sliding_window``, ``max_window_layers``).
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
MODEL_TYPES: Final = ("smollm3",)


def from_config(config: Mapping[str, Any], *, path: Path | None = None) -> ArchSpec:
    """Validate a SmolLM3 ``config.json``; raise a typed error naming what is wrong."""
    read = ConfigReader(config, path)
    fields = base_fields(read, "smollm3")
    layers = fields["num_hidden_layers"]
    fields["hidden_act"] = read.activation("hidden_act")
    fields["attention_bias"] = fields["o_bias"] = read.flag("attention_bias")
    fields["sliding_windows"] = qwen_sliding(read, layers)
    interval = read.pos_int("no_rope_layer_interval", 4)
    flags = config.get("no_rope_layers")
    if flags is None:
        flags = [int((n + 1) % interval != 0) for n in range(layers)]
    if not isinstance(flags, list) or len(flags) != layers or any(f not in (0, 1) for f in flags):
        raise read.fail(f"no_rope_layers must list 0 or 1 for each of the {layers} layers, got {flags!r}")
    fields["rope_layers"] = tuple(bool(f) for f in flags)
    return ArchSpec(**fields)
