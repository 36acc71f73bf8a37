"""The architecture registry: each family's config.json into a typed spec, and what it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infer import arch
from infer.arch import ArchSpec, spec_from_config
from infer.errors import ModelFormatError, UnsupportedModelError

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[3] / "conformance" / "src" / "infer_conformance" / "data"

BASE: dict[str, Any] = {
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
}


def spec(**config: Any) -> ArchSpec:
    return spec_from_config(BASE | config)


def fixture_spec(name: str) -> ArchSpec:
    return spec_from_config(json.loads((DATA / name / "config.json").read_text()))


def test_every_family_module_is_discovered_by_its_model_types() -> None:
    assert {"llama", "mistral", "qwen2", "smollm", "qwen3", "gemma3_text", "gemma3", "gemma2", "phi3"} <= set(
        arch.supported_architectures()
    )
    assert arch.registry()["qwen3"] is arch.qwen3.from_config  # type: ignore[attr-defined]


@pytest.mark.parametrize("model_type", ["phi", "gpt2", "mamba", ""])
def test_unregistered_family_is_refused_naming_it_and_the_supported_ones(model_type: str) -> None:
    with pytest.raises(UnsupportedModelError, match=rf"model_type {model_type!r} is not supported.*gemma3"):
        spec(model_type=model_type)


def test_plain_llama_needs_no_feature_beyond_the_base_layout() -> None:
    s = spec(model_type="llama")
    assert s.features() == frozenset()
    assert s.sliding_windows == (None,) * 12
    assert s.scale == pytest.approx(1 / 4)


def test_mistral_sliding_window_applies_to_every_layer() -> None:
    assert spec(model_type="mistral", sliding_window=32).sliding_windows == (32,) * 12
    assert spec(model_type="mistral", sliding_window=None).sliding_windows == (None,) * 12


def test_llama_ignores_a_sliding_window_key_it_does_not_use() -> None:
    # transformers' Llama never windows, whatever the config carries.
    assert spec(model_type="llama", sliding_window=32).features() == frozenset()


def test_qwen2_windows_start_at_max_window_layers_when_enabled() -> None:
    on = spec(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=10)
    assert on.sliding_windows == (None,) * 10 + (8, 8)
    assert spec(model_type="qwen2", use_sliding_window=False, sliding_window=8).sliding_windows == (None,) * 12


def test_layer_types_decide_which_layers_slide() -> None:
    types = ["sliding_attention", "full_attention"] * 6
    s = spec(model_type="mistral", sliding_window=8, layer_types=types)
    assert s.sliding_windows == (8, None) * 6


def test_unknown_layer_type_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        spec(model_type="mistral", sliding_window=8, layer_types=["chunked_attention"] * 12)


def test_qwen3_has_qk_norm_and_its_norm_weights_are_required() -> None:
    s = spec(model_type="qwen3", head_dim=32)
    assert s.qk_norm and s.head_dim == 32 and not s.attention_bias
    shapes = s.expected_shapes()
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (32,)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * 32, 64)


def test_gemma3_legacy_config_gives_5_local_1_global_with_two_rope_bases() -> None:
    s = spec(
        model_type="gemma3_text",
        sliding_window=512,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh",
    )
    assert s.sliding_windows == (512,) * 5 + (None,) + (512,) * 5 + (None,)
    assert s.tie_word_embeddings and s.sandwich_norms and s.qk_norm and s.norm_offset == 1.0
    assert s.hidden_act == "gelu_tanh"
    assert s.embedding_scale == pytest.approx(8.0)
    assert s.scale == pytest.approx(1 / 16)
    d = np.arange(0, 16, 2) / 16
    np.testing.assert_allclose(s.rope_inv_freq(0), 1 / 10_000.0**d)
    np.testing.assert_allclose(s.rope_inv_freq(5), 1 / 1_000_000.0**d / 8)
    assert len(s.rope_groups()) == 2


def test_gemma3_per_layer_type_rope_parameters_match_the_legacy_form() -> None:
    legacy = spec(model_type="gemma3_text", sliding_window=64, rope_theta=1e6, rope_local_base_freq=1e4)
    nested = spec(
        model_type="gemma3_text",
        sliding_window=64,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        },
    )
    assert legacy == nested


def test_gemma3_multimodal_config_reads_its_text_config() -> None:
    s = spec_from_config({"model_type": "gemma3", "text_config": BASE | {"sliding_window": 64}})
    assert s.model_type == "gemma3_text" and s.num_hidden_layers == 12 and s.tie_word_embeddings


def test_gemma2_caps_scores_and_logits_and_alternates_windows() -> None:
    s = spec(model_type="gemma2", sliding_window=64, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    assert (s.attention_softcap, s.final_softcap) == (50.0, 30.0)
    assert s.sliding_windows[:4] == (64, None, 64, None)
    assert not s.qk_norm and s.local_rope_theta is None


@pytest.mark.parametrize(
    ("fixture", "features"),
    [
        ("tiny-llama", set()),
        ("tiny-mistral", {"sliding_window"}),
        ("tiny-qwen3", {"sliding_window", "qk_norm"}),
        (
            "tiny-gemma3",
            {"sliding_window", "local_rope", "qk_norm", "norm_offset", "sandwich_norms", "gelu_tanh"}
            | {"embedding_scale", "attention_scale"},
        ),
        (
            "tiny-gemma2",
            {"sliding_window", "norm_offset", "sandwich_norms", "gelu_tanh", "embedding_scale", "attention_scale"}
            | {"attention_softcap", "final_softcap"},
        ),
        ("tiny-phi3", {"sliding_window", "partial_rotary", "fused_projections"}),  # and LongRoPE
        ("tiny-smollm3", {"nope_layers"}),
    ],
)
def test_fixture_configs_written_by_transformers_give_the_family_features(fixture: str, features: set[str]) -> None:
    assert fixture_spec(fixture).features() == features


def test_phi3_reads_partial_rotary_from_either_place_and_requires_fused_matrices() -> None:
    top = spec(model_type="phi3", head_dim=None, partial_rotary_factor=0.75, num_attention_heads=2)
    nested = spec(
        model_type="phi3", head_dim=None, num_attention_heads=2, rope_parameters={"partial_rotary_factor": 0.75}
    )
    assert top.rotary_dim == nested.rotary_dim == 24 and top.head_dim == 32
    assert len(top.rope_inv_freq()) == 12
    shapes = top.expected_shapes()
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (2 * 32 + 2 * 2 * 32, 64)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (256, 64)
    assert "model.layers.0.self_attn.q_proj.weight" not in shapes


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "ntk"])
def test_rope_scaling_not_built_is_refused_naming_the_kind(kind: str) -> None:
    with pytest.raises(UnsupportedModelError, match=kind):
        spec(model_type="qwen3", rope_scaling={"rope_type": kind, "factor": 4.0})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "mistral", "sliding_window": 0}, "sliding_window"),
        ({"model_type": "gemma3_text", "sliding_window_pattern": 0}, "sliding_window_pattern"),
        ({"model_type": "mistral", "sliding_window": 8, "layer_types": ["full_attention"]}, "layer_types"),
        ({"model_type": "qwen2", "use_sliding_window": "yes"}, "use_sliding_window"),
        ({"model_type": "gemma3", "text_config": None}, "text_config"),
    ],
)
def test_malformed_family_values_raise_model_format_error_naming_the_key(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelFormatError, match=match):
        spec(**change)


def test_require_names_every_missing_feature_and_the_backend() -> None:
    s = fixture_spec("tiny-qwen3")
    s.require({"sliding_window", "qk_norm"}, backend="x")
    with pytest.raises(UnsupportedModelError, match=r"coreml backend .*qk_norm .*sliding_window") as info:
        s.require(set(), backend="coreml")
    assert "per-head RMSNorm" in str(info.value)


def test_sliding_layers_use_the_local_base_only_when_one_is_given() -> None:
    s = spec(model_type="mistral", sliding_window=8, rope_theta=500.0)
    np.testing.assert_allclose(s.rope_inv_freq(0), s.rope_inv_freq())
    assert math.isclose(s.rope_inv_freq(0)[1], 500.0 ** (-2 / 16))


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_gemma3_multimodal_checkpoint_opens_as_its_text_decoder(tmp_path: Path, prefix: str) -> None:
    import shutil

    from safetensors.numpy import load_file, save_file

    from infer.bundle import Bundle

    source = DATA / "tiny-gemma3"
    shutil.copytree(source, tmp_path / "mm")
    text = json.loads((source / "config.json").read_text())
    (tmp_path / "mm" / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    original = load_file(source / "model.safetensors")
    renamed = {prefix + name.removeprefix("model."): w for name, w in original.items()}
    renamed["vision_tower.vision_model.patch_embedding.weight"] = np.ones((4, 3), np.float32)
    save_file(renamed, tmp_path / "mm" / "model.safetensors")
    bundle = Bundle.open(tmp_path / "mm")
    assert bundle.spec == Bundle.open(source).spec
    assert sorted(bundle.weights) == sorted(original) and len(bundle.weights) == len(original)
    for name, w in original.items():
        np.testing.assert_array_equal(bundle.weights[name], w)
        assert bundle.weights.info(name).shape == w.shape


SHORT = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]


def longrope(**extra: Any) -> ArchSpec:
    scaling = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": [1.0] * 8} | extra
    return spec(
        model_type="phi3", head_dim=None, num_attention_heads=4, max_position_embeddings=131072, rope_scaling=scaling
    )


def test_longrope_uses_the_short_factors_and_caps_the_context_where_they_end() -> None:
    s = longrope(original_max_position_embeddings=4096)
    plain = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(s.rope_inv_freq(), plain / SHORT)
    assert s.max_position_embeddings == 4096
    # Phi-3's attention factor: sqrt(1 + ln(131072 / 4096) / ln(4096)).
    assert s.rope_attention_factor() == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    cos, sin = s.rope_cos_sin(np.arange(3))
    np.testing.assert_allclose(cos[0], s.rope_attention_factor())
    assert cos.shape == sin.shape == (3, 8)


def test_longrope_reads_a_given_attention_factor_and_the_top_level_original_length() -> None:
    s = spec_from_config(
        BASE
        | {
            "model_type": "phi3",
            "head_dim": None,
            "original_max_position_embeddings": 256,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "attention_factor": 1.5,
            },
        }
    )
    assert (s.max_position_embeddings, s.rope_attention_factor()) == (256, 1.5)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"short_factor": [1.0, 2.0]}, "short_factor has 2 entries"),
        ({"long_factor": "x"}, "long_factor"),
        ({}, "original"),
    ],
)
def test_malformed_longrope_raises_model_format_error_naming_it(extra: dict[str, Any], match: str) -> None:
    if extra:
        extra |= {"original_max_position_embeddings": 4096}
    with pytest.raises(ModelFormatError, match=match):
        longrope(**extra)


def test_smollm3_leaves_every_fourth_layer_unrotated_unless_told_otherwise() -> None:
    assert spec(model_type="smollm3", num_hidden_layers=8).rope_layers == (True, True, True, False) * 2
    given = spec(model_type="smollm3", num_hidden_layers=2, no_rope_layers=[0, 1])
    assert given.rope_layers == (False, True)
    with pytest.raises(ModelFormatError, match="no_rope_layers"):
        spec(model_type="smollm3", num_hidden_layers=2, no_rope_layers=[1])


def test_longrope_on_any_family_is_checked_and_capped_the_same_way() -> None:
    scaling = {
        "rope_type": "longrope",
        "short_factor": SHORT,
        "long_factor": SHORT,
        "original_max_position_embeddings": 64,
    }
    assert spec(model_type="llama", rope_scaling=scaling).max_position_embeddings == 64
    with pytest.raises(ModelFormatError, match="short_factor has 3 entries"):
        spec(model_type="qwen3", rope_scaling=scaling | {"short_factor": [1.0, 1.0, 1.0]})
