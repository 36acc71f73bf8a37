"""The on-disk cache of built graphs, keyed by bundle content, precision and builder version.

An entry is a folder ``<root>/onnx/<key>/`` holding ``model.onnx``, ``model.onnx.data`` and
``manifest.json``, which records each file's size, modification time, sha256 and a content
checksum (``sum64``, the wrapping sum of the file's little-endian 64-bit words). An entry is
built in a temporary folder beside it and renamed into place only once complete, so a crash
mid-build never leaves an entry that looks valid; the temporary folders of builds that crashed
are swept (:func:`infer.store.sweep`) when the next build starts. A load checks the manifest
against the files: a wrong size (truncation) fails at once; every file's checksum is compared
(content damage that kept the size and modification time included: such a file used to load
and then give NaN logits); a file whose modification time moved is also hashed, and a sha256
mismatch fails. A failed entry is rebuilt. The checksum runs at memory speed (numpy sums 8 MiB
blocks; the files are in the page cache, as ONNX Runtime reads them next), where a sha256 of a
540 MB graph costs about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np

from infer.log import get_logger

__all__ = ["MANIFEST", "CacheEntry", "cache_root", "cached_build", "verify_entry"]

MANIFEST: Final = "manifest.json"
_CHUNK: Final = 8 << 20
_log = get_logger().bind(backend="onnx")


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """Folder under which built graphs live: ``override``, else ``cache`` in infer's home
    (:func:`infer.store.infer_home`: ``$INFER_HOME`` or the user cache folder)."""
    if override is not None:
        return Path(override).expanduser()
    from infer.store import infer_home

    return infer_home() / "cache"


class CacheEntry:
    """A verified cache entry: its folder and whether this load built it."""

    def __init__(self, path: Path, built: bool) -> None:
        self.path = path
        self.built = built

    @property
    def model_path(self) -> Path:
        """Path of the entry's ``model.onnx``."""
        return self.path / "model.onnx"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sum64(path: Path) -> str:
    """The file's content checksum: the sum, modulo 2**64, of its little-endian 64-bit words.

    Any single changed word changes it; the last partial word counts zero-padded.
    """
    buffer = bytearray(_CHUNK)  # a multiple of 8, so words never straddle two blocks
    total = 0
    with path.open("rb") as f:
        while n := f.readinto(buffer):
            whole = n - n % 8
            total += int(np.frombuffer(buffer, dtype="<u8", count=whole // 8).sum(dtype=np.uint64))
            if whole != n:
                total += int.from_bytes(bytes(buffer[whole:n]), "little")
    return f"{total % (1 << 64):016x}"


def _write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": _sha256(p), "sum64": _sum64(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    (folder / MANIFEST).write_text(json.dumps({**meta, "files": files}, indent=1, sort_keys=True), encoding="utf-8")


def verify_entry(folder: Path, *, deep: bool = False) -> str | None:
    """``None`` when ``folder`` holds a complete, unaltered entry; else why it does not.

    Every file's size and content checksum are checked; ``deep`` also hashes every file with
    sha256, otherwise only files whose modification time moved are hashed.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"manifest unreadable ({exc})"
    if not files:
        return "manifest lists no files"
    # Sizes first: a truncated file is caught without reading it.
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta.get("size"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta.get('size')}"
    for name, meta in files.items():
        path = folder / name
        if "sum64" in meta and _sum64(path) != meta["sum64"]:
            return f"{name} does not match its recorded checksum (its content changed)"
        if not deep and path.stat().st_mtime_ns == meta.get("mtime_ns"):
            continue
        if _sha256(path) != meta.get("sha256"):
            return f"{name} does not match its recorded sha256"
    return None


def cached_build(root: Path, key: str, build: Callable[[Path], object], meta: dict[str, Any]) -> CacheEntry:
    """Return the valid entry ``key`` under ``root``, building it with ``build(folder)`` if needed.

    ``build`` writes the entry's files into the folder it is given (what it returns is ignored);
    the manifest is added after.
    """
    base = root / "onnx"
    entry = base / key
    if entry.is_dir():
        problem = verify_entry(entry)
        if problem is None:
            return CacheEntry(entry, built=False)
        _log.warning("onnx.cache.stale", entry=str(entry), reason=problem)
    base.mkdir(parents=True, exist_ok=True)
    from infer.store import WORK_LOCK, sweep, work_lock

    sweep(base)  # what builds that crashed left behind (up to the size of a graph each)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=base))
    try:
        with work_lock(tmp):  # held until the entry has its final name, so no sweep takes it
            build(tmp)
            _write_manifest(tmp, meta)
            with contextlib.suppress(FileNotFoundError):
                if verify_entry(entry) is None:
                    # Another process finished the same build meanwhile: keep theirs.
                    return CacheEntry(entry, built=False)
                shutil.rmtree(entry)
            os.replace(tmp, entry)
            (entry / WORK_LOCK).unlink(missing_ok=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _log.info("onnx.cache.built", entry=str(entry))
    return CacheEntry(entry, built=True)
