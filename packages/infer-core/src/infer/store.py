"""Where infer keeps models on disk: pulled models and bundles converted from GGUF files.

Layout under :func:`infer_home` (``$INFER_HOME``, else the user cache folder for "infer")::

    models/<name>/        bundles fetched by ``infer pull <name>``
    converted/<sha256>/   bundles imported from GGUF files, keyed by the file's content hash
    cache/                backend build caches (owned by the backends)

Every folder under ``models/`` and ``converted/`` appears whole or not at all: it is built in a
temporary sibling and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, final

__all__ = ["StoredModel", "converted_dir", "file_sha256", "infer_home", "list_models", "models_dir"]

#: Bytes read per chunk when hashing model files.
_CHUNK = 1 << 20


def infer_home() -> Path:
    """Root folder of infer's data: ``$INFER_HOME`` if set, else the user cache folder for "infer"."""
    env = os.environ.get("INFER_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("infer", appauthor=False))


def models_dir() -> Path:
    """Folder of pulled models, one bundle per name."""
    return infer_home() / "models"


def converted_dir() -> Path:
    """Folder of bundles converted from GGUF files, one per file content hash."""
    return infer_home() / "converted"


@final
@dataclass(frozen=True, slots=True)
class StoredModel:
    """One model in the store."""

    #: Pull name, or the content hash of the GGUF file it was converted from.
    name: str
    #: ``"pulled"`` (``infer pull``) or ``"converted"`` (a GGUF file given by path).
    kind: Literal["pulled", "converted"]
    path: Path
    #: Bytes on disk, all files included.
    size_bytes: int
    #: Whether it has a chat template; ``False``: a base model, which completes text.
    chat: bool = True


def list_models() -> list[StoredModel]:
    """Every complete bundle in the store, pulled ones first, each group sorted by name."""
    found: list[StoredModel] = []
    kinds: tuple[tuple[Literal["pulled", "converted"], Path], ...] = (
        ("pulled", models_dir()),
        ("converted", converted_dir()),
    )
    for kind, root in kinds:
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            # Hidden entries are bundles still being written (or abandoned by a crash).
            if folder.name.startswith(".") or not (folder / "config.json").is_file():
                continue
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            found.append(StoredModel(name=folder.name, kind=kind, path=folder, size_bytes=size, chat=_has_chat(folder)))
    return found


def _has_chat(folder: Path) -> bool:
    """Whether a bundle folder carries a chat template (a file, or in tokenizer_config.json)."""
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def file_sha256(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    """Hex sha256 of a file, read in chunks; ``progress(done_bytes, total_bytes)`` after each chunk."""
    total = path.stat().st_size
    h = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return h.hexdigest()
