"""Turn the model reference a user types into a local path.

:func:`resolve_model` accepts, in this order:

1. an existing folder (a bundle, or a backend's own artefact such as an ``.mlpackage``): itself;
2. an existing ``.gguf`` file: its bundle in the store, converted on first use and keyed by the
   file's sha256 (a changed file converts again; a copy elsewhere reuses the bundle);
3. any other existing file: itself (a backend-native artefact such as an ``.onnx`` graph);
4. a name ``infer pull`` knows (``smollm2-135m-instruct``): the pulled bundle, pulled if absent;
5. ``hf:ORG/NAME`` or ``hf:ORG/NAME@REVISION``: the snapshot folder in the local Hugging Face
   cache, without network; only when absent, and only if ``huggingface_hub`` is installed, it is
   downloaded;
6. anything that looks like a path but names nothing: :class:`~infer.errors.ModelNotFoundError`;
7. anything else: ``None``, left for a backend to interpret (``"fake"``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from infer.errors import ModelNotFoundError

__all__ = ["hf_cache_dir", "resolve_model"]

_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_PATH_SUFFIXES = (".gguf", ".onnx", ".safetensors", ".mlpackage", ".mlmodel", ".mlmodelc", ".bin", ".json")


def resolve_model(ref: str) -> Path | None:
    """The local path ``ref`` names (see the module docstring), or ``None`` for a backend-defined ref."""
    if ref.startswith("hf:"):
        return _resolve_hf(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return _converted(path) if path.suffix.lower() == ".gguf" else path
    from infer.pull import KNOWN_MODELS, pull

    if ref in KNOWN_MODELS:
        return pull(ref)
    if _looks_like_path(ref):
        raise ModelNotFoundError(
            f"model {ref!r} does not exist; give a model folder, a .gguf file, "
            f"a pulled name ({', '.join(sorted(KNOWN_MODELS))}) or hf:ORG/NAME",
            path=path,
        )
    return None


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or os.sep in ref or ref.startswith((".", "~")) or ref.lower().endswith(_PATH_SUFFIXES)


def _converted(gguf: Path) -> Path:
    from infer.gguf_import import import_gguf
    from infer.store import converted_dir, file_sha256, remove_aside, sweep

    bundle = converted_dir() / file_sha256(gguf)
    if (bundle / "config.json").is_file():
        return bundle
    sweep(bundle.parent)  # crashed conversions' temporary folders
    if bundle.exists() or bundle.is_symlink():
        remove_aside(bundle)  # a bundle that lost its config.json: convert it anew
    return import_gguf(gguf, bundle)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def _resolve_hf(ref: str) -> Path:
    repo, _, revision = ref.removeprefix("hf:").partition("@")
    revision = revision or "main"
    if not _HF_REPO.match(repo):
        raise ModelNotFoundError(f"{ref!r} is not a Hugging Face reference; write hf:ORG/NAME or hf:ORG/NAME@REVISION")
    local = _cached_snapshot(repo, revision)
    if local is not None:
        return local
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"{repo} (revision {revision}) is not in the local Hugging Face cache {str(hf_cache_dir())!r}; "
            "download it there first, or install infer-core[hub] to let infer download it",
            path=hf_cache_dir(),
        ) from None
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision))
    except Exception as exc:
        raise ModelNotFoundError(
            f"{repo} (revision {revision}) is not in the local Hugging Face cache and could not be downloaded: {exc}",
            path=hf_cache_dir(),
        ) from exc


def _cached_snapshot(repo: str, revision: str) -> Path | None:
    """The snapshot folder of ``repo`` at ``revision`` (a ref name or a commit) in the local cache."""
    root = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    ref_file = root / "refs" / revision
    if ref_file.is_file():
        commit = ref_file.read_text(encoding="utf-8").strip()
    elif _COMMIT.match(revision):
        commit = revision
    else:
        return None
    snapshot = root / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None
