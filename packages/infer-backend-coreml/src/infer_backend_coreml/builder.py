"""Build a decoder as a stateful, multifunction Core ML package with the MIL builder.

Every family the registry knows is built from its spec (sliding windows as per-layer masks,
a rotary table per RoPE base, q/k norm, Gemma's norms and scales, GELU-tanh, partial rotary,
Phi-3's fused matrices, NoPE layers, soft-capping with the attention written out); a feature
the builder does not write is refused at load.

The package holds two functions that share one set of weights and one KV state:

``prefill``
    inputs ``input_ids`` int32 ``[1, C]``, ``position`` int32 ``[1]`` (index of the first
    token), ``last_index`` int32 ``[1]`` (which of the ``C`` rows to return logits for);
    output ``logits`` float32 ``[1, vocab]``. A prompt shorter than ``C`` is padded: row
    ``i`` attends to keys ``<= position + i`` only, so padding never reaches real rows, and the
    padded keys it writes past the real length are overwritten by the next step before any
    query can see them.
``decode``
    the same with ``C = 1`` and no ``last_index``.

Every shape is static. The KV cache lives in Core ML states ``k_<layer>`` / ``v_<layer>`` of
shape ``[1, kv_heads, context_length + C, head_dim]``; Core ML states are fp16 only, so an fp32
build keeps each cache as two fp16 states (high part and the rounding residue, ``*_lo``),
which together carry about 22 bits of mantissa in the bytes of one fp32 cache.

The graph is written once (:class:`DecoderGraph`) against a :class:`KVStore`: the packaged
model reads and writes Core ML states, while :func:`evaluate_step` swaps in constants so that
MIL's value inference computes every op in numpy. That is how the numbers are checked on
machines without the Core ML runtime.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, final

import numpy as np
import numpy.typing as npt

from infer.errors import ModelFormatError

if TYPE_CHECKING:
    import coremltools as ct
    from coremltools.converters.mil.mil import Program, Var

    from infer.bundle import ArchSpec
    from infer_backend_coreml.options import BuildConfig

__all__ = [
    "BUILDER_VERSION",
    "EMBEDDING_OP",
    "FUNCTION_DECODE",
    "FUNCTION_PREFILL",
    "INPUT_IDS",
    "INPUT_LAST_INDEX",
    "INPUT_POSITION",
    "MASK_VALUE",
    "OUTPUT_LOGITS",
    "ConstantKV",
    "DecoderGraph",
    "KVStore",
    "StateKV",
    "build_function_program",
    "build_package",
    "evaluate_step",
    "kv_state_shapes",
]

#: Bumped whenever the graph changes, so cached packages from older builders are rebuilt.
BUILDER_VERSION: Final = "2"
FUNCTION_PREFILL: Final = "prefill"
FUNCTION_DECODE: Final = "decode"
INPUT_IDS: Final = "input_ids"
INPUT_POSITION: Final = "position"
INPUT_LAST_INDEX: Final = "last_index"
OUTPUT_LOGITS: Final = "logits"
#: Name of the embedding lookup (int4 quantization finds the tied embedding table by it).
EMBEDDING_OP: Final = "embed_tokens"
#: Additive mask for keys a query may not see. fp16 holds it exactly, and exp(-3e4 - max)
#: underflows to 0 in fp16 and fp32 alike; float32's min would overflow to -inf in fp16.
MASK_VALUE: Final = -3.0e4
#: Floor for the RMSNorm row scale: a normal fp16 number, so the division cannot make NaN.
_NORM_SCALE_FLOOR: Final = 1e-4


def _mil() -> tuple[Any, Any, Any]:
    """coremltools' MIL builder, types and deployment target (imported on first use)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    return mb, types, ct.target.iOS18


def kv_state_shapes(spec: ArchSpec, config: BuildConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every KV state the package declares, in declaration order."""
    shape = (1, spec.num_key_value_heads, config.state_length, spec.head_dim)
    names = []
    for layer in range(spec.num_hidden_layers):
        for kind in ("k", "v"):
            names.append(f"{kind}_{layer}")
            if config.compute_dtype == "fp32":
                names.append(f"{kind}_{layer}_lo")
    return dict.fromkeys(names, shape)


class KVStore(Protocol):
    """Where the graph keeps its KV cache: Core ML states, or constants for evaluation."""

    def read(self, name: str) -> Var:
        """The fp16 tensor held under ``name``."""

    def write(self, name: str, value: Var) -> Var:
        """Store ``value`` (fp16) under ``name``; return the tensor to compute with."""


@final
class StateKV:
    """KV cache in Core ML states (the packaged model)."""

    def __init__(self, states: Mapping[str, Var]) -> None:
        self._states = states

    def read(self, name: str) -> Var:
        """Read the state ``name``."""
        mb, _, _ = _mil()
        return mb.read_state(input=self._states[name], name=f"read_{name}")

    def write(self, name: str, value: Var) -> Var:
        """Write ``value`` into the state ``name``; downstream ops read the stored copy.

        read_state -> slice_update -> coreml_update_state -> use is the in-place pattern the
        converter canonicalises to (its ``canonicalize_inplace_pattern`` pass), so it is
        written that way from the start.
        """
        mb, _, _ = _mil()
        return mb.coreml_update_state(state=self._states[name], value=value, name=f"update_{name}")


@final
class ConstantKV:
    """KV cache held as numpy arrays, so every op in the graph has a computable value.

    After a step, :attr:`arrays` holds what the states would hold, ready for the next step.
    """

    def __init__(self, arrays: Mapping[str, npt.NDArray[np.float16]]) -> None:
        self.arrays = {k: np.asarray(v, dtype=np.float16) for k, v in arrays.items()}

    @classmethod
    def zeros(cls, spec: ArchSpec, config: BuildConfig) -> ConstantKV:
        """A fresh cache, as ``make_state()`` allocates it (zero-filled)."""
        return cls({name: np.zeros(shape, np.float16) for name, shape in kv_state_shapes(spec, config).items()})

    def read(self, name: str) -> Var:
        """The current array under ``name`` as a constant."""
        mb, _, _ = _mil()
        return mb.const(val=self.arrays[name], name=f"read_{name}")

    def write(self, name: str, value: Var) -> Var:
        """Keep the folded value of ``value`` as the new array under ``name``."""
        if value.val is None:
            raise RuntimeError(f"KV update for {name!r} has no constant value; an op in the graph does not fold")
        self.arrays[name] = np.asarray(value.val, dtype=np.float16)
        return value


#: :data:`infer.arch.FEATURES` entries this builder writes (all of today's); a feature added to
#: the registry later is refused until it is written and listed.
SUPPORTED_FEATURES: Final[frozenset[str]] = frozenset(
    {
        "sliding_window",
        "local_rope",
        "qk_norm",
        "norm_offset",
        "sandwich_norms",
        "gelu_tanh",
        "embedding_scale",
        "attention_scale",
        "attention_softcap",
        "final_softcap",
        "partial_rotary",
        "fused_projections",
        "nope_layers",
    }
)


@dataclass
class DecoderGraph:
    """Writes the decoder's MIL ops for one function (one static chunk length).

    ``weights`` maps Hugging Face tensor names to arrays; they become constants of the
    function being built, in the compute dtype.
    """

    spec: ArchSpec
    weights: Mapping[str, npt.NDArray[Any]]
    config: BuildConfig
    #: Spell every op so that MIL value inference can compute it. Only SiLU differs: the
    #: ``silu`` op has no value inference in coremltools, so it becomes x * sigmoid(x).
    foldable: bool = False
    _consts: dict[str, Var] = field(default_factory=dict, init=False, repr=False)
    #: Phi-3's stacked matrices sliced into the separate ones the ops below name (else empty).
    _unfused: dict[str, npt.NDArray[Any]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        # A family feature this graph does not write would be silently dropped: refuse instead.
        self.spec.require(SUPPORTED_FEATURES, backend="coreml")
        self._unfused = self.spec.unfused(self.weights)

    @property
    def np_dtype(self) -> type[np.floating[Any]]:
        """numpy dtype of activations and weights."""
        return np.float32 if self.config.compute_dtype == "fp32" else np.float16

    def _scalar(self, value: float) -> npt.NDArray[Any]:
        return np.array(value, dtype=self.np_dtype)

    def _weight(self, name: str) -> Var:
        """The constant for tensor ``name``, made once per function so tied weights share it."""
        mb, _, _ = _mil()
        if name not in self._consts:
            try:
                array = np.asarray(self._unfused[name] if name in self._unfused else self.weights[name])
            except KeyError:
                raise ModelFormatError(f"weight {name!r} is missing from the model") from None
            expected = self.spec.expected_shapes().get(name)
            if expected is not None and array.shape != expected:
                raise ModelFormatError(f"weight {name!r} has shape {array.shape}, expected {expected}")
            if name.endswith("norm.weight") and self.spec.norm_offset:
                array = array + np.float32(self.spec.norm_offset)  # (1 + w) norms
            self._consts[name] = mb.const(val=array.astype(self.np_dtype), name=name.replace(".", "_"))
        return self._consts[name]

    def _linear(self, x: Var, prefix: str, has_bias: bool) -> Var:
        mb, _, _ = _mil()
        bias = self._weight(prefix + ".bias") if has_bias else None
        if bias is None:
            return mb.linear(x=x, weight=self._weight(prefix + ".weight"))
        return mb.linear(x=x, weight=self._weight(prefix + ".weight"), bias=bias)

    def rms_norm(self, x: Var, weight: str) -> Var:
        """RMSNorm over the last axis, safe in fp16.

        Squaring raw activations overflows fp16 past |x| = 256, so each row is first divided
        by its largest magnitude m: x * rsqrt(mean(x^2) + eps) == y * rsqrt(mean(y^2) + eps/m^2)
        with y = x / m and |y| <= 1. m is floored at 1e-4, so eps/m^2 stays finite for any
        usual eps; were it to overflow, the rsqrt of inf would still give the right limit, 0.
        """
        mb, _, _ = _mil()
        peak = mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True)
        peak = mb.maximum(x=peak, y=self._scalar(_NORM_SCALE_FLOOR))
        y = mb.real_div(x=x, y=peak)
        mean_square = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)
        # eps / m / m rather than eps / m^2: m^2 overflows fp16 for m > 256.
        eps = mb.real_div(x=mb.real_div(x=self._scalar(self.spec.rms_norm_eps), y=peak), y=peak)
        scale = mb.rsqrt(x=mb.add(x=mean_square, y=eps), epsilon=self._scalar(0.0))
        return mb.mul(x=mb.mul(x=y, y=scale), y=self._weight(weight))

    def _silu(self, x: Var) -> Var:
        mb, _, _ = _mil()
        return mb.mul(x=x, y=mb.sigmoid(x=x)) if self.foldable else mb.silu(x=x)

    def _activation(self, x: Var) -> Var:
        mb, _, _ = _mil()
        if self.spec.hidden_act != "gelu_tanh":
            return self._silu(x)
        if not self.foldable:
            return mb.gelu(x=x, mode="TANH_APPROXIMATION")
        # gelu has no value inference: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
        cube = mb.mul(x=mb.mul(x=x, y=x), y=x)
        inner = mb.mul(x=mb.add(x=x, y=mb.mul(x=cube, y=self._scalar(0.044715))), y=self._scalar(0.7978845608028654))
        return mb.mul(x=mb.mul(x=x, y=self._scalar(0.5)), y=mb.add(x=mb.tanh(x=inner), y=self._scalar(1.0)))

    def _rotate(self, x: Var, cos: Var, sin: Var) -> Var:
        """Apply rotary embedding in the half-split layout (first half paired with second), to the
        first ``rotary_dim`` dimensions of each head; the rest pass through (partial rotary)."""
        mb, _, _ = _mil()
        rotary, d = self.spec.rotary_dim, self.spec.head_dim
        rest = None
        if rotary < d:
            x, rest = mb.split(x=x, split_sizes=[rotary, d - rotary], axis=-1)
        half = rotary // 2
        x1, x2 = mb.split(x=x, split_sizes=[half, half], axis=-1)
        first = mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin))
        second = mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin))
        return mb.concat(values=[first, second] if rest is None else [first, second, rest], axis=-1)

    def _attend(self, q: Var, keys: Var, values: Var, mask: Var) -> Var:
        """softmax(q k^T / sqrt(d) + mask) v; with soft-capping (Gemma 2) written out, since the
        fused op has no hook between the scores and the softmax."""
        mb, _, _ = _mil()
        cap = self.spec.attention_softcap
        if cap is None:
            return mb.scaled_dot_product_attention(query=q, key=keys, value=values, attn_mask=mask)
        scores = mb.matmul(x=q, y=keys, transpose_y=True)
        scores = mb.mul(x=scores, y=self._scalar(1.0 / np.sqrt(self.spec.head_dim)))
        scores = mb.mul(x=mb.tanh(x=mb.real_div(x=scores, y=self._scalar(cap))), y=self._scalar(cap))
        return mb.matmul(x=mb.softmax(x=mb.add(x=scores, y=mask), axis=-1), y=values)

    def _heads(self, x: Var, heads: int, chunk: int) -> Var:
        """``[1, C, heads*D]`` -> ``[1, heads, C, D]``."""
        mb, _, _ = _mil()
        x = mb.reshape(x=x, shape=[1, chunk, heads, self.spec.head_dim])
        return mb.transpose(x=x, perm=[0, 2, 1, 3])

    def _cache(self, kv: KVStore, name: str, new: Var, begin: Var, end: Var) -> Var:
        """Write ``new`` into rows ``begin:end`` of cache ``name``; return the whole cache."""
        mb, _, _ = _mil()
        if self.config.compute_dtype == "fp16":
            updated = mb.slice_update(x=kv.read(name), update=new, begin=begin, end=end)
            return kv.write(name, updated)
        # fp32: keep the fp16 rounding and its residue in two states; their sum is the value.
        high = mb.cast(x=new, dtype="fp16")
        low = mb.cast(x=mb.sub(x=new, y=mb.cast(x=high, dtype="fp32")), dtype="fp16")
        high_all = kv.write(name, mb.slice_update(x=kv.read(name), update=high, begin=begin, end=end))
        low_all = kv.write(name + "_lo", mb.slice_update(x=kv.read(name + "_lo"), update=low, begin=begin, end=end))
        return mb.add(x=mb.cast(x=high_all, dtype="fp32"), y=mb.cast(x=low_all, dtype="fp32"))

    def step(self, kv: KVStore, input_ids: Var, position: Var, last_index: Var | None, chunk: int) -> Var:
        """The ops of one forward step over ``chunk`` tokens; returns float32 logits ``[1, vocab]``."""
        mb, _, _ = _mil()
        s = self.spec
        heads, kv_heads, d = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        group = heads // kv_heads
        length = self.config.state_length
        dt = self.np_dtype

        embed = self._weight("model.embed_tokens.weight")
        x = mb.gather(x=embed, indices=input_ids, axis=0, name=EMBEDDING_OP)  # [1, C, H]
        if s.embedding_scale != 1.0:
            x = mb.mul(x=x, y=self._scalar(s.embedding_scale))

        # Positions of the chunk's rows; rotary tables (one pair per RoPE base) are gathered by them.
        positions = mb.add(x=position, y=np.arange(chunk, dtype=np.int32))  # [C]
        rope: dict[int, tuple[Var, Var]] = {}
        for layers in s.rope_groups().values():
            cos_table, sin_table = s.rope_cos_sin(np.arange(length), layers[0])
            cos = mb.gather(x=cos_table.astype(dt), indices=positions, axis=0)
            sin = mb.gather(x=sin_table.astype(dt), indices=positions, axis=0)
            pair = (
                mb.reshape(x=cos, shape=[1, 1, chunk, s.rotary_dim // 2]),
                mb.reshape(x=sin, shape=[1, 1, chunk, s.rotary_dim // 2]),
            )
            rope |= dict.fromkeys(layers, pair)

        masks: dict[int | None, Var] = {}

        def mask_of(window: int | None) -> Var:
            """Additive mask over the whole state: row i sees keys 0..position+i, and with a
            window only the last ``window`` of them."""
            if window not in masks:
                keys = np.arange(length, dtype=np.int32).reshape(1, length)
                rows = mb.reshape(x=positions, shape=[chunk, 1])
                hidden = mb.greater(x=keys, y=rows)
                if window is not None:
                    too_old = mb.less_equal(x=keys, y=mb.sub(x=rows, y=np.int32(window)))
                    hidden = mb.logical_or(x=hidden, y=too_old)
                mask = mb.mul(x=mb.cast(x=hidden, dtype=self.config.compute_dtype), y=self._scalar(MASK_VALUE))
                # Grouped-query attention folds each KV head's query group into the sequence axis
                # (rows g*C + i), so K and V are read once rather than repeated per query head.
                masks[window] = mb.reshape(x=mb.tile(x=mask, reps=[group, 1]), shape=[1, 1, group * chunk, length])
            return masks[window]

        zero = np.zeros(1, dtype=np.int32)
        begin = mb.concat(values=[zero, zero, position, zero], axis=0)
        end = mb.add(x=begin, y=np.array([1, kv_heads, chunk, d], dtype=np.int32))

        for n in range(s.num_hidden_layers):
            p = f"model.layers.{n}."
            h = self.rms_norm(x, p + "input_layernorm.weight")
            q = self._heads(self._linear(h, p + "self_attn.q_proj", s.attention_bias), heads, chunk)
            k = self._heads(self._linear(h, p + "self_attn.k_proj", s.attention_bias), kv_heads, chunk)
            v = self._heads(self._linear(h, p + "self_attn.v_proj", s.attention_bias), kv_heads, chunk)
            if s.qk_norm:
                q = self.rms_norm(q, p + "self_attn.q_norm.weight")
                k = self.rms_norm(k, p + "self_attn.k_norm.weight")
            if s.rope_layers[n]:
                cos, sin = rope[n]
                q = self._rotate(q, cos, sin)
                k = self._rotate(k, cos, sin)
            if s.attention_scale is not None:
                # The fused op divides by sqrt(head_dim): pre-scale q to the spec's factor.
                q = mb.mul(x=q, y=self._scalar(s.scale * np.sqrt(d)))
            keys = self._cache(kv, f"k_{n}", k, begin, end)
            values = self._cache(kv, f"v_{n}", v, begin, end)
            q = mb.reshape(x=q, shape=[1, kv_heads, group * chunk, d])
            attn = self._attend(q, keys, values, mask_of(s.window(n)))
            attn = mb.transpose(x=mb.reshape(x=attn, shape=[1, heads, chunk, d]), perm=[0, 2, 1, 3])
            attn = mb.reshape(x=attn, shape=[1, chunk, heads * d])
            attn = self._linear(attn, p + "self_attn.o_proj", s.o_bias)
            if s.sandwich_norms:
                attn = self.rms_norm(attn, p + "post_attention_layernorm.weight")
            x = mb.add(x=x, y=attn)

            h = self.rms_norm(x, s.pre_mlp_norm(n))
            gate = self._linear(h, p + "mlp.gate_proj", s.mlp_bias)
            up = self._linear(h, p + "mlp.up_proj", s.mlp_bias)
            mlp = self._linear(mb.mul(x=self._activation(gate), y=up), p + "mlp.down_proj", s.mlp_bias)
            if s.sandwich_norms:
                mlp = self.rms_norm(mlp, p + "post_feedforward_layernorm.weight")
            x = mb.add(x=x, y=mlp)

        # Only one row's logits leave the model: the head is the largest matmul, and a
        # [C, vocab] output would be copied out on every call.
        if last_index is not None:
            x = mb.gather(x=x, indices=last_index, axis=1)
        x = mb.reshape(x=x, shape=[1, s.hidden_size])
        x = self.rms_norm(x, "model.norm.weight")
        head = "model.embed_tokens.weight" if s.tie_word_embeddings else "lm_head.weight"
        logits = mb.linear(x=x, weight=self._weight(head))
        if dt is np.float16:
            logits = mb.cast(x=logits, dtype="fp32")
        if s.final_softcap is not None:
            cap = np.float32(s.final_softcap)
            logits = mb.mul(x=mb.tanh(x=mb.real_div(x=logits, y=cap)), y=cap)
        return logits


def build_function_program(
    spec: ArchSpec, weights: Mapping[str, npt.NDArray[Any]], config: BuildConfig, *, chunk: int, with_last_index: bool
) -> Program:
    """A one-function MIL program (``main``) of the decoder over ``chunk`` tokens with state KV."""
    mb, types, target = _mil()
    from coremltools.converters.mil.mil import Function, Program

    placeholders: dict[str, Any] = {
        INPUT_IDS: mb.placeholder(shape=(1, chunk), dtype=types.int32),
        INPUT_POSITION: mb.placeholder(shape=(1,), dtype=types.int32),
    }
    if with_last_index:
        placeholders[INPUT_LAST_INDEX] = mb.placeholder(shape=(1,), dtype=types.int32)
    for name, shape in kv_state_shapes(spec, config).items():
        placeholders[name] = mb.state_tensor_placeholder(shape=shape, dtype=types.fp16)

    graph = DecoderGraph(spec, weights, config)
    with Function(placeholders, opset_version=target) as function:
        inputs = function.inputs
        logits = graph.step(
            StateKV(inputs),
            inputs[INPUT_IDS],
            inputs[INPUT_POSITION],
            inputs.get(INPUT_LAST_INDEX),
            chunk,
        )
        function.set_outputs([mb.identity(x=logits, name=OUTPUT_LOGITS)])
    program = Program()
    program.add_function("main", function)
    return program


def evaluate_step(
    spec: ArchSpec,
    weights: Mapping[str, npt.NDArray[Any]],
    config: BuildConfig,
    kv: ConstantKV,
    input_ids: npt.NDArray[np.int32],
    *,
    position: int,
    last_index: int | None = None,
) -> npt.NDArray[np.float32]:
    """Compute one call of a package function in numpy, through MIL value inference.

    ``input_ids`` is ``[1, C]`` as the function receives it (``C = prefill_chunk`` with
    ``last_index`` for prefill, ``C = 1`` without it for decode); ``kv`` is read and then updated
    in place, as the Core ML states would be. Returns logits ``[1, vocab]``. The ops are those
    of the package except that state reads and writes become constants and SiLU is spelled
    x * sigmoid(x) (see :attr:`DecoderGraph.foldable`). The fused attention's value inference
    runs in float64, so fp16 results here are somewhat closer to the reference than the device's.
    """
    mb, _, target = _mil()
    from coremltools.converters.mil.mil import Function

    ids = np.asarray(input_ids, dtype=np.int32)
    chunk = ids.shape[-1]
    graph = DecoderGraph(spec, weights, config, foldable=True)
    # In fp16, sigmoid's exp(-x) overflows to inf for x < -11 and gives the right limit, 0.
    with Function({}, opset_version=target), np.errstate(over="ignore"):
        last = None if last_index is None else mb.const(val=np.array([last_index], dtype=np.int32))
        logits = graph.step(kv, mb.const(val=ids), mb.const(val=np.array([position], dtype=np.int32)), last, chunk)
        value = logits.val
    if value is None:
        raise RuntimeError("the decoder graph did not fold to a constant; an op lacks value inference")
    return np.asarray(value, dtype=np.float32)


def _convert(program: Program, package: Path) -> ct.models.MLModel:
    """Convert ``program`` into the package folder ``package``."""
    import coremltools as ct

    # The graph is already typed in its compute dtype; FLOAT32 here only stops the converter
    # from inserting fp16 casts of its own.
    return ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
        package_dir=str(package),
    )


def _quantize_int4(model: ct.models.MLModel, block_size: int) -> ct.models.MLModel:
    """int4 symmetric weights with one fp16 scale per ``block_size`` inputs of each output row.

    Only the weights of ``linear`` ops and the embedding table are quantized: the rotary tables
    are gathered constants too, and must keep their precision. The embedding lookup is named in
    the config because, with tied embeddings, the table feeds both it and the head, and
    coremltools refuses a constant whose consumers disagree.
    """
    import coremltools.optimize.coreml as cto

    op_config = cto.OpLinearQuantizerConfig(
        mode="linear_symmetric",
        dtype="int4",
        granularity="per_block",
        block_size=block_size,
        # Every projection, however small (the default skips tensors under 2048 weights).
        weight_threshold=block_size,
    )
    # An all-zero block gets scale 0 and 0/0 while quantizing; it dequantizes to 0 whatever
    # its stored codes are, so numpy's invalid-value warnings say nothing here.
    with np.errstate(divide="ignore", invalid="ignore"):
        config = cto.OptimizationConfig(
            op_type_configs={"linear": op_config}, op_name_configs={EMBEDDING_OP: op_config}
        )
        return cto.linear_quantize_weights(model, config=config)


def build_package(
    spec: ArchSpec,
    weights: Mapping[str, npt.NDArray[Any]],
    config: BuildConfig,
    destination: Path,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Build the ``prefill``/``decode`` multifunction package at ``destination`` (a ``.mlpackage``).

    The package's metadata records the build (``infer.dtype``, ``infer.context_length``,
    ``infer.prefill_chunk``, ``infer.builder_version``) and whatever ``metadata`` adds.

    Each function is converted on its own, then both are merged; the merge deduplicates the
    identical weight constants, so the package holds one copy of the weights.
    """
    import coremltools as ct

    functions = {FUNCTION_PREFILL: (config.prefill_chunk, True), FUNCTION_DECODE: (1, False)}
    # coremltools leaves a TemporaryDirectory (its weights folder) behind on every conversion,
    # merge included; its implicit cleanup then warns. The folders are removed either way.
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="infer-coreml-") as tmp:
        warnings.simplefilter("ignore", ResourceWarning)
        descriptor = ct.utils.MultiFunctionDescriptor()
        for name, (chunk, with_last) in functions.items():
            program = build_function_program(spec, weights, config, chunk=chunk, with_last_index=with_last)
            path = Path(tmp) / f"{name}.mlpackage"
            model = _convert(program, path)
            if config.dtype == "int4":
                _quantize_int4(model, config.int4_block_size).save(str(path))
            descriptor.add_function(str(path), src_function_name="main", target_function_name=name)
        descriptor.default_function_name = FUNCTION_DECODE
        merged = Path(tmp) / "merged.mlpackage"
        ct.utils.save_multifunction(descriptor, str(merged))
        # The merge keeps no metadata of its own: record how the package was built (a ready
        # package is loaded from these facts) plus the caller's notes.
        model = ct.models.MLModel(str(merged), skip_model_load=True)
        model.user_defined_metadata.update(
            {
                "infer.builder_version": BUILDER_VERSION,
                **{f"infer.{k}": str(v) for k, v in config.cache_fields().items() if v is not None},
                **(metadata or {}),
            }
        )
        model.save(str(destination))
    return destination
