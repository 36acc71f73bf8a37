"""GGUF import: a tiny GGUF written by the test (quantized, rope-permuted), the real SmolLM2 when present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_gguf import TINY, write_tiny_gguf
from tokenizers import Tokenizer

from infer.bundle import Bundle
from infer.errors import ModelError, ModelFormatError, ModelNotFoundError, UnsupportedModelError
from infer.gguf_import import import_gguf
from infer.gguf_tensors import MANIFEST_NAME, GGUFWeights, unpermute_rows

pytestmark = pytest.mark.unit

Q = gguf.GGMLQuantizationType
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "  spaces   and\ttabs\n\nnewlines  ",
    "Numbers 0 42 2024 3.14159",
    "Café 你好 🙂 добрый",
    "<|im_start|>user\nhello<|im_end|>\n",
]


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_import_reproduces_the_dequantized_weights_in_hugging_face_layout(tmp_path: Path, qtype: Q) -> None:
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", qtype)
    bundle = Bundle.open(import_gguf(tmp_path / "tiny.gguf", tmp_path / "out"))
    assert set(bundle.weights) == set(expected)
    for name, want in expected.items():
        got = bundle.weights[name]
        assert got.dtype == np.float32, name
        # Quantization blocks run along rows, so un-permuting Q/K rows after dequantizing is exact.
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_1])
def test_raw_blocks_dequantize_to_the_same_tensor_rows_in_hugging_face_order(tmp_path: Path, qtype: Q) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", qtype)
    weights = Bundle.open(import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")).weights
    assert isinstance(weights, GGUFWeights)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        raw = weights.raw(name)
        assert raw.qtype == qtype.name and raw.shape == weights.info(name).shape
        assert raw.blocks.dtype == np.uint8 and raw.blocks.shape[0] == raw.shape[0]
        np.testing.assert_array_equal(
            gguf.quants.dequantize(raw.blocks, qtype).reshape(raw.shape), weights[name], err_msg=name
        )


def test_released_pages_read_back_the_same_blocks(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q4_1)
    weights = Bundle.open(import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")).weights
    assert isinstance(weights, GGUFWeights)
    name = "model.layers.1.self_attn.k_proj.weight"
    raw = weights.raw(name).blocks.copy()
    before = weights[name]
    weights.release(name)
    np.testing.assert_array_equal(weights.raw(name).blocks, raw)
    np.testing.assert_array_equal(weights[name], before)


def test_import_writes_no_weight_copy_and_links_the_gguf(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q4_1)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert not list(out.glob("*.safetensors"))
    assert (out / "model.gguf").stat().st_ino == (tmp_path / "tiny.gguf").stat().st_ino
    # The source can go: the bundle holds its own link to the data.
    (tmp_path / "tiny.gguf").unlink()
    bundle = Bundle.open(out)
    name = "model.embed_tokens.weight"
    assert bundle.weights[name].shape == bundle.spec.expected_shapes()[name]


def test_import_with_move_takes_the_file_into_the_bundle(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q8_0)
    size = (tmp_path / "tiny.gguf").stat().st_size
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out", move=True)
    assert not (tmp_path / "tiny.gguf").exists()
    assert (out / "model.gguf").stat().st_size == size


def test_bundle_whose_gguf_is_gone_says_to_import_again(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q8_0)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    (out / "model.gguf").unlink()
    with pytest.raises(ModelNotFoundError, match="import the GGUF again"):
        Bundle.open(out)


def test_bundle_whose_gguf_changed_size_is_refused(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q8_0)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out", move=True)
    with (out / "model.gguf").open("r+b") as f:
        f.truncate((out / "model.gguf").stat().st_size - 64)
    with pytest.raises(ModelFormatError, match="truncated"):
        Bundle.open(out)


def test_manifest_naming_bytes_past_the_file_is_refused(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q8_0)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["tensors"]["model.norm.weight"]["offset"] = manifest["size"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match=r"model\.norm\.weight"):
        Bundle.open(out)


def test_f32_import_gives_back_the_original_bundle_exactly(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32)
    imported = Bundle.open(import_gguf(tmp_path / "tiny.gguf", tmp_path / "out"))
    original = Bundle.open(TINY)
    assert imported.spec == original.spec
    for name in original.weights:
        np.testing.assert_array_equal(imported.weights[name], original.weights[name], err_msg=name)


def test_q_and_k_rows_are_unpermuted(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32)
    imported = Bundle.open(import_gguf(tmp_path / "tiny.gguf", tmp_path / "out"))
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    original = Bundle.open(TINY).weights["model.layers.0.self_attn.q_proj.weight"]
    # The file really holds permuted rows, and the import really undoes them.
    assert not np.array_equal(stored["blk.0.attn_q.weight"], original)
    np.testing.assert_array_equal(imported.weights["model.layers.0.self_attn.q_proj.weight"], original)


def test_missing_output_tensor_means_tied_embeddings(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32, tied=True)
    bundle = Bundle.open(import_gguf(tmp_path / "tiny.gguf", tmp_path / "out"))
    assert bundle.spec.tie_word_embeddings
    assert "lm_head.weight" not in bundle.weights


def test_imported_tokenizer_encodes_like_the_original(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q8_0)
    bundle = Bundle.open(import_gguf(tmp_path / "tiny.gguf", tmp_path / "out"))
    ours, original = Tokenizer.from_file(str(bundle.tokenizer_path)), Tokenizer.from_file(str(TINY / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text).ids == original.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_special_ids_and_chat_template_are_carried_over(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q8_0)
    bundle = Bundle.open(import_gguf(tmp_path / "tiny.gguf", tmp_path / "out"))
    original = Bundle.open(TINY)
    assert bundle.eos_token_ids == (2,)
    assert (bundle.bos_token_id, bundle.pad_token_id) == (1, 0)
    assert bundle.chat_template == original.chat_template
    config = json.loads((bundle.path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )


def test_eot_token_joins_the_eos_ids(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32, edit=lambda w: w.add_eot_token_id(0))
    bundle = Bundle.open(import_gguf(tmp_path / "tiny.gguf", tmp_path / "out"))
    assert bundle.eos_token_ids == (2, 0)


def test_reimport_replaces_an_earlier_bundle_whole(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    (out / "stale.txt").write_text("from before")
    import_gguf(tmp_path / "tiny.gguf", out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]


def test_missing_file_raises_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        import_gguf(tmp_path / "none.gguf", tmp_path / "out")


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 10])
def test_garbage_raises_model_format_error_and_leaves_nothing(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.gguf").write_bytes(content)
    with pytest.raises(ModelFormatError, match=r"bad\.gguf"):
        import_gguf(tmp_path / "bad.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_truncated_gguf_raises_model_format_error(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q8_0)
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=r"cut\.gguf"):
        import_gguf(tmp_path / "cut.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_raises_and_leaves_nothing(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32, arch="gptneox")
    with pytest.raises(UnsupportedModelError, match="gptneox"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32, edit=lambda w: w.add_tokenizer_pre("mystery"))
    with pytest.raises(UnsupportedModelError, match="mystery"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")


def test_output_folder_holding_other_files_is_refused(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="not a model bundle"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    path = os.environ.get("INFER_SMOLLM2_GGUF")
    if not path:
        pytest.skip("set INFER_SMOLLM2_GGUF to the SmolLM2-135M-Instruct GGUF file to run")
    return Bundle.open(import_gguf(path, tmp_path_factory.mktemp("smollm2") / "bundle"))


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_imports_into_its_known_architecture(smollm2: Bundle) -> None:
    s = smollm2.spec
    assert (s.num_hidden_layers, s.hidden_size, s.num_attention_heads, s.num_key_value_heads) == (30, 576, 9, 3)
    assert (s.head_dim, s.vocab_size, s.rope_theta, s.tie_word_embeddings) == (64, 49152, 100000.0, True)
    assert smollm2.eos_token_ids == (2,)
    assert smollm2.chat_template is not None and "SmolLM" in smollm2.chat_template


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_tokenizer_splits_digits_and_keeps_special_tokens(smollm2: Bundle) -> None:
    tok = Tokenizer.from_file(str(smollm2.tokenizer_path))
    ids = tok.encode("<|im_start|>user\nWhat is 2+2?<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert [tok.id_to_token(i) for i in tok.encode("2024").ids] == ["2", "0", "2", "4"]
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nWhat is 2+2?<|im_end|>"


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_weights_equal_the_float32_import_bit_for_bit_at_the_size_of_the_gguf(smollm2: Bundle) -> None:
    reader = gguf.GGUFReader(smollm2.weights.file)  # type: ignore[attr-defined]
    stored = {t.name: t for t in reader.tensors}
    checks = {
        "model.embed_tokens.weight": ("token_embd.weight", 0),
        "model.layers.3.self_attn.q_proj.weight": ("blk.3.attn_q.weight", 9),
        "model.layers.3.self_attn.k_proj.weight": ("blk.3.attn_k.weight", 3),
        "model.layers.29.mlp.down_proj.weight": ("blk.29.ffn_down.weight", 0),
    }
    for name, (gguf_name, heads) in checks.items():
        t = stored[gguf_name]
        # What the float32 import wrote: dequantize the whole tensor, then un-permute Q/K rows.
        old = gguf.quants.dequantize(t.data, Q(t.tensor_type)).reshape(smollm2.weights.info(name).shape)
        old = unpermute_rows(old, heads) if heads else old
        np.testing.assert_array_equal(smollm2.weights[name], old, err_msg=name)
    own = sum(p.stat().st_size for p in smollm2.path.iterdir() if p.name != "model.gguf")
    assert own < 0.05 * smollm2.weights.file.stat().st_size  # type: ignore[attr-defined]
