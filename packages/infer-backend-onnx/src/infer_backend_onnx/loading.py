"""From a :class:`~infer.contract.LoadSpec` to a loaded model: options, build cache, session."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from infer.contract import Capability
from infer.errors import InvalidParameterError

#: Values of the ``kv_dtype`` option (kept in step with :data:`infer_backend_onnx.graph.KV_DTYPES`,
#: which this module does not import at discovery).
KV_DTYPES: Final = ("fp32", "fp16")

if TYPE_CHECKING:
    from infer.bundle import Bundle
    from infer.contract import LoadSpec, ModelHandle
    from infer_backend_onnx.build_cache import CacheEntry
    from infer_backend_onnx.graph import GraphConfig

__all__ = ["KV_DTYPES", "LoadOptions", "kv_precision", "load", "parse_options"]

#: Options :func:`infer.load` may pass to this backend, with what each expects.
OPTIONS: Final = {
    "threads": "a positive integer (intra-op threads; default: the CPUs this process may use)",
    "cache_dir": "a folder path for built graphs (default: infer's cache folder)",
    "block_size": "32 or 64 (int4 quantisation block)",
    "head_bits": "4 or 8 (int4: bits of the output head; default 8)",
    "int4_fit": "true or false (int4: least-squares blocks with float minimums, default true; false: round-to-nearest)",
    "accuracy_level": "0 to 4 (int4/native MatMulNBits: 4, the default, int8 activations; 0: float32)",
    "exact_grid": "true or false (int4: keep weights already on a 4-bit grid, e.g. from a Q4_1 GGUF, exact)",
    "batch_invariant": "true or false (default true: int4 never runs a lone row, so batching never changes results)",
    "kv_dtype": "fp32 or fp16 (KV cache precision; default: the activations', fp16 on cuda and fp32 on cpu)",
    "draft": "none, native or int4 (a second graph of the same weights at that precision, on the same KV "
    "cache, drafting speculative tokens for an fp32 or fp16 model; default none)",
}
#: Values of the ``draft`` option.
DRAFTS: Final = ("none", "native", "int4")


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """Validated backend options."""

    threads: int | None = None
    cache_dir: Path | None = None
    block_size: int = 32
    head_bits: int = 8
    int4_fit: bool = True
    accuracy_level: int = 4
    exact_grid: bool = False
    batch_invariant: bool = True
    #: ``None``: the graph's activation precision (see :func:`kv_precision`).
    kv_dtype: str | None = None
    #: The draft graph's precision, or ``"none"``.
    draft: str = "none"


def parse_options(options: Mapping[str, Any]) -> LoadOptions:
    """Validate ``options``; unknown keys and bad values raise :class:`InvalidParameterError`."""
    for key in options:
        if key not in OPTIONS:
            raise InvalidParameterError(key, options[key], f"a known onnx backend option ({', '.join(OPTIONS)})")
    threads = options.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InvalidParameterError("threads", threads, OPTIONS["threads"])
    cache_dir = options.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise InvalidParameterError("cache_dir", cache_dir, OPTIONS["cache_dir"])
    block_size = options.get("block_size", 32)
    if block_size not in (32, 64) or isinstance(block_size, bool):
        raise InvalidParameterError("block_size", block_size, OPTIONS["block_size"])
    head_bits = options.get("head_bits", 8)
    if head_bits not in (4, 8) or isinstance(head_bits, bool):
        raise InvalidParameterError("head_bits", head_bits, OPTIONS["head_bits"])
    int4_fit = options.get("int4_fit", True)
    if not isinstance(int4_fit, bool):
        raise InvalidParameterError("int4_fit", int4_fit, OPTIONS["int4_fit"])
    accuracy_level = options.get("accuracy_level", 4)
    if accuracy_level not in (0, 1, 2, 3, 4) or isinstance(accuracy_level, bool):
        raise InvalidParameterError("accuracy_level", accuracy_level, OPTIONS["accuracy_level"])
    exact_grid = options.get("exact_grid", False)
    if not isinstance(exact_grid, bool):
        raise InvalidParameterError("exact_grid", exact_grid, OPTIONS["exact_grid"])
    batch_invariant = options.get("batch_invariant", True)
    if not isinstance(batch_invariant, bool):
        raise InvalidParameterError("batch_invariant", batch_invariant, OPTIONS["batch_invariant"])
    kv_dtype = options.get("kv_dtype")
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise InvalidParameterError("kv_dtype", kv_dtype, OPTIONS["kv_dtype"])
    draft = options.get("draft", "none")
    if draft not in DRAFTS:
        raise InvalidParameterError("draft", draft, OPTIONS["draft"])
    return LoadOptions(
        draft=draft,
        kv_dtype=kv_dtype,
        exact_grid=exact_grid,
        int4_fit=int4_fit,
        accuracy_level=accuracy_level,
        batch_invariant=batch_invariant,
        head_bits=head_bits,
        threads=threads,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        block_size=block_size,
    )


def load(spec: LoadSpec, options: Mapping[str, Any]) -> ModelHandle | None:
    """Load what ``spec`` names: a bundle is built (or taken from the cache), an export opened."""
    from infer_backend_onnx.devices import DEVICES, providers_for
    from infer_backend_onnx.exports import find_export, load_export

    # Decline what is not ours before judging options meant for whichever backend takes it.
    export = find_export(spec.path) if spec.bundle is None and spec.path is not None else None
    if spec.bundle is None and export is None:
        return None
    opts = parse_options(options)
    device = spec.device or DEVICES[0]
    providers_for(device)  # fail early, before a build, when the device cannot run here
    if spec.bundle is not None:
        return _load_bundle(spec.bundle, spec, opts, device)
    assert export is not None
    if opts.draft != "none":
        raise InvalidParameterError(
            "draft", opts.draft, "none for an ONNX export (drafts are built from a bundle's weights)"
        )
    return load_export(export, spec, device, threads=opts.threads, kv_dtype=opts.kv_dtype)


def kv_precision(requested: str | None, activations: str, device: str) -> str:
    """The KV cache precision to build: ``requested``, or by default the activations'.

    The default keeps float32 activations with a float32 cache on the CPU: ONNX Runtime 1.32's
    CPU ``GroupQueryAttention`` in half precision converts as it reads, and was measured slower
    than float32 on this project's AVX-512 CPU (no AVX512-FP16), e.g. 6.3 against 2.0 ms per
    layer at 6,000 cached tokens on SmolLM2's heads, while it halves the cache's memory. The
    CUDA kernel exists in half precision only, so cuda takes fp16 and refuses fp32.
    """
    kv = requested or activations
    if device == "cuda" and kv != "fp16":
        raise InvalidParameterError("kv_dtype", kv, "fp16 on cuda (the CUDA attention kernel runs in half precision)")
    return kv


def _load_bundle(bundle: Bundle, spec: LoadSpec, opts: LoadOptions, device: str) -> ModelHandle:
    from infer.gguf_tensors import GGUFWeights
    from infer_backend_onnx.devices import make_session
    from infer_backend_onnx.graph import CAPABILITIES
    from infer_backend_onnx.runtime import LOGITS_ATOL, OnnxModel
    from infer_backend_onnx.threads import cpu_budget

    # ONNX Runtime's CUDA GroupQueryAttention exists in half precision only: an fp32 graph would
    # run its attention on the CPU, copying the cache across every step.
    gguf = isinstance(bundle.weights, GGUFWeights)
    # A GGUF model runs in the file's own precision unless asked otherwise: any other dtype
    # rounds its weights a second time (or inflates them).
    dtype = spec.dtype or ("fp16" if device == "cuda" else "native" if gguf else "fp32")
    if device == "cuda" and dtype != "fp16":
        raise InvalidParameterError("dtype", dtype, "fp16 on cuda (the CUDA attention kernel runs in half precision)")
    # "native" never rounds the weights again: a GGUF's own blocks, or a float bundle's weights
    # as float32 (exact for F32, F16 and BF16 files alike).
    graph_dtype = "fp32" if dtype == "native" and not gguf else dtype
    config = _graph_config(
        graph_dtype, opts, kv_precision(opts.kv_dtype, "fp16" if graph_dtype == "fp16" else "fp32", device)
    )
    draft = _draft_config(opts, config, gguf) if opts.draft != "none" else None
    started = time.perf_counter()
    entry = _built(bundle, config, opts, draft)
    prepared = time.perf_counter()
    threads = opts.threads or cpu_budget()
    session = make_session(entry.model_path, device, threads)
    s = bundle.spec
    context = min(spec.context_length or s.max_position_embeddings, s.max_position_embeddings)
    model = OnnxModel(
        session,
        vocab_size=s.vocab_size,
        context_length=context,
        layers=s.num_hidden_layers,
        kv_heads=s.num_key_value_heads,
        head_dim=s.head_dim,
        kv_dtype=np.float16 if config.cache == "fp16" else np.float32,
        device=device,
        dtype=dtype,
        # int4 MatMulNBits with int8 activations takes another path for a single row than for
        # many: single-row steps are paired with a scratch row (see OnnxModel.pad_single_rows).
        pad_single_rows=config.dtype in ("int4", "native") and opts.batch_invariant,
        details={
            "graph": str(entry.model_path),
            "cache_hit": not entry.built,
            "build_s": round(prepared - started, 3),
            "session_s": round(time.perf_counter() - prepared, 3),
            "threads": threads,
            "providers": tuple(session.get_providers()),
            "batch_invariant": config.dtype not in ("int4", "native") or opts.batch_invariant,
            "compute_dtype": config.dtype,
            "kv_dtype": config.cache,
            "draft": opts.draft,
            # What "native" computes is the file's own types (Q4_1, F32...): the conformance suite grades by them.
            **({"weight_types": tuple(sorted({bundle.weights.info(n).dtype for n in bundle.weights}))} if gguf else {}),
        },
    )
    if draft is None:
        model.capabilities = CAPABILITIES - {Capability.DRAFT}
    # A cache rounded below the activations' precision rounds the logits like that precision does.
    declared = [LOGITS_ATOL.get(config.dtype), LOGITS_ATOL.get(config.cache) if config.kv_dtype else None]
    model.logits_atol = max((a for a in declared if a is not None), default=None)
    return model


def _graph_config(dtype: str, opts: LoadOptions, kv_dtype: str) -> GraphConfig:
    from infer_backend_onnx.graph import GraphConfig

    return GraphConfig(
        dtype=dtype,
        block_size=opts.block_size,
        head_bits=opts.head_bits,
        exact_grid=opts.exact_grid,
        fit=opts.int4_fit,
        accuracy_level=opts.accuracy_level,
        kv_dtype=kv_dtype,
    )


def _draft_config(opts: LoadOptions, model: GraphConfig, gguf: bool) -> GraphConfig:
    """The draft graph's configuration: ``opts.draft``'s precision, the model's cache layout."""
    if model.dtype not in ("fp32", "fp16"):
        raise InvalidParameterError(
            "draft", opts.draft, f"none for a {model.dtype} model (a draft pays only below the model's own precision)"
        )
    if opts.draft == "native" and not gguf:
        raise InvalidParameterError("draft", opts.draft, "int4 (native drafts read a GGUF file's own blocks)")
    # The same cache tensors serve both graphs: the draft's cache precision is the model's.
    return _graph_config(opts.draft, opts, model.cache)


def _built(bundle: Bundle, config: GraphConfig, opts: LoadOptions, draft: GraphConfig | None) -> CacheEntry:
    """``config``'s graph of ``bundle`` (with ``draft``'s beside it), from the build cache (built on first use)."""
    from infer_backend_onnx.build_cache import cache_root, cached_build
    from infer_backend_onnx.graph import BUILDER_VERSION, build_decoder

    content = bundle.content_hash()
    graph = config.key + (f"+draft-{draft.key}" if draft is not None else "")
    return cached_build(
        cache_root(opts.cache_dir),
        f"{content[:24]}-{graph}-v{BUILDER_VERSION}",
        lambda folder: build_decoder(bundle, config, folder, draft),
        {"bundle": str(bundle.path), "content_hash": content, "graph": graph, "builder_version": BUILDER_VERSION},
    )
