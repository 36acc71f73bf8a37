"""The on-disk package cache: built once per content and options, rebuilt when damaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infer.bundle import Bundle
from infer_backend_coreml.cache import MANIFEST, cache_root, cached_package, package_key
from infer_backend_coreml.options import BuildConfig

pytest.importorskip("coremltools")

pytestmark = pytest.mark.integration

CONFIG = BuildConfig(dtype="fp16", context_length=16, prefill_chunk=4)


def test_second_load_reuses_the_built_package(tiny_bundle: Bundle, tmp_path: Path) -> None:
    first, built = cached_package(tiny_bundle, CONFIG, tmp_path)
    again, rebuilt = cached_package(tiny_bundle, CONFIG, tmp_path)
    assert (built, rebuilt) == (True, False)
    assert first == again and first.is_dir()
    # Only the finished entry is left: the staging folder was renamed into place.
    assert [p.name for p in tmp_path.iterdir()] == [package_key(tiny_bundle, CONFIG)]


def test_package_records_what_it_was_built_from(tiny_bundle: Bundle, tmp_path: Path) -> None:
    package, _ = cached_package(tiny_bundle, CONFIG, tmp_path)
    manifest = json.loads((package.parent / MANIFEST).read_text())
    assert manifest["metadata"]["infer.bundle_hash"] == tiny_bundle.content_hash()
    ct = pytest.importorskip("coremltools")
    recorded = ct.models.MLModel(str(package), skip_model_load=True).user_defined_metadata
    assert recorded["infer.bundle_hash"] == tiny_bundle.content_hash()
    assert (recorded["infer.dtype"], recorded["infer.prefill_chunk"]) == ("fp16", "4")


def test_a_truncated_file_makes_the_entry_stale_and_it_is_rebuilt(tiny_bundle: Bundle, tmp_path: Path) -> None:
    package, _ = cached_package(tiny_bundle, CONFIG, tmp_path)
    weights = next(package.rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[:100])
    again, built = cached_package(tiny_bundle, CONFIG, tmp_path)
    assert built
    assert next(again.rglob("weight.bin")).stat().st_size > 100


def test_key_changes_with_every_build_option(tiny_bundle: Bundle) -> None:
    keys = {
        package_key(tiny_bundle, c)
        for c in (
            CONFIG,
            BuildConfig(dtype="fp32", context_length=16, prefill_chunk=4),
            BuildConfig(dtype="fp16", context_length=32, prefill_chunk=4),
            BuildConfig(dtype="fp16", context_length=16, prefill_chunk=8),
        )
    }
    assert len(keys) == 4


def test_default_root_is_under_infer_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFER_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "cache" / "coreml"
    assert cache_root(tmp_path / "x") == tmp_path / "x"
