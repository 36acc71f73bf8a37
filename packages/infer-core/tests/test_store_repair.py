"""Crash safety of the store: temporary work is swept, broken bundles are repaired, errors say how."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_pull import NAME, downloads, wheel  # noqa: F401 - fixtures

import infer
from infer.bundle import Bundle
from infer.errors import ModelFormatError
from infer.pull import pull
from infer.store import STALE_AFTER, models_dir, remove_aside, repair_hint, sweep, work_lock

pytestmark = pytest.mark.unit


def _leftover(folder: Path, *, age: float, locked_file: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    if locked_file:
        (folder / ".infer-work.lock").touch()
    past = time.time() - age
    for p in (*folder.iterdir(), folder):
        os.utime(p, (past, past))
    return folder


def test_sweep_removes_released_and_stale_work_and_keeps_live_work(tmp_path: Path) -> None:
    crashed = _leftover(tmp_path / ".pull-a-1", age=1.0, locked_file=True)  # its process died: lock free
    stale = _leftover(tmp_path / ".b.importing-2", age=STALE_AFTER + 60)
    recent = _leftover(tmp_path / ".c.importing-3", age=5.0)  # maybe another process still writes it
    live = tmp_path / ".pull-d-4"
    live.mkdir()
    bundle = _leftover(tmp_path / "model", age=STALE_AFTER * 10)  # visible: a bundle, never swept
    with work_lock(live):
        removed = sweep(tmp_path)
        assert live.exists()
    assert sorted(removed) == sorted([crashed, stale])
    assert not crashed.exists() and not stale.exists()
    assert recent.exists() and bundle.exists()
    assert sweep(tmp_path / "missing") == []


def test_remove_aside_frees_the_name_at_once(tmp_path: Path) -> None:
    broken = _leftover(tmp_path / "model", age=0)
    remove_aside(broken)
    assert list(tmp_path.iterdir()) == []


def test_the_next_pull_sweeps_what_a_crashed_pull_left(downloads: list[Path]) -> None:  # noqa: F811
    root = models_dir()
    crashed = _leftover(root / f".pull-{NAME}-dead", age=1.0, locked_file=True)
    pull(NAME, progress=False)
    assert not crashed.exists()
    assert sorted(p.name for p in root.iterdir()) == [NAME]


def test_pull_repairs_a_bundle_that_lost_its_config_with_or_without_force(downloads: list[Path]) -> None:  # noqa: F811
    path = pull(NAME, progress=False)
    (path / "config.json").unlink()
    assert pull(NAME, progress=False) == path  # incomplete: rebuilt, not "exists and is not a bundle"
    assert Bundle.open(path).spec.num_hidden_layers == 2
    (path / "config.json").unlink()
    (path / "stray.txt").write_text("x")
    pull(NAME, progress=False, force=True)
    assert Bundle.open(path).spec.num_hidden_layers == 2
    assert not (path / "stray.txt").exists()
    assert sorted(p.name for p in models_dir().iterdir()) == [NAME]


def test_a_broken_pulled_bundle_error_says_how_to_repair_it_and_force_does(downloads: list[Path]) -> None:  # noqa: F811
    path = pull(NAME, progress=False)
    (path / "config.json").write_text("{ truncated")
    with pytest.raises(ModelFormatError, match=rf"infer pull --force {NAME}"):
        infer.load(NAME, backend="fake")
    pull(NAME, progress=False, force=True)
    with infer.load(NAME, backend="fake") as model:
        assert model.generate([1, 2], max_tokens=1).usage.completion_tokens == 1


def test_repair_hints_name_the_store_command_only_for_store_bundles(downloads: list[Path], tmp_path: Path) -> None:  # noqa: F811
    path = pull(NAME, progress=False)
    assert repair_hint(path / "model.safetensors") == f"repair it with `infer pull --force {NAME}`"
    assert repair_hint(tmp_path / "elsewhere") is None
    assert repair_hint(None) is None


def test_a_converted_bundle_that_lost_its_config_is_converted_anew(tmp_path: Path, monkeypatch) -> None:
    import gguf
    from tiny_gguf import write_tiny_gguf

    from infer.store import converted_dir

    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    source = tmp_path / "tiny.gguf"
    write_tiny_gguf(source, gguf.GGMLQuantizationType.Q8_0)
    with infer.load(source, backend="fake"):
        pass
    (bundle,) = converted_dir().iterdir()
    (bundle / "config.json").unlink()
    crashed = _leftover(converted_dir() / ".other.importing-x", age=STALE_AFTER + 1)
    with infer.load(source, backend="fake") as model:
        assert model.generate([1, 2], max_tokens=1).usage.completion_tokens == 1
    assert (bundle / "config.json").is_file()
    assert not crashed.exists()
