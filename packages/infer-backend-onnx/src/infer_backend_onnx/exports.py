"""Existing ONNX exports: Optimum text-generation-with-past folders and onnxruntime-genai folders.

Both name their I/O the same way: ``input_ids``, ``attention_mask``, ``position_ids``
(optional), ``past_key_values.N.key/value`` -> ``logits``, ``present.N.key/value``. Such a graph
concatenates the past with the new keys and values itself, so each sequence's cache is the
``present`` tensors of its last step, kept as ONNX Runtime values on the device and fed back as
the next ``past`` (never copied through numpy). Rows run one at a time: the exported graphs
expect left padding and shared lengths that per-sequence caches do not have.

A graph without ``past_key_values`` inputs would recompute the whole prefix for every token;
it is refused with :class:`~infer.errors.ModelFormatError`.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from infer.contract import Batch, Capability, KVCache
from infer.errors import BackendError, InvalidParameterError, ModelFormatError
from infer_backend_onnx.runtime import OnnxHandle, check_row

if TYPE_CHECKING:
    import onnxruntime as ort

    from infer.contract import LoadSpec

__all__ = ["Export", "ExportKVCache", "ExportModel", "find_export", "load_export"]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_TYPES: dict[str, type[np.floating[Any]]] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True, slots=True)
class Export:
    """An export found on disk: its graph, its folder and which tool's layout it follows."""

    model: Path
    folder: Path
    #: ``"genai"`` (genai_config.json) or ``"optimum"`` (config.json beside model.onnx).
    kind: str


def find_export(path: Path) -> Export | None:
    """The export at ``path`` (a folder or a ``.onnx`` file), or ``None`` if it is none."""
    if path.is_file() and path.suffix == ".onnx":
        folder = path.parent
        return Export(path, folder, "genai" if (folder / "genai_config.json").is_file() else "optimum")
    if not path.is_dir():
        return None
    genai = path / "genai_config.json"
    if genai.is_file():
        filename = _read_json(genai).get("model", {}).get("decoder", {}).get("filename")
        if not isinstance(filename, str):
            raise ModelFormatError("genai_config.json does not name model.decoder.filename", path=genai)
        return Export(path / filename, path, "genai")
    if (path / "model.onnx").is_file():
        return Export(path / "model.onnx", path, "optimum")
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path.name} is not valid JSON: {exc}", path=path) from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path.name} must hold a JSON object", path=path)
    return data


class ExportKVCache(KVCache):
    """One sequence's cache: the ``present`` values of its last step."""

    __slots__ = ("_capacity", "_length", "_model", "_released", "values")

    def __init__(self, model: ExportModel, capacity: int) -> None:
        self._model = model
        self._capacity = capacity
        self._length = 0
        self._released = False
        self.values: list[ort.OrtValue] | None = None

    @property
    def model(self) -> ExportModel:
        """The model that made this cache."""
        return self._model

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return self._length

    @property
    def capacity(self) -> int:
        """Tokens requested for this sequence (the graph itself grows the tensors)."""
        return max(self._capacity, self._length)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        if not self.values:
            return 0
        itemsize = np.dtype(self._model.kv_dtype).itemsize
        return sum(int(np.prod(v.shape())) * itemsize for v in self.values)

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released

    def keep(self, values: list[ort.OrtValue], length: int) -> None:
        """Hold ``values``, the ``present`` outputs of the step that brought the sequence to ``length`` tokens."""
        self.values = values
        self._length = length

    def release(self) -> None:
        """Drop the cached tensors."""
        self._released = True
        self.values = None
        self._length = 0


class ExportModel(OnnxHandle):
    """An existing decoder export loaded in an ONNX Runtime session."""

    #: An export's graph and cache layout are not ours: none of contract 1.1's KV capabilities.
    capabilities = frozenset({Capability.BATCH, Capability.DETERMINISTIC})

    def __init__(self, session: ort.InferenceSession, export: Export, device: str, details: dict[str, Any]) -> None:
        from infer_backend_onnx.devices import ort_device

        self.session = session
        self.export = export
        self.device = device
        self.ort_device = ort_device(device)
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        layers = sorted({int(m.group(1)) for name in inputs if (m := _PAST.match(name))})
        if not layers:
            raise ModelFormatError(
                f"{export.model.name} has no past_key_values.N.key/value inputs: a graph without a KV cache "
                "recomputes the whole prefix for every token; export it with past (Optimum: "
                "--task text-generation-with-past) or load the Hugging Face folder to let this backend build it",
                path=export.model,
            )
        missing = [n for n in ("input_ids",) if n not in inputs] + [n for n in ("logits",) if n not in outputs]
        missing += [
            f"present.{n}.{kv}" for n in layers for kv in ("key", "value") if f"present.{n}.{kv}" not in outputs
        ]
        if missing or layers != list(range(len(layers))):
            raise ModelFormatError(
                f"{export.model.name} does not follow the past/present I/O layout (missing {missing or 'layers'})",
                path=export.model,
            )
        past = inputs["past_key_values.0.key"]
        if past.type not in _ORT_TYPES or len(past.shape) != 4:
            raise ModelFormatError(f"past_key_values.0.key is {past.type} {past.shape}, expected a 4-D float tensor")
        self.kv_dtype = _ORT_TYPES[past.type]
        self.layers = len(layers)
        self.input_names = frozenset(inputs)
        self.past_names = [f"past_key_values.{n}.{kv}" for n in layers for kv in ("key", "value")]
        self.present_names = [f"present.{n}.{kv}" for n in layers for kv in ("key", "value")]
        config, genai = _read_json(export.folder / "config.json"), _read_json(export.folder / "genai_config.json")
        genai_model = genai.get("model", {})
        kv_heads = _dim(
            past.shape[1], config.get("num_key_value_heads"), genai_model.get("decoder", {}).get("num_key_value_heads")
        )
        head_dim = _dim(past.shape[3], config.get("head_dim"), genai_model.get("decoder", {}).get("head_size"))
        if head_dim is None and config.get("hidden_size") and config.get("num_attention_heads"):
            head_dim = int(config["hidden_size"]) // int(config["num_attention_heads"])
        if kv_heads is None or head_dim is None:
            raise ModelFormatError("cannot tell the KV head count and size: add config.json", path=export.folder)
        self.kv_heads, self.head_dim = kv_heads, head_dim
        logits_shape = next(o.shape for o in session.get_outputs() if o.name == "logits")
        vocab = _dim(logits_shape[-1], config.get("vocab_size"), genai_model.get("vocab_size"))
        if vocab is None:
            raise ModelFormatError("cannot tell the vocabulary size: add config.json", path=export.folder)
        self.vocab_size = vocab
        self.context_length = int(genai_model.get("context_length") or config.get("max_position_embeddings") or 2048)
        self.dtype = "fp16" if self.kv_dtype == np.float16 else ("int4" if _has_nbits(export.model) else "fp32")
        self._text_side(config, genai_model)
        self.details = MappingProxyType({**details, "export": export.kind, "graph": str(export.model)})
        self._lock = threading.Lock()

    def _text_side(self, config: dict[str, Any], genai_model: dict[str, Any]) -> None:
        folder = self.export.folder
        if (folder / "tokenizer.json").is_file():
            import tokenizers

            self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        template = tokenizer_config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None
        for source in (_read_json(folder / "generation_config.json"), config, genai_model):
            eos = source.get("eos_token_id")
            if isinstance(eos, int):
                self.eos_token_ids = (eos,)
                break
            if isinstance(eos, list) and eos:
                self.eos_token_ids = tuple(int(e) for e in eos)
                break

    def new_sequence(self, capacity: int) -> ExportKVCache:
        """An empty cache for a sequence of up to ``capacity`` tokens."""
        return ExportKVCache(self, min(capacity, self.context_length))

    def close(self) -> None:
        """Drop the session."""
        self.session = None

    def prefill(self, batch: Batch) -> npt.NDArray[np.float32]:
        """Feed each row's tokens (row by row); last-token logits ``[B, vocab]``."""
        return self._forward(batch, decode=False)

    def decode(self, batch: Batch) -> npt.NDArray[np.float32]:
        """Feed one token per row; next-token logits ``[B, vocab]``."""
        return self._forward(batch, decode=True)

    def _forward(self, batch: Batch, *, decode: bool) -> npt.NDArray[np.float32]:
        if self.session is None:
            from infer.errors import ModelClosedError

            raise ModelClosedError("this onnx model was closed; load it again")
        out = np.empty((batch.size, self.vocab_size), np.float32)
        with self._lock:
            for i, (seq, tokens) in enumerate(zip(batch.sequences, batch.tokens, strict=True)):
                if not isinstance(seq, ExportKVCache) or seq.model is not self or seq.released:
                    raise BackendError(f"row {i}: not a live cache of this onnx model", backend="onnx")
                check_row(i, tokens, seq.length, self.vocab_size, self.context_length, decode=decode)
                out[i] = self._run(seq, tokens)
        return out

    def _run(self, seq: ExportKVCache, tokens: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        past, new = seq.length, int(tokens.size)
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", tokens.astype(np.int64)[None, :])
        if "attention_mask" in self.input_names:
            io.bind_cpu_input("attention_mask", np.ones((1, past + new), np.int64))
        if "position_ids" in self.input_names:
            io.bind_cpu_input("position_ids", np.arange(past, past + new, dtype=np.int64)[None, :])
        if seq.values is None:
            empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)
            for name in self.past_names:
                io.bind_cpu_input(name, empty)
        else:
            for name, value in zip(self.past_names, seq.values, strict=True):
                io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, self.ort_device)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        seq.keep(list(outputs[1:]), past + new)
        logits = outputs[0].numpy()
        return np.asarray(logits.reshape(-1, logits.shape[-1])[-1], dtype=np.float32)


def _has_nbits(model: Path) -> bool:
    """Whether the graph quantises its weights with ``MatMulNBits`` (read without its weights)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    return any(node.op_type == "MatMulNBits" for node in graph.node)


def _dim(value: object, *fallbacks: object) -> int | None:
    if isinstance(value, int) and value > 0:
        return value
    for fallback in fallbacks:
        if isinstance(fallback, int) and fallback > 0:
            return fallback
    return None


def load_export(
    export: Export, spec: LoadSpec, device: str, *, threads: int | None, kv_dtype: str | None
) -> ExportModel:
    """Open ``export`` in a session on ``device`` and wrap it in a model handle.

    ``threads`` and ``kv_dtype`` are the validated load options of those names
    (:class:`~infer_backend_onnx.loading.LoadOptions`): an export's cache keeps its own precision,
    so a ``kv_dtype`` other than it is refused.
    """
    from infer_backend_onnx.devices import make_session
    from infer_backend_onnx.threads import cpu_budget

    if not export.model.is_file():
        raise ModelFormatError(f"the export's graph {export.model.name} is missing", path=export.model)
    threads = threads or cpu_budget()
    session = make_session(export.model, device, threads)
    model = ExportModel(session, export, device, {"threads": threads, "providers": tuple(session.get_providers())})
    if spec.dtype is not None and spec.dtype != model.dtype:
        raise InvalidParameterError(
            "dtype", spec.dtype, f"{model.dtype!r} or none: an export runs in its own precision ({export.model})"
        )
    own = "fp16" if model.kv_dtype == np.float16 else "fp32"
    if kv_dtype is not None and kv_dtype != own:
        raise InvalidParameterError(
            "kv_dtype", kv_dtype, f"{own!r} or none: an export's cache has its own precision ({export.model})"
        )
    return model
