"""Model bundles: a Hugging Face-layout folder validated into a typed spec and lazy weights.

A bundle folder holds ``config.json``, ``*.safetensors`` (or a sharded
``model.safetensors.index.json``), ``tokenizer.json``, ``tokenizer_config.json`` and/or
``chat_template.jinja``, and optionally ``generation_config.json``. :meth:`Bundle.open`
validates the configuration into an :class:`~infer.arch.ArchSpec` (through the
architecture registry, :mod:`infer.arch`) and checks every safetensors header
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

from infer.arch import ArchSpec, spec_from_config
from infer.errors import ModelFormatError, ModelNotFoundError

__all__ = ["ArchSpec", "Bundle", "TensorInfo", "Weights", "is_bundle"]

#: safetensors dtypes a weight may have; BF16 is widened to float32 on read (numpy has no bfloat16).
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})

INDEX_NAME = "model.safetensors.index.json"


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


#: Where multimodal checkpoints (Gemma 3 4B+, ...) keep the text decoder: (stored prefix, the
#: prefix the spec's names use). transformers < 4.52 wrote ``language_model.model.*``, later
#: versions ``model.language_model.*``; the vision tower's tensors are left out.
_DECODER_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."))


class _RenamedWeights(Weights):
    """A multimodal checkpoint's text decoder under the names the spec uses (``model.layers.0...``)."""

    def __init__(self, tensors: Mapping[str, TensorInfo], stored: Mapping[str, str]) -> None:
        super().__init__({name: tensors[name] for name in stored.values()})
        #: Spec name -> stored name.
        self._stored = dict(stored)

    def __getitem__(self, name: str) -> npt.NDArray[np.floating[Any]]:
        return super().__getitem__(self._stored.get(name, name))

    def __contains__(self, name: object) -> bool:
        return name in self._stored

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def info(self, name: str) -> TensorInfo:
        """Header facts of ``name`` (file, dtype, shape) without reading its data."""
        return super().info(self._stored.get(name, name))

    def file_of(self, name: str) -> Path:
        """The safetensors file holding ``name``."""
        return super().file_of(self._stored.get(name, name))


def _decoder_weights(tensors: Mapping[str, TensorInfo]) -> Weights:
    """The bundle's weights; for a multimodal checkpoint, its text decoder renamed as a text model's."""
    if "model.embed_tokens.weight" in tensors:
        return Weights(tensors)
    for stored_prefix, prefix in _DECODER_PREFIXES:
        if stored_prefix + "embed_tokens.weight" in tensors:
            stored = {prefix + n.removeprefix(stored_prefix): n for n in tensors if n.startswith(stored_prefix)}
            # The output head sits beside the decoder: language_model.lm_head or lm_head.
            for head in ("language_model.lm_head.weight", "lm_head.weight"):
                if head in tensors:
                    stored["lm_head.weight"] = head
                    break
            return _RenamedWeights(tensors, stored)
    return Weights(tensors)


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
        spec = spec_from_config(config, path=root / "config.json")
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
            weights = _decoder_weights(_index_safetensors(root))
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
