"""A plain numpy forward pass of every registered family: the oracle backends are checked against.

The model is written for clarity, not speed: weights are read as float32 (as a bundle ships
them), held and multiplied in float64, so the reference's own rounding is far below
any backend tolerance. It covers what :class:`infer.arch.ArchSpec` describes, reading only
the spec's fields (never ``model_type``): RMSNorm (plain or ``1 + w``, two or four per layer),
per-head q/k norm, rotary embeddings (full or partial; plain, ``linear`` and ``llama3`` scaling, a second base
for sliding-window layers), grouped-query attention with per-layer sliding windows, scale and
soft-capping, SwiGLU or GELU-tanh gated MLP, fused (Phi-3) or separate projections, embedding
scale, tied or separate output head, biases, and final logit soft-capping.

Two ways in: :meth:`ReferenceModel.forward` runs a whole sequence at once, and
:meth:`ReferenceModel.step` feeds tokens into a :class:`ReferenceCache` (prefill, then one
token per decode step), which is what a KV-cached backend does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from infer.errors import ContextLengthError, EmptyPromptError, InvalidTokenError

if TYPE_CHECKING:
    from infer.arch import ArchSpec
    from infer.bundle import Bundle

__all__ = ["ReferenceCache", "ReferenceModel"]

F64 = npt.NDArray[np.float64]


@dataclass
class ReferenceCache:
    """Keys (already rotated) and values per layer, each ``[kv_heads, length, head_dim]``."""

    keys: list[F64] = field(default_factory=list)
    values: list[F64] = field(default_factory=list)
    length: int = 0


class ReferenceModel:
    """The numpy oracle for a :class:`~infer.bundle.Bundle` of any registered family."""

    def __init__(self, bundle: Bundle) -> None:
        self.spec: ArchSpec = bundle.spec
        # Read as float32 (the bundle's precision, whatever it stores), held as float64 so that
        # every product runs in float64 without a per-step upcast (135M params: ~1 GB).
        self.weights: dict[str, F64] = {
            name: np.asarray(bundle.weights[name], dtype=np.float32).astype(np.float64)
            for name in self.spec.expected_shapes()
        }
        s = self.spec
        #: The layers a forward runs, in order: all of them, unless a measurement of
        #: layer-skipping drafts narrows it (benchmarks/layer_skip_drafts.py).
        self.layers: Sequence[int] = range(s.num_hidden_layers)
        if s.fused_projections:
            self._split_fused()
        if s.norm_offset:
            # (1 + w) norms: fold the offset into the weights once.
            for name in self.weights:
                if name.endswith("norm.weight"):
                    self.weights[name] = self.weights[name] + s.norm_offset

    @property
    def vocab_size(self) -> int:
        """Rows of the output head."""
        return self.spec.vocab_size

    def new_cache(self) -> ReferenceCache:
        """An empty KV cache for one sequence."""
        n = self.spec.num_hidden_layers
        empty = np.zeros((self.spec.num_key_value_heads, 0, self.spec.head_dim))
        return ReferenceCache(keys=[empty] * n, values=[empty] * n)

    def forward(self, ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """Logits ``[len(ids), vocab]`` of a causal forward over ``ids`` from position 0."""
        return self.step(self.new_cache(), ids)

    def step(self, cache: ReferenceCache, ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """Feed ``ids`` after the tokens already in ``cache``; return their logits ``[len(ids), vocab]``.

        The cache is extended in place by ``len(ids)`` positions.
        """
        tokens = self._check(cache, ids)
        s, w = self.spec, self.weights
        x = w["model.embed_tokens.weight"][tokens] * s.embedding_scale
        positions = np.arange(cache.length, cache.length + len(tokens))
        for n in self.layers:
            p = f"model.layers.{n}."
            attn = self._attention(n, self._norm(x, p + "input_layernorm"), cache, positions)
            if s.sandwich_norms:
                attn = self._norm(attn, p + "post_attention_layernorm")
            x = x + attn
            h = self._norm(x, s.pre_mlp_norm(n).removesuffix(".weight"))
            gate = self._linear(h, p + "mlp.gate_proj")
            up = self._linear(h, p + "mlp.up_proj")
            mlp = self._linear(_ACTIVATIONS[s.hidden_act](gate) * up, p + "mlp.down_proj")
            if s.sandwich_norms:
                mlp = self._norm(mlp, p + "post_feedforward_layernorm")
            x = x + mlp
        cache.length += len(tokens)
        x = self._norm(x, "model.norm")
        head = w["model.embed_tokens.weight"] if s.tie_word_embeddings else w["lm_head.weight"]
        logits = x @ head.T
        if s.final_softcap is not None:
            logits = s.final_softcap * np.tanh(logits / s.final_softcap)
        out: npt.NDArray[np.float32] = logits.astype(np.float32)
        return out

    def greedy(self, ids: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of ``ids`` (prefill then one decode step per token), stopping at an eos id."""
        cache = self.new_cache()
        logits = self.step(cache, ids)[-1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if token in eos_token_ids:
                break
            logits = self.step(cache, [token])[-1]
        return out

    def _check(self, cache: ReferenceCache, ids: Sequence[int]) -> npt.NDArray[np.int64]:
        tokens = np.asarray(ids, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise EmptyPromptError("no token ids given; pass at least one id")
        bad = np.flatnonzero((tokens < 0) | (tokens >= self.spec.vocab_size))
        if bad.size:
            raise InvalidTokenError(int(tokens[bad[0]]), self.spec.vocab_size, position=int(bad[0]))
        if cache.length + tokens.size > self.spec.max_position_embeddings:
            raise ContextLengthError(cache.length + int(tokens.size), self.spec.max_position_embeddings)
        return tokens

    def _split_fused(self) -> None:
        """Phi-3's stacked q/k/v and gate/up matrices as the separate ones the forward reads."""
        self.weights |= self.spec.unfused(self.weights)

    def _norm(self, x: F64, prefix: str) -> F64:
        return _rms_norm(x, self.weights[prefix + ".weight"], self.spec.rms_norm_eps)

    def _rope(self, layer: int, positions: npt.NDArray[np.int64]) -> tuple[F64, F64]:
        cos, sin = self.spec.rope_cos_sin(positions, layer)
        # Half-split layout (the Hugging Face one): dimension i pairs with i + rotary_dim/2.
        return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)

    def _linear(self, x: F64, prefix: str) -> F64:
        y: F64 = x @ self.weights[prefix + ".weight"].T
        bias = self.weights.get(prefix + ".bias")
        return y if bias is None else y + bias

    def _attention(self, n: int, h: F64, cache: ReferenceCache, positions: npt.NDArray[np.int64]) -> F64:
        cos, sin = self._rope(n, positions)
        p = f"model.layers.{n}."
        s = self.spec
        t, d = h.shape[0], s.head_dim
        q = self._linear(h, p + "self_attn.q_proj").reshape(t, s.num_attention_heads, d).transpose(1, 0, 2)
        k = self._linear(h, p + "self_attn.k_proj").reshape(t, s.num_key_value_heads, d).transpose(1, 0, 2)
        v = self._linear(h, p + "self_attn.v_proj").reshape(t, s.num_key_value_heads, d).transpose(1, 0, 2)
        if s.qk_norm:
            # Per head, over head_dim, before the rotation.
            q, k = self._norm(q, p + "self_attn.q_norm"), self._norm(k, p + "self_attn.k_norm")
        if s.rope_layers[n]:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys = np.concatenate([cache.keys[n], k], axis=1)
        values = np.concatenate([cache.values[n], v], axis=1)
        cache.keys[n], cache.values[n] = keys, values
        group = s.num_attention_heads // s.num_key_value_heads
        keys, values = np.repeat(keys, group, axis=0), np.repeat(values, group, axis=0)
        scores = q @ keys.transpose(0, 2, 1) * s.scale
        if s.attention_softcap is not None:
            scores = s.attention_softcap * np.tanh(scores / s.attention_softcap)
        past = cache.length
        # Query i (absolute position past + i) sees keys 0 .. past + i, and with a window W
        # only the last W of them (its own included).
        query_pos, key_pos = (past + np.arange(t))[:, None], np.arange(past + t)[None, :]
        visible = key_pos <= query_pos
        window = s.window(n)
        if window is not None:
            visible &= key_pos > query_pos - window
        scores = np.where(visible[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = (probs @ values).transpose(1, 0, 2).reshape(t, s.num_attention_heads * d)
        return self._linear(out, p + "self_attn.o_proj")


def _rms_norm(x: F64, weight: F64, eps: float) -> F64:
    scale: F64 = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * scale * weight


def _gelu_tanh(x: F64) -> F64:
    out: F64 = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return out


def _silu(x: F64) -> F64:
    out: F64 = x / (1.0 + np.exp(-x))
    return out


#: The gated-MLP activations by :attr:`ArchSpec.hidden_act`.
_ACTIVATIONS = {"silu": _silu, "gelu_tanh": _gelu_tanh}


def _rotate(x: F64, cos: F64, sin: F64) -> F64:
    # Only the first cos.shape[-1] dimensions rotate (partial rotary); the rest pass through.
    dim = cos.shape[-1]
    head, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = np.concatenate([-head[..., half:], head[..., :half]], axis=-1)
    return np.concatenate([head * cos + rotated * sin, rest], axis=-1)
