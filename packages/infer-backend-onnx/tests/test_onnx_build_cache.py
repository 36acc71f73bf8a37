"""The build cache: a second load reuses the build; damaged entries are detected and rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx_helpers import PROMPT, load_spec, step

from infer.bundle import Bundle
from infer_backend_onnx import plugin
from infer_backend_onnx.build_cache import MANIFEST, cache_root, verify_entry
from infer_backend_onnx.runtime import OnnxModel

pytestmark = pytest.mark.integration


def _load(bundle: Bundle, cache: Path) -> OnnxModel:
    model = plugin.infer_load(load_spec(bundle), {"cache_dir": cache, "threads": 1})
    assert isinstance(model, OnnxModel)
    return model


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in (cache / "onnx").iterdir() if not p.name.startswith(".")]
    return entry


def test_second_load_is_a_cache_hit(tiny_bundle: Bundle, tmp_path: Path) -> None:
    assert _load(tiny_bundle, tmp_path).details["cache_hit"] is False
    assert _load(tiny_bundle, tmp_path).details["cache_hit"] is True


def test_build_leaves_no_temporary_folder(tiny_bundle: Bundle, tmp_path: Path) -> None:
    _load(tiny_bundle, tmp_path)
    assert [p.name for p in (tmp_path / "onnx").iterdir() if p.name.startswith(".")] == []
    assert verify_entry(_entry(tmp_path)) is None


def test_truncated_weights_are_detected_and_rebuilt(tiny_bundle: Bundle, tmp_path: Path) -> None:
    _load(tiny_bundle, tmp_path)
    data = _entry(tmp_path) / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert "bytes" in (verify_entry(_entry(tmp_path)) or "")
    model = _load(tiny_bundle, tmp_path)
    assert model.details["cache_hit"] is False
    assert verify_entry(_entry(tmp_path), deep=True) is None
    assert np.isfinite(step(model, [model.new_sequence(16)], [PROMPT])).all()


def test_altered_bytes_of_the_same_size_fail_the_hash_and_are_rebuilt(tiny_bundle: Bundle, tmp_path: Path) -> None:
    _load(tiny_bundle, tmp_path)
    data = _entry(tmp_path) / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100:108] = b"\xff" * 8
    data.write_bytes(bytes(raw))
    assert "checksum" in (verify_entry(_entry(tmp_path)) or "")
    assert _load(tiny_bundle, tmp_path).details["cache_hit"] is False


def test_altered_bytes_with_the_old_size_and_mtime_are_caught_by_content_and_rebuilt(
    tiny_bundle: Bundle, tmp_path: Path
) -> None:
    import os

    _load(tiny_bundle, tmp_path)
    data = _entry(tmp_path) / "model.onnx.data"
    before = data.stat()
    raw = bytearray(data.read_bytes())
    raw[200] ^= 0x01
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "checksum" in (verify_entry(_entry(tmp_path)) or "")  # no deep check needed
    model = _load(tiny_bundle, tmp_path)
    assert model.details["cache_hit"] is False
    assert np.isfinite(step(model, [model.new_sequence(16)], [PROMPT])).all()


@pytest.mark.parametrize("size", [8, 13, (8 << 20) + 5])
def test_the_content_checksum_sees_a_one_bit_change_anywhere(tmp_path: Path, size: int) -> None:
    from infer_backend_onnx.build_cache import _sum64

    raw = bytearray(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    path = tmp_path / "f"
    path.write_bytes(bytes(raw))
    first = _sum64(path)
    for where in (0, size // 2, size - 1):
        raw[where] ^= 0x10
        path.write_bytes(bytes(raw))
        assert _sum64(path) != first, where
        raw[where] ^= 0x10
    path.write_bytes(bytes(raw))
    assert _sum64(path) == first


def test_a_crashed_builds_temporary_folder_is_swept_by_the_next_build(tiny_bundle: Bundle, tmp_path: Path) -> None:
    from infer.store import WORK_LOCK

    crashed = tmp_path / "onnx" / ".somekey.abc123"
    crashed.mkdir(parents=True)
    (crashed / "model.onnx.data").write_bytes(b"\0" * 1024)
    (crashed / WORK_LOCK).touch()  # its lock was released when the process died
    _load(tiny_bundle, tmp_path)
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [_entry(tmp_path).name]
    assert not (_entry(tmp_path) / WORK_LOCK).exists()


def test_missing_manifest_means_rebuild(tiny_bundle: Bundle, tmp_path: Path) -> None:
    _load(tiny_bundle, tmp_path)
    (_entry(tmp_path) / MANIFEST).unlink()
    assert _load(tiny_bundle, tmp_path).details["cache_hit"] is False


def test_manifest_records_each_file_size_and_hash(tiny_bundle: Bundle, tmp_path: Path) -> None:
    _load(tiny_bundle, tmp_path)
    manifest = json.loads((_entry(tmp_path) / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 and f["mtime_ns"] > 0 for f in manifest["files"].values())
    assert all(len(f["sum64"]) == 16 for f in manifest["files"].values())


def test_each_precision_has_its_own_entry(tiny_bundle: Bundle, tmp_path: Path) -> None:
    plugin.infer_load(load_spec(tiny_bundle, dtype="fp32"), {"cache_dir": tmp_path})
    plugin.infer_load(load_spec(tiny_bundle, dtype="int4"), {"cache_dir": tmp_path})
    names = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert len(names) == 2 and "fp32" in names[0] + names[1] and "int4-b32" in names[0] + names[1]


def test_cache_root_prefers_the_option_then_infer_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("INFER_HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / "cache"
