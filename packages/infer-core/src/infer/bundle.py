"""Model bundles: a Hugging Face-layout folder validated into a typed spec and lazy weights.

A bundle folder holds ``config.json``, ``*.safetensors`` (or a sharded
``model.safetensors.index.json``), ``tokenizer.json``, ``tokenizer_config.json`` and/or
``chat_template.jinja``, and optionally ``generation_config.json``. :meth:`Bundle.open`
validates the configuration into an :class:`ArchSpec` and checks every safetensors header
against it (names, shapes, dtypes, file sizes) without reading tensor data; weights stay on
disk until a backend reads them, so a bundle that fails to open leaves nothing loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, final

import numpy as np
import numpy.typing as npt

from infer.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

__all__ = ["ArchSpec", "Bundle", "TensorInfo", "Weights", "is_bundle"]

#: ``model_type`` values of the Llama family that share one decoder layout.
SUPPORTED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "smollm"})

#: safetensors dtypes a weight may have; BF16 is widened to float32 on read (numpy has no bfloat16).
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})

INDEX_NAME = "model.safetensors.index.json"


@final
@dataclass(frozen=True, slots=True)
class ArchSpec:
    """The decoder architecture a backend needs to build the model (Llama family)."""

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

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, path: Path | None = None) -> ArchSpec:
        """Validate a parsed ``config.json``; raise a typed error naming what is wrong."""
        model_type = str(config.get("model_type", ""))
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"config.json: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}",
                path=path,
            )
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"config.json: hidden_act {act!r} is not supported (only 'silu')", path=path)

        def need_int(key: str, default: int | None = None) -> int:
            value = config.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelFormatError(f"config.json: {key} must be a positive integer, got {value!r}", path=path)
            return value

        def need_float(key: str, value: Any) -> float:
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ModelFormatError(f"config.json: {key} must be a positive number, got {value!r}", path=path)
            return float(value)

        heads = need_int("num_attention_heads")
        hidden = need_int("hidden_size")
        if config.get("head_dim") is not None:
            head_dim = need_int("head_dim")
        elif hidden % heads:
            raise ModelFormatError(
                f"config.json: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                "and no head_dim is given",
                path=path,
            )
        else:
            head_dim = hidden // heads
        if head_dim % 2:
            raise ModelFormatError(f"config.json: head_dim={head_dim} must be even for rotary embeddings", path=path)
        kv_heads = need_int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ModelFormatError(
                f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}",
                path=path,
            )
        rope_params = config.get("rope_parameters") or {}
        if not isinstance(rope_params, Mapping):
            raise ModelFormatError(f"config.json: rope_parameters must be an object, got {rope_params!r}", path=path)
        rope_theta = need_float("rope_theta", config.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        scaling = config.get("rope_scaling")
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = rope_params
        if scaling is not None:
            if not isinstance(scaling, Mapping):
                raise ModelFormatError(f"config.json: rope_scaling must be an object, got {scaling!r}", path=path)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise UnsupportedModelError(
                    f"config.json: rope scaling type {kind!r} is not supported (default, linear, llama3)", path=path
                )
            if kind == "default":
                scaling = None
            else:
                need_float("rope_scaling.factor", scaling.get("factor"))
        # qwen2 always has q/k/v biases (its configs do not say so); llama-style configs set
        # attention_bias for q/k/v and o together.
        attention_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_hidden_layers=need_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=need_int("max_position_embeddings", 2048),
            rms_norm_eps=need_float("rms_norm_eps", config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=dict(scaling) if scaling is not None else None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_bias=bool(config.get("attention_bias", False)) and model_type != "qwen2",
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    def rope_inv_freq(self) -> npt.NDArray[np.float64]:
        """Rotary inverse frequencies of one head, ``[head_dim // 2]``, with the configured scaling.

        ``linear`` divides every frequency by ``factor``; ``llama3`` keeps the high frequencies,
        divides the low ones by ``factor`` and blends the band between the two cut-offs.
        Backends and the reference forward share this one definition.
        """
        d = self.head_dim
        inv: npt.NDArray[np.float64] = 1.0 / self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        factor = float(scaling.get("factor", 1.0))
        if kind == "linear":
            return inv / factor
        if kind == "llama3":
            low = float(scaling.get("low_freq_factor", 1.0))
            high = float(scaling.get("high_freq_factor", 4.0))
            original = float(scaling.get("original_max_position_embeddings", 8192))
            # 0 in the low-frequency band (fully scaled), 1 in the high-frequency band (kept).
            keep = np.clip((original * inv / (2 * math.pi) - low) / (high - low), 0.0, 1.0)
            return (1 - keep) * inv / factor + keep * inv
        return inv

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
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
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


@final
@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    #: The file holding it.
    file: Path
    #: safetensors dtype name (``"F32"``, ``"BF16"``...).
    dtype: str
    shape: tuple[int, ...]
    #: Byte offset of the data from the start of the file.
    offset: int


class Weights(Mapping[str, npt.NDArray[np.floating[Any]]]):
    """Tensors of a bundle by Hugging Face name, read from disk on access.

    Values keep their stored precision, except BF16, which is returned as float32.
    """

    def __init__(self, tensors: Mapping[str, TensorInfo]) -> None:
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> npt.NDArray[np.floating[Any]]:
        try:
            info = self._tensors[name]
        except KeyError:
            raise KeyError(name) from None
        if not info.file.is_file():
            raise ModelNotFoundError(
                f"weight file {info.file.name} disappeared since the bundle was opened", path=info.file
            )
        if info.dtype == "BF16":
            # bfloat16 is the top half of a float32: widen by shifting the bits into place.
            count = math.prod(info.shape)
            raw = np.fromfile(info.file, dtype="<u2", count=count, offset=info.offset)
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(info.file), framework="numpy") as f:
                return f.get_tensor(name)  # type: ignore[no-any-return]
        except (SafetensorError, OSError) as exc:
            raise ModelFormatError(f"cannot read tensor {name!r} from {info.file.name}: {exc}", path=info.file) from exc

    def __contains__(self, name: object) -> bool:
        # Mapping's default would read the tensor to find out.
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def readable(self, dtype: str) -> bool:
        """Whether tensors of ``dtype`` (as :attr:`TensorInfo.dtype` names it) can be read."""
        return dtype in FLOAT_DTYPES

    def info(self, name: str) -> TensorInfo:
        """Header facts of ``name`` (file, dtype, shape) without reading its data."""
        return self._tensors[name]

    def file_of(self, name: str) -> Path:
        """The safetensors file holding ``name``."""
        return self._tensors[name].file

    @property
    def files(self) -> tuple[Path, ...]:
        """The weight files, sorted."""
        return tuple(sorted({t.file for t in self._tensors.values()}))


def is_bundle(path: Path) -> bool:
    """Whether ``path`` looks like a Hugging Face-layout model folder."""
    return path.is_dir() and (path / "config.json").is_file()


@final
@dataclass(frozen=True)
class Bundle:
    """A validated model folder."""

    path: Path
    spec: ArchSpec
    config: Mapping[str, Any]
    weights: Weights
    generation_config: Mapping[str, Any] = field(default_factory=dict)
    tokenizer_config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, *, validate: bool = True) -> Bundle:
        """Open the bundle at ``path`` and (by default) :meth:`validate` its weights.

        Raises :class:`~infer.errors.ModelNotFoundError` for a missing folder or file,
        :class:`~infer.errors.ModelFormatError` for malformed or inconsistent files and
        :class:`~infer.errors.UnsupportedModelError` for an architecture infer cannot run.
        """
        root = Path(path)
        if not root.is_dir():
            raise ModelNotFoundError(f"model folder {str(root)!r} does not exist", path=root)
        config = _read_json(root / "config.json", required=True)
        spec = ArchSpec.from_config(config, path=root / "config.json")
        if not (root / "tokenizer.json").is_file():
            raise ModelNotFoundError(
                f"tokenizer.json is missing from model folder {str(root)!r}; "
                "infer needs the fast-tokenizer file (save the tokenizer with the model, or import a GGUF)",
                path=root / "tokenizer.json",
            )
        weights: Weights
        if (root / "gguf_tensors.json").is_file():
            # Imported from GGUF: the weights stay in the GGUF file (see infer.gguf_tensors).
            from infer.gguf_tensors import GGUFWeights

            weights = GGUFWeights.open(root)
        else:
            weights = Weights(_index_safetensors(root))
        bundle = cls(
            path=root,
            spec=spec,
            config=config,
            weights=weights,
            generation_config=_read_json(root / "generation_config.json", required=False),
            tokenizer_config=_read_json(root / "tokenizer_config.json", required=False),
        )
        if validate:
            bundle.validate()
        return bundle

    def validate(self) -> None:
        """Check every tensor the spec needs against the safetensors headers (no data is read).

        Raises :class:`~infer.errors.ModelFormatError` naming the first missing tensor, the
        first shape that disagrees with config.json, or a non-float dtype.
        """
        for name, shape in self.spec.expected_shapes().items():
            if name not in self.weights:
                raise ModelFormatError(
                    f"tensor {name!r} required by config.json is missing from the weights in {str(self.path)!r}",
                    path=self.path,
                )
            info = self.weights.info(name)
            if info.shape != shape:
                raise ModelFormatError(
                    f"{info.file.name}: tensor {name!r} has shape {list(info.shape)}, "
                    f"but config.json implies {list(shape)}",
                    path=info.file,
                )
            if not self.weights.readable(info.dtype):
                raise ModelFormatError(
                    f"{info.file.name}: tensor {name!r} has dtype {info.dtype}; expected one of "
                    f"{', '.join(sorted(FLOAT_DTYPES))} (quantized safetensors are not supported)",
                    path=info.file,
                )

    @property
    def tokenizer_path(self) -> Path:
        """Path of ``tokenizer.json``."""
        return self.path / "tokenizer.json"

    @cached_property
    def chat_template(self) -> str | None:
        """The chat template (``chat_template.jinja`` or ``tokenizer_config.json``), if any."""
        jinja = self.path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):
            # The list form names several templates; "default" is the one for plain chat.
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation, in order: generation_config.json, config.json, tokenizer_config.json.

        All sources count (deduplicated): chat models often end a turn with a token
        (``<|im_end|>``) other than the one their generation config names.
        """
        ids: list[int] = []
        for source in (self.generation_config, self.config):
            ids += _ids(source.get("eos_token_id"))
        ids += _ids(self._special_id("eos_token"))
        return tuple(dict.fromkeys(ids))

    @cached_property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence token id, if the model has one."""
        return self._first_id("bos_token_id", "bos_token")

    @cached_property
    def pad_token_id(self) -> int | None:
        """Padding token id, if the model has one."""
        return self._first_id("pad_token_id", "pad_token")

    def content_hash(self) -> str:
        """A sha256 over the config and weight files (name, size, mtime); stable while unchanged."""
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for file in self.weights.files:
            st = file.stat()
            h.update(f"{file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def _first_id(self, key: str, token_key: str) -> int | None:
        for source in (self.generation_config, self.config):
            found = _ids(source.get(key))
            if found:
                return found[0]
        return self._special_id(token_key)

    def _special_id(self, key: str) -> int | None:
        """Id of the token tokenizer_config.json names under ``key`` (a string or an AddedToken object)."""
        token = self.tokenizer_config.get(key)
        if isinstance(token, Mapping):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        return self._token_ids.get(token)

    @cached_property
    def _token_ids(self) -> Mapping[str, int]:
        data = _read_json(self.tokenizer_path, required=True)
        vocab = dict(data.get("model", {}).get("vocab") or {}) if isinstance(data.get("model"), Mapping) else {}
        for added in data.get("added_tokens") or ():
            if isinstance(added, Mapping) and isinstance(added.get("content"), str):
                vocab[added["content"]] = added.get("id")
        return {k: v for k, v in vocab.items() if isinstance(v, int)}


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelNotFoundError(f"{path.name} is missing from model folder {str(path.parent)!r}", path=path)
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path.name} is not valid JSON: {exc}", path=path) from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path.name} must hold a JSON object", path=path)
    return data


def _index_safetensors(root: Path) -> dict[str, TensorInfo]:
    """Header facts of every tensor: from the sharded index when there is one, else from every file."""
    index = root / INDEX_NAME
    if not index.is_file():
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(
                f"no *.safetensors weights (and no {INDEX_NAME}) in model folder {str(root)!r}", path=root
            )
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            tensors |= _read_header(file)
        return tensors
    weight_map = _read_json(index, required=True).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFormatError(f"{INDEX_NAME}: 'weight_map' must map tensor names to file names", path=index)
    headers: dict[str, dict[str, TensorInfo]] = {}
    for shard in sorted(set(weight_map.values())):
        file = root / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise ModelFormatError(f"{INDEX_NAME}: shard {shard!r} must be a file name inside the folder", path=index)
        if not file.is_file():
            raise ModelNotFoundError(f"weight shard {shard} named in {INDEX_NAME} is missing", path=file)
        headers[shard] = _read_header(file)
    tensors = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise ModelFormatError(
                f"{INDEX_NAME} places tensor {name!r} in {shard}, which does not hold it", path=index
            )
        tensors[name] = headers[shard][name]
    return tensors


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor facts from one safetensors header; safetensors itself checks sizes and offsets."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 - a safe_open handle, not a dict
            facts = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
        # The data offsets are not exposed by safe_open; BF16 reads need them.
        with file.open("rb") as raw:
            header_len = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(header_len))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(
            f"{file.name} is not a readable safetensors file (corrupt or truncated): {exc}", path=file
        ) from exc
    return {
        name: TensorInfo(
            file=file, dtype=dtype, shape=shape, offset=8 + header_len + int(header[name]["data_offsets"][0])
        )
        for name, (dtype, shape) in facts.items()
    }
