"""Build an ONNX decoder graph with an in-place KV cache from a bundle of any registered family.

The graph is written with :mod:`onnx.helper` straight from the bundle's safetensors; no
framework export is involved. One graph serves prefill and decode:

inputs
    ``input_ids`` int64 ``[batch, sequence]``; ``seqlens_k`` int32 ``[batch]`` (tokens each row
    will hold after this step, minus one); ``total_sequence_length`` int32 scalar (the largest
    of those, plus one); ``last_token_index`` int64 ``[batch]`` (flat index into
    ``batch * sequence`` of each row's last real token); ``past_key_values.N.key/value``
    ``[batch, kv_heads, kv_capacity, head_dim]``.
outputs
    ``logits`` float32 ``[batch, vocab]`` of each row's last token only (the output head is the
    largest matrix of a small model: running it over the whole prompt would dominate prefill);
    ``present.N.key/value``, the same buffers as the past ones.

Attention is ONNX Runtime's ``GroupQueryAttention`` contrib op with rotary embedding fused in:
when ``present`` is bound to the very buffer bound as ``past``, it writes the new keys and
values in place, so a decode step costs no copy of the cache. Positions come from
``seqlens_k``, which is why the graph needs no position input.

Family features come from the bundle's :class:`~infer.arch.ArchSpec`, never its ``model_type``:
sliding windows are the op's ``local_window_size`` (per layer, so prefill, chunked prefill and
decode all mask the same way however far past the window; the cache keeps every position),
attention soft-capping its ``softcap``, the attention scale its ``scale``; layers with another
RoPE base read their own cos/sin tables; q/k norm is an RMSNorm per head before the op (its
built-in q/k norm inputs have no CPU kernel); Gemma's extra norms, ``(1 + w)`` weights,
embedding scale, GELU-tanh and final soft-capping are plain ops around it.

Precisions: ``fp32`` (the default, exact to the reference), ``fp16`` (weights, activations
and cache in half precision; logits cast back to float32), ``int4`` (every projection as
``MatMulNBits`` 4-bit blocks with float minimums fitted by least squares, see
:func:`~infer_backend_onnx.quantize.fit_affine`, and int8 activations; the embedding table and
output head as 8-bit blocks, one shared initializer when tied; cache in float32), ``native``
(a bundle imported from GGUF only: every quantized matrix, the output head included, becomes
``MatMulNBits`` blocks with the file's own codes and scales, see :mod:`.gguf_blocks`; tensors of
other types, and the embedding table, are their exact float32 values; activations and cache in
float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt

from infer.contract import Capability
from infer.errors import InvalidParameterError, UnsupportedModelError

if TYPE_CHECKING:
    import onnx

    from infer.bundle import ArchSpec, Bundle
    from infer_backend_onnx.gguf_blocks import BlockWeight
    from infer_backend_onnx.quantize import QuantizedWeight

__all__ = [
    "BUILDER_VERSION",
    "DATA_FILE",
    "DRAFT_DATA_FILE",
    "DTYPES",
    "KV_DTYPES",
    "MODEL_FILE",
    "SUPPORTED_FEATURES",
    "USE_DRAFT",
    "GraphConfig",
    "build_decoder",
    "past_names",
    "present_names",
]

#: Bumped whenever the graph this module writes changes, so cached builds are rebuilt.
BUILDER_VERSION: Final = "5"
#: Precisions :func:`build_decoder` can write, default first (``native``: a GGUF's own quant types).
DTYPES: Final = ("fp32", "fp16", "int4", "native")
#: What models of these graphs can do; one loaded without a draft graph has all but ``DRAFT``.
CAPABILITIES: Final = frozenset(
    {
        Capability.BATCH,
        Capability.DETERMINISTIC,
        Capability.TRUNCATE,
        Capability.FORK,
        Capability.ALL_LOGITS,
        Capability.DRAFT,
    }
)
#: Precisions of the KV cache :class:`GraphConfig` accepts (int8 is absent: ONNX Runtime's
#: ``GroupQueryAttention`` takes past keys and values in the query's float type only).
KV_DTYPES: Final = ("fp32", "fp16")
#: The :data:`infer.arch.FEATURES` entries the graph builds, checked at build: a feature added
#: to the registry later is refused here until the graph writes it and it is listed.
SUPPORTED_FEATURES: Final = frozenset(
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
#: File names of a build inside its folder.
MODEL_FILE: Final = "model.onnx"
DATA_FILE: Final = "model.onnx.data"
#: The draft graph's weights, beside the model's, in a graph built with a draft.
DRAFT_DATA_FILE: Final = "draft.onnx.data"
#: Boolean scalar input of a graph built with a draft: true runs the step on the draft's weights.
USE_DRAFT: Final = "use_draft"

#: Standard opset: 23 brings ``RMSNormalization``, which the checker knows.
_OPSET: Final = 23
_IR_VERSION: Final = 10
_MS: Final = "com.microsoft"
#: External tensors start on 64-byte boundaries so the runtime can map them aligned.
_ALIGN: Final = 64


@dataclass(frozen=True, slots=True)
class GraphConfig:
    """How to build the graph: precision and, for int4, the quantisation block."""

    #: One of :data:`DTYPES`.
    dtype: str = "fp32"
    #: Weights per int4 block (a power of two from 16 up; 32 and 64 measured equally fast).
    block_size: int = 32
    #: ``MatMulNBits`` accuracy level: 4 computes with int8 activations (measured ~3.5x faster
    #: decode than levels 0/1 even on an AVX2-only CPU, at the same error); only used for int4.
    accuracy_level: int = 4
    #: int4 only: symmetric blocks (zero point fixed at 8, no zero-point tensor). Measured on
    #: SmolLM2-135M: ~10% faster decode than asymmetric blocks at a similar error.
    symmetric: bool = True
    #: int4 only: bits of the output head, 4 or 8 (on SmolLM2-135M, 8 cuts the first-token KL
    #: to the fp32 logits from 0.65 to 0.50 for ~8% slower decode). The embedding table is
    #: 8-bit blocks in an int4 graph either way, shared with a tied 8-bit head.
    head_bits: int = 8
    #: int4 only: 4-bit blocks with float minimums fitted by least squares
    #: (:func:`~infer_backend_onnx.quantize.fit_affine`), the minimums carried as an offset
    #: product; ``False``: round-to-nearest (``symmetric`` says which grid).
    fit: bool = True
    #: int4 only: keep weights that already lie on a 4-bit block grid (GGUF Q4_1 imports) exactly
    #: on it, adding the block offsets as a separate small product, instead of requantising.
    #: Measured on SmolLM2 Q4_1 (with ``head_bits=8``, which holds its Q8_0 head exactly):
    #: first-token KL to fp32 0.006 instead of 0.65, max logit error 0.8 instead of 7.3, for
    #: ~20% slower decode than the default int4 graph.
    exact_grid: bool = False
    #: Precision of the KV cache and of the attention op, one of :data:`KV_DTYPES`; ``None``: the
    #: activations' (float16 in an ``fp16`` graph, float32 otherwise). When it differs from the
    #: activations, q/k/v are cast to it before ``GroupQueryAttention`` and its output back, so
    #: the op, its rotary tables and the cache all run in this precision.
    kv_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidParameterError("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise InvalidParameterError("kv_dtype", self.kv_dtype, f"one of {', '.join(KV_DTYPES)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InvalidParameterError("block_size", self.block_size, "a power of two, at least 16")
        if self.head_bits not in (4, 8):
            raise InvalidParameterError("head_bits", self.head_bits, "4 or 8")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InvalidParameterError("accuracy_level", self.accuracy_level, "an integer from 0 to 4")

    @property
    def key(self) -> str:
        """A short string naming this configuration (part of the build cache key)."""
        key = self.dtype
        if self.dtype == "native":
            key += f"-a{self.accuracy_level}"
        if self.dtype == "int4":
            key += f"-b{self.block_size}-a{self.accuracy_level}-h{self.head_bits}" + ("-sym" if self.symmetric else "")
            key += "-grid" if self.exact_grid else ""
            key += "-fit" if self.fit else ""
        if self.kv_dtype not in (None, self.activations):
            key += f"-kv{self.kv_dtype}"
        return key

    @property
    def activations(self) -> str:
        """Precision of the activations: ``fp16`` in an fp16 graph, ``fp32`` in every other."""
        return "fp16" if self.dtype == "fp16" else "fp32"

    @property
    def cache(self) -> str:
        """Precision of the KV cache and the attention op (``kv_dtype``, or the activations')."""
        return self.kv_dtype or self.activations


def past_names(layer: int) -> tuple[str, str]:
    """Input names of layer ``layer``'s past keys and values."""
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """Output names of layer ``layer``'s present keys and values."""
    return f"present.{layer}.key", f"present.{layer}.value"


def build_decoder(bundle: Bundle, config: GraphConfig, out_dir: Path, draft: GraphConfig | None = None) -> Path:
    """Write the decoder graph of ``bundle`` into ``out_dir``; return the path of ``model.onnx``.

    Weights go to ``model.onnx.data`` beside it as external data, written tensor by tensor so
    the build never holds more than one layer's weights in memory. With ``draft``, the graph
    also holds the weights at the draft's precision (``draft.onnx.data``) and takes a
    :data:`USE_DRAFT` input choosing which of the two computes the step (see :func:`_with_draft`).
    """
    import onnx

    spec = bundle.spec
    spec.require(SUPPORTED_FEATURES, backend="onnx", path=bundle.path)
    if spec.rotary_dim % 16:
        raise UnsupportedModelError(
            f"onnx backend cannot run this {spec.model_type} model: it rotates {spec.rotary_dim} dims of each head, "
            "and ONNX Runtime's GroupQueryAttention rotates a multiple of 16",
            path=bundle.path,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _write(bundle, config, out_dir / DATA_FILE)
    if draft is not None:
        model = _with_draft(model, _write(bundle, draft, out_dir / DRAFT_DATA_FILE))
    onnx.save_model(model, str(out_dir / MODEL_FILE))
    return out_dir / MODEL_FILE


def _write(bundle: Bundle, config: GraphConfig, data_path: Path) -> onnx.ModelProto:
    """``config``'s graph of ``bundle``, its weights written to ``data_path``."""
    with data_path.open("wb") as data:
        return _GraphBuilder(bundle.spec, config, _ExternalData(data, data_path.name)).build(bundle)


def _with_draft(model: onnx.ModelProto, draft: onnx.ModelProto) -> onnx.ModelProto:
    """One graph computing a step either way: an ``If`` on :data:`USE_DRAFT` whose branches are
    ``draft``'s graph and ``model``'s, both reading the same inputs (the KV cache included) and
    writing the same outputs.

    Why one graph and not a session per graph: one session means one thread pool. Two sessions
    taking turns on the same cores each leave a pool spinning after its step, which slowed the
    other's steps (a SmolLM2 draft step took ~16 ms instead of ~9 on 2 cores); pools that do not
    spin pay for waking their threads instead (~10% a step); onnxruntime's process-wide pool,
    once made, is the only one any session of the process may use. The branch not taken costs
    nothing (measured: the model's own steps through this graph at 0.99x a graph without a draft).
    """
    import copy

    from onnx import TensorProto, helper

    outer = {i.name for i in model.graph.input}
    outputs = [copy.deepcopy(o) for o in model.graph.output]  # the branches rename their own
    then_branch = _branch(draft.graph, "draft/", outer)
    else_branch = _branch(model.graph, "model/", outer)
    choose = helper.make_node(
        "If", [USE_DRAFT], [o.name for o in outputs], then_branch=then_branch, else_branch=else_branch
    )
    graph = helper.make_graph(
        [choose],
        model.graph.name,
        [*model.graph.input, helper.make_tensor_value_info(USE_DRAFT, TensorProto.BOOL, [])],
        outputs,
    )
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _branch(graph: onnx.GraphProto, prefix: str, outer: set[str]) -> onnx.GraphProto:
    """``graph`` as an ``If`` branch: no inputs of its own (it reads the outer graph's), and every
    name it defines prefixed, so the two branches and the outer graph never share one."""
    from onnx import helper

    defined = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    renamed = {name: prefix + name for name in defined - outer - {""}}
    nodes = []
    for n in graph.node:
        node = helper.make_node(
            n.op_type,
            [renamed.get(x, x) for x in n.input],
            [renamed.get(x, x) for x in n.output],
            name=prefix + n.name,
            domain=n.domain,
        )
        node.attribute.extend(n.attribute)
        nodes.append(node)
    initializers = []
    for t in graph.initializer:
        t.name = renamed[t.name]
        initializers.append(t)
    outputs = []
    for o in graph.output:
        o.name = renamed[o.name]
        outputs.append(o)
    return helper.make_graph(nodes, prefix.rstrip("/"), [], outputs, initializers)


class _ExternalData:
    """Appends tensors to one external-data file and makes the protos that point at them."""

    def __init__(self, file: BinaryIO, location: str) -> None:
        self._file = file
        self._location = location
        self._offset = 0

    def tensor(self, name: str, array: npt.NDArray[Any]) -> onnx.TensorProto:
        from onnx import TensorProto, helper

        array = np.ascontiguousarray(array)
        pad = -self._offset % _ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        proto.dims.extend(array.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self._location), ("offset", self._offset), ("length", array.nbytes)):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        self._file.write(array.tobytes())
        self._offset += array.nbytes
        return proto


class _GraphBuilder:
    """Accumulates nodes and initializers; one method per block of the decoder."""

    def __init__(self, spec: ArchSpec, config: GraphConfig, data: _ExternalData) -> None:
        self.spec = spec
        self.config = config
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._shared: set[str] = set()
        self.act_dtype = np.float16 if config.dtype == "fp16" else np.float32
        self.kv_dtype = np.float16 if config.cache == "fp16" else np.float32
        #: ``[batch, sequence, -1]`` of the step's input ids, for attention's input (set by :meth:`build`).
        self.rows_shape = ""

    # -- plumbing ---------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        from onnx import helper

        self._count += 1
        outs = [f"{op_type.lower()}_{self._count}_{i}" for i in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._count}", domain=domain, **attrs)
        )
        return outs

    def const(self, name: str, array: npt.NDArray[Any], *, external: bool = True) -> str:
        from onnx import numpy_helper

        if external and array.nbytes >= 1024:
            self.initializers.append(self.data.tensor(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, bundle: Bundle, name: str) -> npt.NDArray[np.float32]:
        return np.asarray(bundle.weights[name], dtype=np.float32)

    def project(
        self,
        bundle: Bundle,
        x: str,
        name: str,
        parts: list[str],
        bias: npt.NDArray[np.float32] | None,
        *,
        bits: int = 4,
    ) -> str:
        """``x @ W.T + bias`` for ``W`` the tensors ``parts`` stacked along the outputs (one product)."""
        if self.config.dtype == "native":
            return self.native_linear(bundle, x, name, parts, bias)
        w = np.concatenate([self.weight(bundle, part) for part in parts], axis=0)
        return self.linear(x, name, w, bias, bits=bits)

    def native_block(self, bundle: Bundle, name: str) -> BlockWeight | None:
        """Tensor ``name`` of a GGUF bundle as ``MatMulNBits`` blocks, or ``None`` for a float or unmapped type."""
        from infer.gguf_tensors import GGUFWeights
        from infer_backend_onnx.gguf_blocks import from_gguf

        weights = bundle.weights
        assert isinstance(weights, GGUFWeights)  # the loader gives native only to GGUF bundles
        block = from_gguf(weights.raw(name))
        weights.release(name)  # the blocks were copied into the graph's layout: drop the file's pages
        return block

    def block_embedding(self, block: BlockWeight) -> tuple[str, str]:
        """Look up ``input_ids`` in a quantized table as stored: ``GatherBlockQuantized`` on the very
        codes a tied output head multiplies by. Returns the embeddings and the codes' initializer."""
        q = block.weight
        name = "model.embed_tokens"
        packed = self.const(name + ".qweight", q.packed)
        # The lookup reads [vocab, blocks, block] codes with one scale per block: scales as [vocab, blocks, 1].
        (y,) = self.op(
            "GatherBlockQuantized",
            [packed, "input_ids", self.const(name + ".gather_scales", q.scales[..., None])],
            domain=_MS,
            gather_axis=0,
            quantize_axis=2,
            block_size=q.block_size,
            bits=q.bits,
        )
        if block.offsets is not None:
            (shift,) = self.op("Gather", [self.const(name + ".gather_offsets", block.offsets[..., None]), "input_ids"])
            (y,) = self.op("Add", [y, shift])
        (x,) = self.op("Reshape", [y, self.token_rows(q.k)])
        return x, packed

    def native_linear(
        self,
        bundle: Bundle,
        x: str,
        name: str,
        parts: list[str],
        bias: npt.NDArray[np.float32] | None,
    ) -> str:
        """The GGUF blocks of ``parts`` as they are: one ``MatMulNBits`` when their blocks agree,
        else one product per part joined by a ``Concat``; a float tensor is a float32 ``MatMul``."""
        from infer_backend_onnx.gguf_blocks import join

        blocks = [self.native_block(bundle, part) for part in parts]
        if all(b is not None for b in blocks):
            joined = join([b for b in blocks if b is not None])
            if joined is not None:
                return self.blocks_linear(x, name, joined.weight, joined.offsets, bias)
        outs = []
        for i, (part, b) in enumerate(zip(parts, blocks, strict=True)):
            sub = name if len(parts) == 1 else f"{name}.{i}"
            if b is None:
                (y,) = self.op("MatMul", [x, self.const(sub + ".weight", self.weight(bundle, part).T)])
            else:
                y = self.blocks_linear(x, sub, b.weight, b.offsets, None)
            outs.append(y)
        (y,) = self.op("Concat", outs, axis=-1) if len(outs) > 1 else (outs[0],)
        if bias is not None:
            (y,) = self.op("Add", [y, self.const(name + ".bias", bias.astype(np.float32))])
        return y

    # -- blocks -----------------------------------------------------------------------------
    def linear(
        self,
        x: str,
        name: str,
        w: npt.NDArray[np.float32],
        bias: npt.NDArray[np.float32] | None,
        *,
        bits: int = 4,
    ) -> str:
        """``x @ w.T + bias`` with ``w`` in Hugging Face layout ``[out, in]``."""
        if self.config.dtype == "int4":
            from infer_backend_onnx.quantize import fit_grid, quantize

            fitted = fit_grid(w, self.config.block_size, bits=bits) if self.config.exact_grid else None
            if fitted is not None:
                return self.blocks_linear(x, name, fitted[0], fitted[1], bias)
            if bits == 4 and self.config.fit:
                from infer_backend_onnx.quantize import fit_affine

                q4, offsets = fit_affine(w, self.config.block_size, bits=4)
                return self.blocks_linear(x, name, q4, offsets, bias)
            q = quantize(w, self.config.block_size, bits=bits, symmetric=self.config.symmetric)
            inputs = [x, self.const(name + ".qweight", q.packed), self.const(name + ".scales", q.scales)]
            # Symmetric blocks use the op's default zero point: no tensor to read.
            inputs.append("" if q.zero_points is None else self.const(name + ".zero_points", q.zero_points))
            if bias is not None:
                inputs += ["", self.const(name + ".bias", bias.astype(np.float32))]  # input 4 (g_idx) unused
            (y,) = self.op(
                "MatMulNBits",
                inputs,
                domain=_MS,
                K=w.shape[1],
                N=w.shape[0],
                bits=bits,
                block_size=self.config.block_size,
                accuracy_level=self.config.accuracy_level,
            )
            return y
        (y,) = self.op("MatMul", [x, self.const(name + ".weight", w.T.astype(self.act_dtype))])
        if bias is not None:
            (y,) = self.op("Add", [y, self.const(name + ".bias", bias.astype(self.act_dtype))])
        return y

    def blocks_linear(
        self,
        x: str,
        name: str,
        q: QuantizedWeight,
        offsets: npt.NDArray[np.float32] | None,
        bias: npt.NDArray[np.float32] | None,
        *,
        packed: str | None = None,
    ) -> str:
        """``x @ (offsets + scales * (codes - 2**(bits-1))).T``: the codes through ``MatMulNBits``
        (default zero point), the per-block offsets, when any, as a small product with the sums of
        ``x`` over each block. ``packed``: an initializer already holding ``q.packed`` (a tied
        head shares the lookup's)."""
        n, k = q.packed.shape[0], q.k
        inputs = [
            x,
            packed or self.const(name + ".qweight", q.packed),
            self.const(name + ".scales", q.scales),
            "",  # default zero point: the offsets carry the grid's minimum
        ]
        if bias is not None:
            inputs += ["", self.const(name + ".bias", bias.astype(np.float32))]
        (y,) = self.op(
            "MatMulNBits",
            inputs,
            domain=_MS,
            K=k,
            N=n,
            bits=q.bits,
            block_size=q.block_size,
            accuracy_level=self.config.accuracy_level,
        )
        if offsets is None:
            return y
        # The block sums as a product with a 0/1 matrix (one per K and block size, shared):
        # one small node where a Reshape and a ReduceSum took two, 120 times a step.
        (sums,) = self.op("MatMul", [x, self.block_sums(k, q.block_size)])
        # sums @ offsets + y in one node (the graph's activations are [tokens, features])
        (out,) = self.op("Gemm", [sums, self.const(name + ".offsets", np.ascontiguousarray(offsets.T)), y])
        return out

    def attention(self, bundle: Bundle, layer: int, x: str, cos: str, sin: str) -> str:
        from onnx import helper

        s = self.spec
        p = f"model.layers.{layer}.self_attn."
        # One projection for q, k and v: GroupQueryAttention takes them packed (Phi-3 stores them so).
        qkv_parts = [p + "qkv_proj.weight"] if s.fused_projections else [p + f"{n}_proj.weight" for n in "qkv"]
        bias = None
        if s.attention_bias:
            bias = np.concatenate([self.weight(bundle, p + f"{n}_proj.bias") for n in "qkv"], axis=0)
        qkv = self.project(bundle, x, p + "qkv_proj", qkv_parts, bias)
        qkv_inputs = [qkv, "", ""]
        if s.qk_norm:
            # GroupQueryAttention's own q/k norm inputs have no CPU kernel: normalise each head
            # here, before the op rotates them.
            q_size, kv_size = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
            sizes = self.const(f"{p}qkv_split", np.array([q_size, kv_size, kv_size], np.int64), external=False)
            q, k, v = self.op("Split", [qkv, sizes], n_out=3, axis=-1)
            q, k = self.head_norm(bundle, q, p + "q_norm.weight"), self.head_norm(bundle, k, p + "k_norm.weight")
            qkv_inputs = [q, k, v]
        window = s.window(layer)
        attrs: dict[str, Any] = {}
        if window is not None:
            # Measured against the reference on ORT 1.32 CPU: a query sees local_window_size keys,
            # its own included, exactly the spec's window (window - 1 is wrong from position W on).
            attrs["local_window_size"] = window
        if s.attention_softcap is not None:
            attrs["softcap"] = s.attention_softcap
        past_k, past_v = past_names(layer)
        rotary = s.rope_layers[layer]
        cast = self.kv_dtype != self.act_dtype
        # GroupQueryAttention reads [batch, sequence, features]; the rest of the graph, [tokens, features]
        qkv_inputs = [self.op("Reshape", [t, self.rows_shape])[0] if t else t for t in qkv_inputs]
        if cast:
            to = helper.np_dtype_to_tensor_dtype(np.dtype(self.kv_dtype))
            qkv_inputs = [self.op("Cast", [t], to=to)[0] if t else t for t in qkv_inputs]
        out, _, _ = self.op(
            "GroupQueryAttention",
            [*qkv_inputs, past_k, past_v, "seqlens_k", "total_sequence_length", *((cos, sin) if rotary else ())],
            n_out=3,
            domain=_MS,
            num_heads=s.num_attention_heads,
            kv_num_heads=s.num_key_value_heads,
            do_rotary=int(rotary),
            rotary_interleaved=0,
            scale=s.scale,
            **attrs,
        )
        # Name the KV outputs as the I/O contract says.
        node = self.nodes[-1]
        node.output[1], node.output[2] = present_names(layer)
        if cast:
            (out,) = self.op("Cast", [out], to=helper.np_dtype_to_tensor_dtype(np.dtype(self.act_dtype)))
        q_size = s.num_attention_heads * s.head_dim
        (out,) = self.op("Reshape", [out, self.token_rows(q_size)])
        o_bias = self.weight(bundle, p + "o_proj.bias") if s.o_bias else None
        return self.project(bundle, out, p + "o_proj", [p + "o_proj.weight"], o_bias)

    def head_norm(self, bundle: Bundle, x: str, weight: str) -> str:
        """RMSNorm over each head of ``x`` ``[tokens, heads * head_dim]``, shape kept."""
        d = self.spec.head_dim
        per_head = self.shared("head_shape", np.array([0, -1, d], np.int64))
        flat = self.shared("heads_flat_shape", np.array([0, -1], np.int64))
        (heads,) = self.op("Reshape", [x, per_head])
        (normed,) = self.rms_norm(heads, self.norm_weight(bundle, weight))
        (out,) = self.op("Reshape", [normed, flat])
        return out

    def rms_norm(self, x: str, weight: str) -> list[str]:
        """``RMSNormalization`` over the last axis with the spec's epsilon."""
        return self.op("RMSNormalization", [x, weight], axis=-1, epsilon=self.spec.rms_norm_eps)

    def norm_weight(self, bundle: Bundle, name: str) -> str:
        """A norm's weight in the activation dtype, with the spec's offset folded in ((1 + w) norms)."""
        if name not in self._shared:
            w = self.weight(bundle, name) + np.float32(self.spec.norm_offset)
            self.shared(name, w.astype(self.act_dtype))
        return name

    def shared(self, name: str, array: npt.NDArray[Any]) -> str:
        """A small constant made once however many nodes read it."""
        if name not in self._shared:
            self._shared.add(name)
            self.const(name, array, external=False)
        return name

    def token_rows(self, width: int) -> str:
        """The ``Reshape`` target ``[-1, width]``: the graph's ``[tokens, features]`` layout."""
        name = f"token_rows_shape.{width}"
        return name if name in self._shared else self.shared(name, np.array([-1, width], np.int64))

    def block_sums(self, k: int, block_size: int) -> str:
        """A ``[k, k // block_size]`` 0/1 matrix: ``x @`` it sums ``x`` over each block of ``block_size``."""
        name = f"block_sums.{k}.{block_size}"
        if name in self._shared:
            return name
        ones = np.kron(np.eye(k // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32))
        return self.shared(name, ones)

    def mlp(self, bundle: Bundle, layer: int, x: str) -> str:
        s = self.spec
        p = f"model.layers.{layer}.mlp."

        def bias(name: str) -> npt.NDArray[np.float32] | None:
            return self.weight(bundle, p + name + ".bias") if s.mlp_bias else None

        b_gate, b_up = bias("gate_proj"), bias("up_proj")
        # Gate and up share their input: one matrix product, then a split (measured: as fast as
        # two products, and one op fewer per layer). Phi-3 stores them stacked already.
        b_gate_up = None if b_gate is None or b_up is None else np.concatenate([b_gate, b_up])
        parts = [p + "gate_up_proj.weight"] if s.fused_projections else [p + "gate_proj.weight", p + "up_proj.weight"]
        gate_up = self.project(bundle, x, p + "gate_up_proj", parts, b_gate_up)
        split = self.const(f"{p}split", np.array([s.intermediate_size] * 2, dtype=np.int64), external=False)
        gate, up = self.op("Split", [gate_up, split], n_out=2, axis=-1)
        if s.hidden_act == "gelu_tanh":
            (act,) = self.op("Gelu", [gate], approximate="tanh")
        else:
            (sig,) = self.op("Sigmoid", [gate])
            (act,) = self.op("Mul", [gate, sig])
        (h,) = self.op("Mul", [act, up])
        return self.project(bundle, h, p + "down_proj", [p + "down_proj.weight"], bias("down_proj"))

    def skip_norm(self, x: str, residual: str, weight: str) -> tuple[str, str]:
        """``(rmsnorm(x + residual), x + residual)`` in one fused op."""
        normed, _, _, total = self.op(
            "SkipSimplifiedLayerNormalization",
            [x, residual, weight],
            n_out=4,
            domain=_MS,
            epsilon=self.spec.rms_norm_eps,
        )
        # Mean and inverse std are not needed: drop them so the kernel skips writing them.
        node = self.nodes[-1]
        node.output[1] = node.output[2] = ""
        return normed, total

    def rope_tables(self) -> dict[int, tuple[str, str]]:
        """cos/sin caches by layer: one pair per distinct set of frequencies (two on Gemma 3)."""
        s = self.spec
        tables: dict[int, tuple[str, str]] = {}
        for n, layers in enumerate(s.rope_groups().values()):
            cos_table, sin_table = s.rope_cos_sin(np.arange(s.max_position_embeddings), layers[0])
            prefix = "rope." if n == 0 else f"rope.{n}."
            # Only the attention op reads them, in the cache's precision.
            cos = self.const(prefix + "cos_cache", cos_table.astype(self.kv_dtype))
            sin = self.const(prefix + "sin_cache", sin_table.astype(self.kv_dtype))
            tables |= dict.fromkeys(layers, (cos, sin))
        return tables

    def build(self, bundle: Bundle) -> onnx.ModelProto:
        from onnx import TensorProto, helper

        s, dt = self.spec, self.act_dtype
        native = self.config.dtype == "native"
        # A quantized table stays quantized in the file's own blocks; an int4 graph's is 8-bit
        # blocks; any other is a float Gather.
        embed_block = self.native_block(bundle, "model.embed_tokens.weight") if native else None
        if self.config.dtype == "int4":
            from infer_backend_onnx.gguf_blocks import BlockWeight
            from infer_backend_onnx.quantize import quantize

            table = self.weight(bundle, "model.embed_tokens.weight")
            embed_block = BlockWeight(quantize(table, self.config.block_size, bits=8, symmetric=True), None)
        if embed_block is not None:
            x, embed_codes = self.block_embedding(embed_block)
        else:
            embed_w = self.weight(bundle, "model.embed_tokens.weight")
            embed = self.const("model.embed_tokens.weight", embed_w.astype(dt))
            (x,) = self.op("Gather", [embed, "input_ids"])
        if s.embedding_scale != 1.0:
            # In the activation dtype, as transformers scales Gemma's embeddings.
            scale = self.const("embedding_scale", np.array(s.embedding_scale, dtype=dt), external=False)
            (x,) = self.op("Mul", [x, scale])
        # Activations are [tokens, features] from here: every product is then a 2-D one (Gemm can
        # add block offsets in the same node); attention gets [batch, sequence, features] back.
        if embed_block is None:
            (x,) = self.op("Reshape", [x, self.token_rows(s.hidden_size)])
        (ids_shape,) = self.op("Shape", ["input_ids"])
        minus_one = self.const("minus_one", np.array([-1], np.int64), external=False)
        (self.rows_shape,) = self.op("Concat", [ids_shape, minus_one], axis=0)
        rope = self.rope_tables()

        def norm_weight(name: str) -> str:
            return self.norm_weight(bundle, name)

        (h,) = self.rms_norm(x, norm_weight("model.layers.0.input_layernorm.weight"))
        residual = x
        for layer in range(s.num_hidden_layers):
            p = f"model.layers.{layer}."
            attn = self.attention(bundle, layer, h, *rope[layer])
            if s.sandwich_norms:
                (attn,) = self.rms_norm(attn, norm_weight(p + "post_attention_layernorm.weight"))
            h, residual = self.skip_norm(attn, residual, norm_weight(s.pre_mlp_norm(layer)))
            mlp = self.mlp(bundle, layer, h)
            if s.sandwich_norms:
                (mlp,) = self.rms_norm(mlp, norm_weight(p + "post_feedforward_layernorm.weight"))
            nxt = f"model.layers.{layer + 1}.input_layernorm.weight"
            h, residual = self.skip_norm(
                mlp, residual, norm_weight(nxt if layer + 1 < s.num_hidden_layers else "model.norm.weight")
            )
        # Only the rows' last tokens reach the output head.
        (last,) = self.op("Gather", [h, "last_token_index"], axis=0)
        head_name = "model.embed_tokens.weight" if s.tie_word_embeddings else "lm_head.weight"
        head_block = None
        if native:
            head_block = embed_block if s.tie_word_embeddings else self.native_block(bundle, head_name)
        elif self.config.dtype == "int4" and s.tie_word_embeddings and self.config.head_bits == 8:
            head_block = embed_block
        if head_block is not None:
            shared = embed_codes if s.tie_word_embeddings else None
            logits = self.blocks_linear(last, "lm_head", head_block.weight, head_block.offsets, None, packed=shared)
        elif self.config.dtype == "int4":
            head_w = self.weight(bundle, head_name)
            logits = self.linear(last, "lm_head", head_w, None, bits=self.config.head_bits)
        else:
            head = embed if s.tie_word_embeddings else self.const(head_name, self.weight(bundle, head_name).astype(dt))
            # Gemm with transB reads the [vocab, hidden] table as stored: tied heads share it with the lookup.
            (logits,) = self.op("Gemm", [last, head], transB=1)
            if dt != np.float32:
                (logits,) = self.op("Cast", [logits], to=TensorProto.FLOAT)
        if s.final_softcap is not None:
            cap = self.const("final_softcap", np.array(s.final_softcap, dtype=np.float32), external=False)
            (scaled,) = self.op("Div", [logits, cap])
            (capped,) = self.op("Tanh", [scaled])
            (logits,) = self.op("Mul", [capped, cap])
        self.nodes[-1].output[0] = "logits"

        kv_shape: list[str | int] = ["batch", s.num_key_value_heads, "kv_capacity", s.head_dim]
        kv_elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.kv_dtype))
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
            helper.make_tensor_value_info("last_token_index", TensorProto.INT64, ["batch"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", s.vocab_size])]
        for layer in range(s.num_hidden_layers):
            inputs += [helper.make_tensor_value_info(n, kv_elem, kv_shape) for n in past_names(layer)]
            outputs += [helper.make_tensor_value_info(n, kv_elem, kv_shape) for n in present_names(layer)]
        graph = helper.make_graph(self.nodes, "infer_decoder", inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", _OPSET), helper.make_opsetid(_MS, 1)],
            ir_version=_IR_VERSION,
            producer_name="infer-backend-onnx",
            producer_version=BUILDER_VERSION,
        )
        helper.set_model_props(model, {"infer.dtype": self.config.key, "infer.kv_dtype": np.dtype(self.kv_dtype).name})
        return model
