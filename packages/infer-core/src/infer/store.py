"""Where infer keeps models on disk: pulled models and bundles converted from GGUF files.

Layout under :func:`infer_home` (``$INFER_HOME``, else the user cache folder for "infer")::

    models/<name>/        bundles fetched by ``infer pull <name>``
    converted/<sha256>/   bundles imported from GGUF files, keyed by the file's content hash
    cache/                backend build caches (owned by the backends)

Every folder under ``models/`` and ``converted/`` appears whole or not at all: it is built in a
temporary sibling and renamed into place. Hidden entries there (and in the build caches) are
temporary work; what a crash leaves behind is removed by :func:`sweep` the next time that
folder is written to. Work in progress holds :func:`work_lock`, so a sweep never takes it; an
unlocked hidden entry counts as abandoned once nothing in it has changed for
:data:`STALE_AFTER` seconds (or at once, when it holds a released lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, final

__all__ = [
    "STALE_AFTER",
    "WORK_LOCK",
    "StoredModel",
    "converted_dir",
    "file_sha256",
    "infer_home",
    "list_models",
    "models_dir",
    "remove_aside",
    "repair_hint",
    "sweep",
    "work_lock",
]

#: Bytes read per chunk when hashing model files.
_CHUNK = 1 << 20
#: Seconds without a change after which unlocked temporary work is taken as abandoned.
STALE_AFTER = 3600.0
#: Name of the lock file a running job keeps inside its temporary folder (see :func:`work_lock`).
WORK_LOCK = ".infer-work.lock"


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


@contextlib.contextmanager
def work_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock inside the temporary work ``folder`` while the block runs.

    The operating system drops the lock when the process dies, so :func:`sweep` can tell a
    crashed job's folder (lock free) from one still being written (lock held).
    """
    fd = os.open(folder / WORK_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        _flock(fd, blocking=True)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def sweep(root: Path, *, stale_after: float = STALE_AFTER) -> list[Path]:
    """Remove the temporary work crashed jobs left in ``root`` (its hidden entries); return them.

    An entry whose lock is held is in use and kept. One with a released lock is removed; one
    without a lock file is removed once nothing in it changed for ``stale_after`` seconds.
    """
    if not root.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in root.iterdir():
        if not entry.name.startswith(".") or entry.name == WORK_LOCK:
            continue
        lock = entry / WORK_LOCK
        if lock.is_file():
            if _lock_held(lock):
                continue
        elif now - _newest_mtime(entry) < stale_after:
            continue
        _remove(entry)
        removed.append(entry)
    if removed:
        from infer.log import get_logger

        get_logger().info("store.swept", folder=str(root), entries=[e.name for e in removed])
    return removed


def remove_aside(path: Path) -> None:
    """Remove ``path`` (a broken bundle) by first renaming it to a hidden sibling.

    The rename is atomic, so the name is free at once for a new bundle even if deleting the
    old files fails or is cut short; :func:`sweep` finishes the job then.
    """
    aside = path.with_name(f".{path.name}.broken-{uuid.uuid4().hex[:8]}")
    path.rename(aside)
    _remove(aside)


def repair_hint(path: Path | None) -> str | None:
    """How to repair a broken bundle at ``path`` when the store made it; ``None`` otherwise."""
    if path is None:
        return None
    try:
        resolved = path.resolve()
    except OSError:
        return None
    for parent in (resolved, *resolved.parents):
        if parent.parent == models_dir().resolve():
            return f"repair it with `infer pull --force {parent.name}`"
        if parent.parent == converted_dir().resolve():
            return f"delete {str(parent)!r} and load the GGUF file again to convert it anew"
    return None


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def _newest_mtime(entry: Path) -> float:
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for folder, _, files in os.walk(entry):
            for name in (".", *files):
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


def _lock_held(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        return not _flock(fd, blocking=False)
    finally:
        os.close(fd)


def _flock(fd: int, *, blocking: bool) -> bool:
    """Lock ``fd`` exclusively; ``False`` when not blocking and another process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): locks are advisory only, ages still protect work
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True
