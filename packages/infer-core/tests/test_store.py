"""The model store: where it lives, what it lists, how files are hashed."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from tiny_gguf import TINY

from infer.store import converted_dir, file_sha256, infer_home, list_models, models_dir

pytestmark = pytest.mark.unit


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_infer_home_follows_the_environment_variable(home: Path) -> None:
    assert infer_home() == home
    assert models_dir() == home / "models"
    assert converted_dir() == home / "converted"


def test_infer_home_defaults_to_the_user_cache_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    from platformdirs import user_cache_dir

    monkeypatch.delenv("INFER_HOME", raising=False)
    assert infer_home() == Path(user_cache_dir("infer", appauthor=False))


def test_empty_store_lists_nothing(home: Path) -> None:
    assert list_models() == []


def test_list_shows_pulled_then_converted_bundles_with_their_sizes(home: Path) -> None:
    shutil.copytree(TINY, models_dir() / "tiny")
    shutil.copytree(TINY, converted_dir() / ("ab" * 32))
    size = sum(f.stat().st_size for f in TINY.iterdir())
    listed = list_models()
    assert [(m.name, m.kind, m.size_bytes) for m in listed] == [
        ("tiny", "pulled", size),
        ("ab" * 32, "converted", size),
    ]
    assert listed[0].path == models_dir() / "tiny"


def test_list_skips_folders_still_being_written_and_strays(home: Path) -> None:
    shutil.copytree(TINY, models_dir() / ".tiny.importing-x1")
    (models_dir() / "empty").mkdir()
    assert list_models() == []


def test_file_sha256_matches_hashlib_and_reports_progress(tmp_path: Path) -> None:
    data = bytes(range(256)) * 10_000
    (tmp_path / "f").write_bytes(data)
    seen: list[tuple[int, int]] = []
    assert (
        file_sha256(tmp_path / "f", lambda done, total: seen.append((done, total))) == hashlib.sha256(data).hexdigest()
    )
    assert seen[-1] == (len(data), len(data))
