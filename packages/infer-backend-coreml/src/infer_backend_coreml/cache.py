"""Built packages on disk, keyed by the bundle's content, the build options and the builder.

An entry is ``<root>/coreml/<key>/`` holding ``model.mlpackage`` and ``manifest.json`` (what
was built, from what, and the size of every file in the package). It is built in a hidden
folder beside it and renamed into place once complete, so a crash mid-build never leaves an
entry that looks valid; an entry whose files disagree with its manifest is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from infer_backend_coreml.builder import BUILDER_VERSION, build_package

if TYPE_CHECKING:
    from infer.bundle import Bundle
    from infer_backend_coreml.options import BuildConfig

__all__ = ["MANIFEST", "PACKAGE", "cache_root", "cached_package", "package_key"]

MANIFEST: Final = "manifest.json"
PACKAGE: Final = "model.mlpackage"


def cache_root(override: Path | None = None) -> Path:
    """Folder holding this backend's entries: ``override``, else ``<infer home>/cache/coreml``."""
    if override is not None:
        return override.expanduser()
    from infer.store import infer_home

    return infer_home() / "cache" / "coreml"


def package_key(bundle: Bundle, config: BuildConfig) -> str:
    """The entry name for ``bundle`` built with ``config`` by this builder and coremltools."""
    import coremltools as ct

    fields = {
        "bundle": bundle.content_hash(),
        "build": config.cache_fields(),
        "builder": BUILDER_VERSION,
        "coremltools": ct.__version__,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _file_sizes(package: Path) -> dict[str, int]:
    return {str(p.relative_to(package)): p.stat().st_size for p in sorted(package.rglob("*")) if p.is_file()}


def _valid(entry: Path) -> bool:
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        return bool(manifest["files"]) and manifest["files"] == _file_sizes(entry / PACKAGE)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached_package(bundle: Bundle, config: BuildConfig, root: Path) -> tuple[Path, bool]:
    """The package for ``bundle`` and ``config`` under ``root``, building it when missing.

    Returns the ``.mlpackage`` path and whether this call built it.
    """
    key = package_key(bundle, config)
    entry = root / key
    if _valid(entry):
        return entry / PACKAGE, False
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        metadata = {"infer.model_type": bundle.spec.model_type, "infer.bundle_hash": bundle.content_hash()}
        build_package(bundle.spec, bundle.weights, config, staging / PACKAGE, metadata=metadata)
        manifest: dict[str, Any] = {
            "key": key,
            "bundle": str(bundle.path),
            "metadata": metadata,
            "files": _file_sizes(staging / PACKAGE),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        if entry.exists():
            # A stale entry (its files disagree with its manifest): replace it.
            shutil.rmtree(entry)
        try:
            os.rename(staging, entry)
        except OSError:
            # Another process finished the same build first; its entry is as good as ours.
            if not _valid(entry):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry / PACKAGE, True
