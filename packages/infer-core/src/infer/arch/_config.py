"""Reading ``config.json`` values with typed errors: the parts every family module shares."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from infer.errors import ModelFormatError, UnsupportedModelError

__all__ = ["ROPE_KINDS", "ConfigReader"]

#: RoPE scaling kinds the backends build; others (yarn, dynamic...) are refused by name.
ROPE_KINDS: Final = ("default", "linear", "llama3", "longrope")

#: ``layer_types`` entries and whether the layer attends through a sliding window.
_LAYER_TYPES: Final = {"full_attention": False, "sliding_attention": True}


class ConfigReader:
    """Typed access to one parsed ``config.json``; every bad value raises an error naming its key."""

    def __init__(self, config: Mapping[str, Any], path: Path | None) -> None:
        self.config = config
        self.path = path

    def fail(self, message: str) -> ModelFormatError:
        """A :class:`~infer.errors.ModelFormatError` about this config."""
        return ModelFormatError(f"config.json: {message}", path=self.path)

    def refuse(self, message: str) -> UnsupportedModelError:
        """An :class:`~infer.errors.UnsupportedModelError` about this config."""
        return UnsupportedModelError(f"config.json: {message}", path=self.path)

    def pos_int(self, key: str, default: int | None = None) -> int:
        """A positive integer under ``key`` (``default`` when absent)."""
        value = self.config.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.fail(f"{key} must be a positive integer, got {value!r}")
        return value

    def pos_float(self, key: str, value: Any) -> float:
        """``value`` (read from ``key``) as a positive finite float."""
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise self.fail(f"{key} must be a positive number, got {value!r}")
        return float(value)

    def optional_float(self, key: str) -> float | None:
        """A positive number under ``key``, or ``None`` when absent or null."""
        value = self.config.get(key)
        return None if value is None else self.pos_float(key, value)

    def flag(self, key: str, default: bool = False) -> bool:
        """A boolean under ``key``."""
        value = self.config.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"{key} must be true or false, got {value!r}")
        return value

    def heads(self) -> tuple[int, int, int]:
        """``(num_attention_heads, num_key_value_heads, head_dim)``, checked against each other."""
        heads = self.pos_int("num_attention_heads")
        hidden = self.pos_int("hidden_size")
        if self.config.get("head_dim") is not None:
            head_dim = self.pos_int("head_dim")
        elif hidden % heads:
            raise self.fail(
                f"hidden_size={hidden} is not a multiple of num_attention_heads={heads} and no head_dim is given"
            )
        else:
            head_dim = hidden // heads
        if head_dim % 2:
            raise self.fail(f"head_dim={head_dim} must be even for rotary embeddings")
        kv_heads = self.pos_int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise self.fail(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        return heads, kv_heads, head_dim

    def activation(self, *keys: str, default: str = "silu") -> str:
        """The gated-MLP activation (``silu`` or ``gelu_tanh``) from the first of ``keys`` present."""
        names = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
        for key in keys:
            value = self.config.get(key)
            if value is None:
                continue
            if value not in names:
                raise self.refuse(f"{key} {value!r} is not supported (supported: {', '.join(sorted(names))})")
            return names[value]
        return default

    def rope(self, params: Mapping[str, Any] | None = None) -> tuple[float, Mapping[str, Any] | None]:
        """``(rope_theta, scaling)`` from ``rope_theta``/``rope_scaling`` or a ``rope_parameters`` object.

        ``params`` reads one entry of a per-layer-type ``rope_parameters`` (Gemma 3) instead.
        Scaling is ``None`` for plain RoPE; a kind infer does not build is refused by name.
        """
        if params is None:
            raw = self.config.get("rope_parameters") or {}
            if not isinstance(raw, Mapping):
                raise self.fail(f"rope_parameters must be an object, got {raw!r}")
            params = raw
        theta = self.pos_float("rope_theta", self.config.get("rope_theta", params.get("rope_theta", 10000.0)))
        scaling = self.config.get("rope_scaling")
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = params
        if scaling is None:
            return theta, None
        if not isinstance(scaling, Mapping):
            raise self.fail(f"rope_scaling must be an object, got {scaling!r}")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_KINDS:
            raise self.refuse(f"rope scaling type {kind!r} is not supported ({', '.join(ROPE_KINDS)})")
        if kind == "default":
            return theta, None
        if kind == "longrope":
            return theta, self._longrope(scaling)
        self.pos_float("rope_scaling.factor", scaling.get("factor"))
        return theta, dict(scaling)

    def _longrope(self, scaling: Mapping[str, Any]) -> dict[str, Any]:
        """LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) with its attention factor worked out.

        Only the short factors are used: transformers switches to the long ones for a whole
        forward once the sequence passes ``original_max_position_embeddings``, re-rotating
        nothing already cached, which no KV cache can follow. So the context is capped there
        (the family module caps ``max_position_embeddings``) and every position infer runs is exact.
        """
        original = scaling.get("original_max_position_embeddings", self.config.get("original_max_position_embeddings"))
        original = self.pos_float("original_max_position_embeddings", original)
        for key in ("short_factor", "long_factor"):
            factors = scaling.get(key)
            if not isinstance(factors, list) or not all(isinstance(f, int | float) and f > 0 for f in factors):
                raise self.fail(f"longrope {key} must be a list of positive numbers, got {factors!r}")
        factor = scaling.get("factor") or self.pos_int("max_position_embeddings", 2048) / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        return dict(scaling) | {
            "rope_type": "longrope",
            "original_max_position_embeddings": int(original),
            "attention_factor": self.pos_float("attention_factor", attention),
        }

    def sliding_layers(self, layers: int, default: Sequence[bool]) -> tuple[bool, ...]:
        """Which layers use the sliding window: ``layer_types`` when given, else ``default``."""
        types = self.config.get("layer_types")
        if types is None:
            return tuple(default)
        if not isinstance(types, list) or len(types) != layers:
            raise self.fail(f"layer_types must list one entry per layer ({layers}), got {types!r}")
        unknown = sorted({str(t) for t in types} - set(_LAYER_TYPES))
        if unknown:
            raise self.refuse(f"layer_types {unknown} are not supported ({', '.join(_LAYER_TYPES)})")
        return tuple(_LAYER_TYPES[t] for t in types)

    def windows(self, sliding: Sequence[bool]) -> tuple[int | None, ...]:
        """Per-layer windows: ``sliding_window`` on the sliding layers, ``None`` elsewhere."""
        if not any(sliding):
            return (None,) * len(sliding)
        window = self.pos_int("sliding_window")
        return tuple(window if s else None for s in sliding)
