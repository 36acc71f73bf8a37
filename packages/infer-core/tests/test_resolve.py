"""Model references: folders, GGUF files (converted once, by content), pull names, hf: refs, the rest."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import gguf
import pytest
from tiny_gguf import TINY, write_tiny_gguf

import infer.gguf_import
import infer.pull
from infer.errors import ModelNotFoundError
from infer.resolve import hf_cache_dir, resolve_model
from infer.store import converted_dir, file_sha256

pytestmark = pytest.mark.unit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "home"


def lay_out_hf_cache(root: Path, repo: str, *, ref: str = "main", commit: str = COMMIT) -> Path:
    """The folder layout huggingface_hub leaves behind, with the tiny bundle as the snapshot."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / ref).write_text(commit)
    snapshot = base / "snapshots" / commit
    shutil.copytree(TINY, snapshot)
    return snapshot


def test_existing_folder_resolves_to_itself() -> None:
    assert resolve_model(str(TINY)) == TINY


def test_gguf_file_converts_once_into_the_store_keyed_by_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_gguf(tmp_path / "a.gguf", gguf.GGMLQuantizationType.Q8_0)
    bundle = resolve_model(str(tmp_path / "a.gguf"))
    assert bundle == converted_dir() / file_sha256(tmp_path / "a.gguf")
    assert bundle is not None and (bundle / "gguf_tensors.json").is_file()

    def no_second_conversion(*_: object, **__: object) -> Path:
        raise AssertionError("converted twice")

    monkeypatch.setattr(infer.gguf_import, "import_gguf", no_second_conversion)
    shutil.copy(tmp_path / "a.gguf", tmp_path / "copy.gguf")
    assert resolve_model(str(tmp_path / "copy.gguf")) == bundle


def test_other_existing_file_resolves_to_itself(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    assert resolve_model(str(tmp_path / "model.onnx")) == tmp_path / "model.onnx"


def test_known_pull_name_resolves_through_pull(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    asked: list[str] = []
    monkeypatch.setattr(infer.pull, "pull", lambda name: asked.append(name) or tmp_path)
    assert resolve_model("smollm2-135m-instruct") == tmp_path
    assert asked == ["smollm2-135m-instruct"]


def test_hf_ref_resolves_to_the_cached_snapshot_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = lay_out_hf_cache(tmp_path / "hub", "Org/Model-1")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # proves no download is attempted
    assert resolve_model("hf:Org/Model-1") == snapshot


def test_hf_ref_with_a_revision_uses_that_ref_or_commit(tmp_path: Path) -> None:
    other = "f" * 40
    branch = lay_out_hf_cache(tmp_path / "hub", "Org/M", ref="dev", commit=other)
    assert resolve_model("hf:Org/M@dev") == branch
    assert resolve_model(f"hf:Org/M@{other}") == branch


def test_hf_cache_location_follows_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hf_cache_dir() == tmp_path / "hfhome" / "hub"
    snapshot = lay_out_hf_cache(tmp_path / "hfhome" / "hub", "Org/M")
    assert resolve_model("hf:Org/M") == snapshot


def test_hf_ref_absent_without_huggingface_hub_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelNotFoundError, match=r"infer-core\[hub\]"):
        resolve_model("hf:Org/Absent")


def test_hf_ref_absent_downloads_when_huggingface_hub_is_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = pytest.importorskip("huggingface_hub")
    asked: list[tuple[str, str]] = []

    def fake_snapshot_download(repo_id: str, revision: str) -> str:
        asked.append((repo_id, revision))
        return str(tmp_path / "downloaded")

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model("hf:Org/Absent") == tmp_path / "downloaded"
    assert asked == [("Org/Absent", "main")]


def test_failed_hf_download_raises_model_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id: str, revision: str) -> str:
        raise OSError("no route to host")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match="no route to host"):
        resolve_model("hf:Org/Absent")


@pytest.mark.parametrize("ref", ["hf:", "hf:just-a-name", "hf:a/b/c"])
def test_malformed_hf_ref_raises(ref: str) -> None:
    with pytest.raises(ModelNotFoundError, match="hf:ORG/NAME"):
        resolve_model(ref)


@pytest.mark.parametrize("ref", ["./missing", "models/missing", "~/missing-model", "missing.gguf", "x.onnx"])
def test_path_like_ref_that_names_nothing_raises(ref: str) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(ref)


@pytest.mark.parametrize("ref", ["fake", "fake:slow", "my-backend-model"])
def test_other_refs_are_left_to_backends(ref: str) -> None:
    assert resolve_model(ref) is None
