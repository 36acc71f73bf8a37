"""Existing ONNX exports: Optimum text-generation-with-past folders and onnxruntime-genai folders.

Both use the same I/O names: ``input_ids``, ``attention_mask``, ``position_ids`` (optional),
``past_key_values.N.key/value`` -> ``logits``, ``present.N.key/value``. A graph without
``past_key_values`` inputs recomputes the whole prefix each token, which this backend refuses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infer.errors import ModelFormatError

if TYPE_CHECKING:
    from infer.contract import LoadSpec, ModelHandle

    from infer_backend_onnx.loading import LoadOptions

__all__ = ["Export", "find_export", "load_export"]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True, slots=True)
class Export:
    """An export found on disk: its graph, its folder and which tool's layout it follows."""

    model: Path
    folder: Path
    kind: str  # "genai" or "optimum"


def find_export(path: Path) -> Export | None:
    """The export at ``path`` (a folder or a ``.onnx`` file), or ``None`` if it is none."""
    if path.is_file() and path.suffix == ".onnx":
        folder = path.parent
        kind = "genai" if (folder / "genai_config.json").is_file() else "optimum"
        return Export(path, folder, kind)
    if not path.is_dir():
        return None
    genai = path / "genai_config.json"
    if genai.is_file():
        try:
            config = json.loads(genai.read_text(encoding="utf-8"))
            filename = config["model"]["decoder"]["filename"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"genai_config.json does not name the decoder file: {exc}", path=genai) from exc
        return Export(path / filename, path, "genai")
    if (path / "model.onnx").is_file():
        return Export(path / "model.onnx", path, "optimum")
    return None


def load_export(export: Export, spec: LoadSpec, opts: LoadOptions, device: str) -> ModelHandle:
    """Open ``export`` in a session and wrap it in a model handle."""
    raise ModelFormatError(f"loading {export.kind} exports is not implemented yet", path=export.model)


def _unused(_: Any) -> None:  # pragma: no cover - placeholder until the runner lands
    return None
