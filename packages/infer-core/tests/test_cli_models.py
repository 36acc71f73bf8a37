"""``infer convert``, ``infer pull`` and ``infer list`` through the CLI's main."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from tiny_gguf import write_tiny_gguf

import infer.pull
from infer.bundle import Bundle
from infer.cli import main

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_convert_writes_a_bundle_and_prints_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_gguf(tmp_path / "t.gguf", gguf.GGMLQuantizationType.Q8_0)
    assert main(["convert", str(tmp_path / "t.gguf"), str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "out")
    assert "converting" in err and "100%" in err
    assert Bundle.open(tmp_path / "out").spec.hidden_size == 64


def test_convert_quiet_prints_no_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_gguf(tmp_path / "t.gguf")
    assert main(["convert", "-q", str(tmp_path / "t.gguf"), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err == ""


def test_convert_missing_file_is_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tmp_path / "none.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.gguf" in err


def test_convert_garbage_fails_with_a_typed_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    assert main(["convert", str(tmp_path / "bad.gguf"), str(tmp_path / "out")]) == 1
    assert "ModelFormatError" in capsys.readouterr().err


def test_pull_prints_the_stored_path(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[str, bool, bool]] = []

    def fake_pull(name: str, *, progress: bool, force: bool) -> Path:
        calls.append((name, progress, force))
        return Path("/stored") / name

    monkeypatch.setattr(infer.pull, "pull", fake_pull)
    assert main(["pull", "smollm2-135m-instruct", "--quiet", "--force"]) == 0
    assert capsys.readouterr().out.strip() == "/stored/smollm2-135m-instruct"
    assert calls == [("smollm2-135m-instruct", False, True)]


def test_pull_unknown_name_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "no-such-model"]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err


def test_list_shows_stored_models_as_json(tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_gguf(tmp_path / "t.gguf")
    main(["convert", "-q", str(tmp_path / "t.gguf"), str(home / "models" / "tiny")])
    capsys.readouterr()
    assert main(["list", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["name"] == "tiny" and entry["kind"] == "pulled" and entry["size_bytes"] > 100_000


def test_list_on_an_empty_store_says_how_to_pull(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    assert "infer pull" in capsys.readouterr().out


def test_list_available_names_the_pullable_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--available", "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["smollm2-135m-instruct", "gemma3-270m"]
