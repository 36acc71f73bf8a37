"""The typed decoder spec every backend and the reference forward build from.

One frozen :class:`ArchSpec` describes any decoder the registry knows: the Llama layout is
the base, and each family module (:mod:`infer.arch.llama`, :mod:`infer.arch.qwen3`,
:mod:`infer.arch.gemma3`...) turns its ``config.json`` into the same fields. Features beyond
the Llama base are named in :meth:`ArchSpec.features`, so a backend that cannot honour one
refuses the model at load (:meth:`ArchSpec.require`) instead of running it wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, final

import numpy as np
import numpy.typing as npt

from infer.errors import ModelFormatError, UnsupportedModelError

__all__ = ["ACTIVATIONS", "FEATURES", "ArchSpec", "rope_inv_freq"]

#: Gated-MLP activations: ``silu`` (SwiGLU) and ``gelu_tanh`` (GeGLU with the tanh approximation).
ACTIVATIONS: Final = ("silu", "gelu_tanh")

#: Every feature :meth:`ArchSpec.features` can name, with what it means (for error messages).
FEATURES: Final[Mapping[str, str]] = {
    "sliding_window": "sliding-window attention on some layers",
    "local_rope": "a second RoPE base for the sliding-window layers",
    "qk_norm": "per-head RMSNorm of queries and keys before RoPE",
    "norm_offset": "(1 + weight) RMSNorm",
    "sandwich_norms": "norms after attention and after the MLP (four per layer)",
    "gelu_tanh": "GELU-tanh gated MLP",
    "embedding_scale": "embeddings multiplied by a constant",
    "attention_scale": "an attention scale other than 1/sqrt(head_dim)",
    "attention_softcap": "tanh soft-capping of attention scores",
    "final_softcap": "tanh soft-capping of the output logits",
    "partial_rotary": "RoPE on the first part of each head only",
    "fused_projections": "q/k/v and gate/up stored as fused matrices",
    "nope_layers": "layers without rotary embedding (NoPE)",
}


def rope_inv_freq(theta: float, head_dim: int, scaling: Mapping[str, Any] | None) -> npt.NDArray[np.float64]:
    """Rotary inverse frequencies ``[head_dim // 2]`` for base ``theta`` and a ``rope_scaling`` object.

    ``linear`` divides every frequency by ``factor``; ``llama3`` keeps the high frequencies,
    divides the low ones by ``factor`` and blends the band between the two cut-offs.
    """
    inv: npt.NDArray[np.float64] = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv / factor
    if kind == "longrope":
        # ArchSpec checks the factors' length against its rotated dims.
        return inv / np.asarray(scaling["short_factor"], dtype=np.float64)
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        # 0 in the low-frequency band (fully scaled), 1 in the high-frequency band (kept).
        keep = np.clip((original * inv / (2 * math.pi) - low) / (high - low), 0.0, 1.0)
        return (1 - keep) * inv / factor + keep * inv
    return inv


@final
@dataclass(frozen=True, slots=True)
class ArchSpec:
    """The decoder architecture a backend needs to build the model.

    Built by :func:`infer.arch.spec_from_config`; the defaults are the plain Llama layout.
    """

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
    #: Bias on the q/k/v projections (qwen2, or ``attention_bias`` in a llama config).
    attention_bias: bool = False
    #: Bias on the output projection of attention.
    o_bias: bool = False
    #: Bias on the MLP projections.
    mlp_bias: bool = False
    #: Per layer: how many keys (the query's own included) a query sees, or ``None`` for all.
    #: A query at position ``i`` sees keys ``j`` with ``i - window < j <= i`` (transformers' rule).
    sliding_windows: tuple[int | None, ...] = ()
    #: RoPE base of the sliding-window layers when it differs from ``rope_theta`` (Gemma 3);
    #: those layers use plain RoPE, without ``rope_scaling``.
    local_rope_theta: float | None = None
    #: Gated-MLP activation, one of :data:`ACTIVATIONS`.
    hidden_act: str = "silu"
    #: Per-head RMSNorm of q and k (``self_attn.q_norm`` / ``k_norm``) before RoPE.
    qk_norm: bool = False
    #: Added to every RMSNorm weight: 1.0 for Gemma's ``x * (1 + w)`` norms, else 0.0.
    norm_offset: float = 0.0
    #: Gemma layout: ``post_attention_layernorm`` normalises the attention output and
    #: ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` wrap the MLP.
    sandwich_norms: bool = False
    #: Multiplies the embeddings before the first layer (Gemma: sqrt(hidden_size)).
    embedding_scale: float = 1.0
    #: Multiplies q.k; ``None`` means 1/sqrt(head_dim).
    attention_scale: float | None = None
    #: ``cap * tanh(scores / cap)`` on attention scores before the mask (Gemma 2).
    attention_softcap: float | None = None
    #: ``cap * tanh(logits / cap)`` on the output logits (Gemma 2).
    final_softcap: float | None = None
    #: Leading dimensions of each head that RoPE rotates (half-split within them); 0 means all.
    rotary_dim: int = 0
    #: Phi-3 layout: ``self_attn.qkv_proj`` (q, k, v rows stacked) and ``mlp.gate_up_proj``
    #: (gate rows, then up rows) instead of separate matrices.
    fused_projections: bool = False
    #: Per layer: whether RoPE rotates its queries and keys (SmolLM3 leaves every fourth unrotated).
    rope_layers: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if not self.rope_layers:
            object.__setattr__(self, "rope_layers", (True,) * self.num_hidden_layers)
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_hidden_layers)
        if not self.rotary_dim:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(scaling[key]) != self.rotary_dim // 2:
                    raise ModelFormatError(
                        f"config.json: longrope {key} has {len(scaling[key])} entries; "
                        f"{self.rotary_dim} rotated dims need {self.rotary_dim // 2}"
                    )
            # Only the short factors are exact (see ConfigReader._longrope): the context stops where they do.
            limit = min(self.max_position_embeddings, int(scaling["original_max_position_embeddings"]))
            object.__setattr__(self, "max_position_embeddings", limit)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, path: Path | None = None) -> ArchSpec:
        """Validate a parsed ``config.json`` through the family registry (:func:`infer.arch.spec_from_config`)."""
        from infer.arch import spec_from_config

        return spec_from_config(config, path=path)

    # -- derived facts ----------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The factor q.k is multiplied by."""
        return self.attention_scale if self.attention_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def window(self, layer: int) -> int | None:
        """Keys a query of ``layer`` sees (its own included), or ``None`` for every earlier key."""
        return self.sliding_windows[layer]

    def features(self) -> frozenset[str]:
        """Names (keys of :data:`FEATURES`) of what this spec needs beyond the plain Llama layout."""
        found = {
            "sliding_window": any(w is not None for w in self.sliding_windows),
            "local_rope": self.local_rope_theta is not None,
            "qk_norm": self.qk_norm,
            "norm_offset": self.norm_offset != 0.0,
            "sandwich_norms": self.sandwich_norms,
            "gelu_tanh": self.hidden_act == "gelu_tanh",
            "embedding_scale": self.embedding_scale != 1.0,
            "attention_scale": self.attention_scale is not None,
            "attention_softcap": self.attention_softcap is not None,
            "final_softcap": self.final_softcap is not None,
            "partial_rotary": self.rotary_dim != self.head_dim,
            "fused_projections": self.fused_projections,
            "nope_layers": not all(self.rope_layers),
        }
        return frozenset(name for name, used in found.items() if used)

    def require(self, supported: Collection[str], *, backend: str, path: Path | None = None) -> None:
        """Raise :class:`~infer.errors.UnsupportedModelError` naming every feature ``backend`` lacks.

        Backends call this at load with the features they implement, so a model they would
        run wrongly is refused with what is missing.
        """
        missing = sorted(self.features() - set(supported))
        if missing:
            named = "; ".join(f"{name} ({FEATURES[name]})" for name in missing)
            raise UnsupportedModelError(
                f"{backend} backend cannot run this {self.model_type} model: it needs {named}; "
                "use a backend that supports it (the onnx backend runs every registered family)",
                path=path,
            )

    def rope_inv_freq(self, layer: int | None = None) -> npt.NDArray[np.float64]:
        """Rotary inverse frequencies of one head of ``layer``, ``[rotary_dim // 2]``, with its scaling.

        ``linear`` divides every frequency by ``factor``; ``llama3`` keeps the high frequencies,
        divides the low ones by ``factor`` and blends the band between the two cut-offs.
        Sliding-window layers of a spec with ``local_rope_theta`` use that base, unscaled.
        Backends and the reference forward share this one definition.
        """
        local = layer is not None and self.local_rope_theta is not None and self.window(layer) is not None
        theta = self.local_rope_theta if local and self.local_rope_theta is not None else self.rope_theta
        return rope_inv_freq(theta, self.rotary_dim, None if local else self.rope_scaling)

    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by (LongRoPE's attention scaling; 1 otherwise)."""
        return float((self.rope_scaling or {}).get("attention_factor", 1.0))

    def rope_cos_sin(
        self, positions: npt.NDArray[np.integer[Any]], layer: int | None = None
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """cos and sin tables ``[len(positions), rotary_dim // 2]`` of ``layer``, attention factor
        included: the one definition the reference and every backend read their rotations from."""
        angles = np.asarray(positions, dtype=np.float64)[:, None] * self.rope_inv_freq(layer)[None, :]
        factor = self.rope_attention_factor()
        return np.cos(angles) * factor, np.sin(angles) * factor

    def rope_groups(self) -> dict[tuple[float, ...], list[int]]:
        """Layers grouped by identical RoPE frequencies (one table per group in a graph)."""
        groups: dict[tuple[float, ...], list[int]] = {}
        for layer in range(self.num_hidden_layers):
            groups.setdefault(tuple(self.rope_inv_freq(layer).tolist()), []).append(layer)
        return groups

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor names and shapes this spec requires."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
            if self.fused_projections:
                shapes[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
            else:
                shapes |= {
                    p + "self_attn.q_proj.weight": (q, h),
                    p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h),
                }
            shapes[p + "self_attn.o_proj.weight"] = (h, q)
            if self.fused_projections:
                shapes[p + "mlp.gate_up_proj.weight"] = (2 * i, h)
            else:
                shapes |= {p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h)}
            shapes[p + "mlp.down_proj.weight"] = (h, i)
            if self.sandwich_norms:
                shapes |= {p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)}
            if self.qk_norm:
                shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
            if self.attention_bias:
                shapes |= {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            if self.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            if self.mlp_bias:
                shapes |= {p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,), p + "mlp.down_proj.bias": (h,)}
        return shapes

    def unfused(self, weights: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """The separate q/k/v and gate/up matrices of a spec with :attr:`fused_projections`, by their
        Hugging Face names, sliced from the stacked ones in ``weights`` (empty when not fused)."""
        if not self.fused_projections:
            return {}
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        out: dict[str, npt.NDArray[Any]] = {}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            qkv = weights[p + "self_attn.qkv_proj.weight"]
            parts = np.split(qkv, [q, q + kv])
            out |= {p + f"self_attn.{x}_proj.weight": part for x, part in zip("qkv", parts, strict=True)}
            gate, up = np.split(weights[p + "mlp.gate_up_proj.weight"], 2)
            out |= {p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up}
        return out

    def pre_mlp_norm(self, layer: int) -> str:
        """Name of the norm in front of ``layer``'s MLP (it differs between Llama and Gemma layouts)."""
        p = f"model.layers.{layer}."
        return p + ("pre_feedforward_layernorm.weight" if self.sandwich_norms else "post_attention_layernorm.weight")
