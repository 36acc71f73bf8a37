"""Build the tiny per-family bundles the conformance suite grades backends on, with transformers.

A dev tool, run in the reference environment (torch + transformers; never a project dependency):

    /work/venv-ref/bin/python tools/make_family_fixtures.py            # every family
    /work/venv-ref/bin/python tools/make_family_fixtures.py qwen3      # one

Each fixture is a Hugging Face-layout folder under conformance/src/infer_conformance/data/,
written by ``save_pretrained`` of a tiny model whose every weight, norm and bias is random
(seeded), so the config is the one transformers itself writes for the family. The tokenizer
and chat template are the tiny Llama's (tools/make_tiny_fixture.py): the families differ in
the decoder, not in the vocabulary. Windowed families use a window of 16 so that the goldens'
~80-token prompts run far past it.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from make_tiny_fixture import write_bundle  # the sibling script: one way to replace a fixture folder
from transformers import AutoModelForCausalLM, PretrainedConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "conformance" / "src" / "infer_conformance" / "data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
WINDOW = 16

#: Shared sizes: small enough for a < 1 MB fixture, grouped-query attention with 2 kv heads.
COMMON: dict[str, Any] = {
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def mistral() -> PretrainedConfig:
    """Mistral with a sliding window on every layer."""
    from transformers import MistralConfig

    return MistralConfig(
        **COMMON, num_hidden_layers=2, sliding_window=WINDOW, rope_theta=10000.0, tie_word_embeddings=False
    )


def qwen3() -> PretrainedConfig:
    """Qwen3 with q/k norm, biases on every attention projection and a window on its second layer."""
    from transformers import Qwen3Config

    return Qwen3Config(
        **COMMON,
        num_hidden_layers=2,
        attention_bias=True,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    )


def gemma3() -> PretrainedConfig:
    """Gemma 3 text: two local layers and one global, two RoPE bases, linear scaling (as on 4B+), tied head."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **COMMON,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        tie_word_embeddings=True,
    )


def gemma2() -> PretrainedConfig:
    """Gemma 2: alternating local/global layers, attention and final-logit soft-capping."""
    from transformers import Gemma2Config

    return Gemma2Config(
        **COMMON,
        num_hidden_layers=2,
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        tie_word_embeddings=True,
    )


def phi3() -> PretrainedConfig:
    """Phi-3: fused qkv and gate_up, LongRoPE on half of each head (Phi-4-mini rotates 3/4), a window on every layer."""
    from transformers import Phi3Config

    # Phi-3 derives head_dim from hidden_size: 2 heads of 32, so the rotated half (16 dims) is
    # a size ONNX Runtime's attention kernel rotates (a multiple of 16).
    common = COMMON | {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512}
    del common["head_dim"]
    return Phi3Config(
        **common,
        num_hidden_layers=2,
        sliding_window=WINDOW,
        # LongRoPE as on Phi-3.5 / Phi-4-mini: per-frequency short/long factors and an attention
        # factor (max 512 over an original 256 gives sqrt(1 + ln 2 / ln 256)); the goldens' 134
        # positions stay under 256, where transformers uses the short factors.
        original_max_position_embeddings=256,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 256,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0],
        },
        tie_word_embeddings=False,
    )


def smollm3() -> PretrainedConfig:
    """SmolLM3: every second layer without RoPE here (every fourth in the released model)."""
    from transformers import SmolLM3Config

    return SmolLM3Config(
        **COMMON, num_hidden_layers=2, no_rope_layers=[1, 0], rope_theta=10000.0, tie_word_embeddings=False
    )


FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-mistral": mistral,
    "tiny-qwen3": qwen3,
    "tiny-gemma3": gemma3,
    "tiny-gemma2": gemma2,
    "tiny-phi3": phi3,
    "tiny-smollm3": smollm3,
}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int, *, offset_norms: bool) -> None:
    """Every parameter random: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), biases and norms small.

    ``offset_norms``: the family's norms compute ``1 + w`` (Gemma), so ``w`` is drawn around 0.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            value = 0.1 * noise + (0.0 if offset_norms else 1.0)
        elif name.endswith(".bias"):
            value = 0.2 * noise
        elif "embed_tokens" in name:
            # Gemma multiplies embeddings by sqrt(hidden): drawn that much smaller, they stay a
            # part of the residual stream rather than all of it, so a tied head does not just
            # predict the input token back.
            value = noise / math.sqrt(param.shape[-1]) if offset_norms else noise
        elif "lm_head" in name:
            value = 0.5 * noise
        else:
            value = noise / math.sqrt(param.shape[-1])
        param.copy_(value)


def build(name: str, seed: int) -> Path:
    """Write fixture ``name`` into the package data (replaced whole, through a temporary folder)."""
    config = FAMILIES[name]()
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomise(model, seed, offset_norms=config.model_type.startswith("gemma"))

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        for file in TOKENIZER_FILES:
            shutil.copy(DATA / "tiny-llama" / file, tmp / file)

    return write_bundle(DATA / name, fill)


def main() -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", choices=[*FAMILIES, []], help="fixtures to build (default: all)")
    parser.add_argument("--seed", type=int, default=20261130)
    args = parser.parse_args()
    for name in args.names or FAMILIES:
        path = build(name, args.seed)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"wrote {path} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
