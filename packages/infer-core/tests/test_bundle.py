"""Opening model bundles: the happy path, sharded weights, and every way a folder can be wrong."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from infer.bundle import ArchSpec, Bundle, is_bundle
from infer.errors import ModelError, ModelFormatError, ModelNotFoundError, UnsupportedModelError

pytestmark = pytest.mark.unit

TINY = Path(__file__).resolve().parents[3] / "conformance" / "src" / "infer_conformance" / "data" / "tiny-llama"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A writable copy of the tiny bundle."""
    out = tmp_path / "tiny"
    shutil.copytree(TINY, out)
    return out


def edit_json(path: Path, change: Callable[[dict[str, object]], None]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    change(data)
    path.write_text(json.dumps(data))


def edit_weights(folder: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors")


def test_tiny_bundle_opens_into_its_spec() -> None:
    bundle = Bundle.open(TINY)
    assert is_bundle(TINY)
    assert bundle.spec.model_type == "llama"
    assert (bundle.spec.num_attention_heads, bundle.spec.num_key_value_heads, bundle.spec.head_dim) == (4, 2, 16)
    assert set(bundle.spec.expected_shapes()) <= set(bundle.weights)
    assert bundle.weights["model.norm.weight"].dtype == np.float32
    assert bundle.eos_token_ids == (2,)
    assert (bundle.bos_token_id, bundle.pad_token_id) == (1, 0)
    assert bundle.chat_template is not None and "<|im_start|>" in bundle.chat_template


def test_missing_folder_raises_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Bundle.open(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_missing_required_file_raises_model_not_found_naming_it(folder: Path, name: str) -> None:
    (folder / name).unlink()
    with pytest.raises(ModelNotFoundError, match=name) as info:
        Bundle.open(folder)
    assert info.value.path == folder / name


def test_folder_without_weights_raises_model_not_found(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        Bundle.open(folder)


def test_invalid_json_raises_model_format_error_naming_the_file(folder: Path) -> None:
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match=r"generation_config\.json"):
        Bundle.open(folder)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"model_type": "gpt2"}, UnsupportedModelError, "model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, UnsupportedModelError, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedModelError, "yarn"),
        ({"rope_scaling": {"rope_type": "linear"}}, ModelFormatError, "rope_scaling.factor"),
        ({"num_hidden_layers": 0}, ModelFormatError, "num_hidden_layers"),
        ({"vocab_size": "384"}, ModelFormatError, "vocab_size"),
        ({"num_key_value_heads": 3}, ModelFormatError, "num_key_value_heads=3"),
        ({"rms_norm_eps": -1}, ModelFormatError, "rms_norm_eps"),
        ({"head_dim": None, "hidden_size": 66}, ModelFormatError, "not a multiple"),
    ],
)
def test_bad_config_raises_a_typed_error_naming_the_key(
    folder: Path, change: dict[str, object], error: type[ModelError], match: str
) -> None:
    edit_json(folder / "config.json", lambda c: c.update(change))
    with pytest.raises(error, match=match) as info:
        Bundle.open(folder)
    assert info.value.path == folder / "config.json"


def test_truncated_safetensors_raises_model_format_error_naming_the_file(folder: Path) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors .*truncated") as info:
        Bundle.open(folder)
    assert info.value.path == file


def test_garbage_safetensors_raises_model_format_error(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelFormatError, match=r"model\.safetensors"):
        Bundle.open(folder)


def test_shape_disagreeing_with_config_raises_naming_tensor_and_both_shapes(folder: Path) -> None:
    edit_json(folder / "config.json", lambda c: c.update(intermediate_size=96))
    with pytest.raises(ModelFormatError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        Bundle.open(folder)


def test_missing_tensor_raises_naming_it(folder: Path) -> None:
    edit_weights(folder, lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ModelFormatError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
        Bundle.open(folder)


def test_integer_weights_are_refused(folder: Path) -> None:
    edit_weights(folder, lambda w: w.update({"model.norm.weight": np.ones(64, dtype=np.int32)}))
    with pytest.raises(ModelFormatError, match="dtype I32"):
        Bundle.open(folder)


def test_validation_can_be_deferred_and_run_later(folder: Path) -> None:
    edit_json(folder / "config.json", lambda c: c.update(intermediate_size=96))
    bundle = Bundle.open(folder, validate=False)
    with pytest.raises(ModelFormatError, match="gate_proj"):
        bundle.validate()


def _shard(folder: Path) -> dict[str, str]:
    """Split the tiny bundle's weights into two shards plus an index; return the weight map."""
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    weight_map: dict[str, str] = {}
    for n, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-{n + 1:05d}-of-00002.safetensors"
        save_file({k: weights[k] for k in part}, folder / shard)
        weight_map |= dict.fromkeys(part, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_weights_open_through_the_index(folder: Path) -> None:
    original = load_file(TINY / "model.safetensors")
    weight_map = _shard(folder)
    bundle = Bundle.open(folder)
    assert len(bundle.weights.files) == 2
    for name, shard in weight_map.items():
        assert bundle.weights.file_of(name).name == shard
        np.testing.assert_array_equal(bundle.weights[name], original[name])


def test_missing_shard_raises_model_not_found_naming_it(folder: Path) -> None:
    _shard(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        Bundle.open(folder)


def test_index_pointing_at_the_wrong_shard_raises(folder: Path) -> None:
    weight_map = _shard(folder)
    name = next(k for k, v in weight_map.items() if v.startswith("model-00001"))
    edit_json(
        folder / "model.safetensors.index.json",
        lambda i: i["weight_map"].update({name: "model-00002-of-00002.safetensors"}),
    )  # type: ignore[union-attr]
    with pytest.raises(ModelFormatError, match="does not hold it"):
        Bundle.open(folder)


def _write_bf16(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write float32 arrays as BF16 safetensors (truncating), which numpy cannot do itself."""
    header: dict[str, object] = {}
    blobs, offset = [], 0
    for name, array in tensors.items():
        blob = (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_bf16_weights_read_as_float32(folder: Path) -> None:
    original = load_file(folder / "model.safetensors")
    _write_bf16(folder / "model.safetensors", original)
    bundle = Bundle.open(folder)
    name = "model.layers.0.mlp.up_proj.weight"
    assert bundle.weights.info(name).dtype == "BF16"
    got = bundle.weights[name]
    assert got.dtype == np.float32 and got.shape == original[name].shape
    truncated = (original[name].view(np.uint32) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(got, truncated)


def test_eos_ids_gather_every_source_in_order(folder: Path) -> None:
    edit_json(folder / "generation_config.json", lambda g: g.update(eos_token_id=[0, 2]))
    edit_json(folder / "tokenizer_config.json", lambda t: t.update(eos_token={"content": "<|im_start|>"}))
    assert Bundle.open(folder).eos_token_ids == (0, 2, 1)


def test_special_ids_fall_back_to_tokenizer_config_tokens(folder: Path) -> None:
    (folder / "generation_config.json").unlink()
    edit_json(folder / "config.json", lambda c: [c.pop(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")])
    bundle = Bundle.open(folder)
    assert bundle.eos_token_ids == (2,)
    assert (bundle.bos_token_id, bundle.pad_token_id) == (1, 0)


def test_chat_template_file_wins_over_tokenizer_config(folder: Path) -> None:
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Bundle.open(folder).chat_template == "{{ messages[0]['content'] }}"


def test_no_chat_template_is_none(folder: Path) -> None:
    edit_json(folder / "tokenizer_config.json", lambda t: t.pop("chat_template"))
    assert Bundle.open(folder).chat_template is None


def test_content_hash_changes_when_weights_change(folder: Path) -> None:
    before = Bundle.open(folder).content_hash()
    assert Bundle.open(folder).content_hash() == before
    edit_weights(folder, lambda w: w.update({"model.norm.weight": np.zeros(64, dtype=np.float32)}))
    assert Bundle.open(folder).content_hash() != before


def test_qwen2_requires_qkv_biases_even_when_config_is_silent() -> None:
    config = json.loads((TINY / "config.json").read_text()) | {"model_type": "qwen2"}
    del config["attention_bias"]
    shapes = ArchSpec.from_config(config).expected_shapes()
    assert shapes["model.layers.0.self_attn.q_proj.bias"] == (64,)
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes


def _spec_with_scaling(scaling: dict[str, object] | None) -> ArchSpec:
    config = json.loads((TINY / "config.json").read_text()) | {"rope_scaling": scaling}
    return ArchSpec.from_config(config)


def test_linear_rope_scaling_divides_every_frequency_by_the_factor() -> None:
    plain = _spec_with_scaling(None).rope_inv_freq()
    np.testing.assert_allclose(_spec_with_scaling({"rope_type": "linear", "factor": 4.0}).rope_inv_freq(), plain / 4)


def test_llama3_rope_scaling_keeps_high_divides_low_and_blends_between() -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    plain = _spec_with_scaling(None).rope_inv_freq()
    scaled = _spec_with_scaling(scaling).rope_inv_freq()
    wavelen = 2 * np.pi / plain
    high, low = wavelen < 64 / 4, wavelen > 64 / 1
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_allclose(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 8)
    assert ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all()


def test_default_rope_type_means_no_scaling() -> None:
    assert _spec_with_scaling({"rope_type": "default"}).rope_scaling is None


def test_opening_reads_no_tensor_data(monkeypatch: pytest.MonkeyPatch) -> None:
    from infer.bundle import Weights

    def no_reads(self: Weights, name: str) -> np.ndarray:
        raise AssertionError(f"read {name} while opening")

    monkeypatch.setattr(Weights, "__getitem__", no_reads)
    bundle = Bundle.open(TINY)
    assert "model.norm.weight" in bundle.weights
    assert "missing.weight" not in bundle.weights
