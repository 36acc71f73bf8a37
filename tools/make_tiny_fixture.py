"""Build the tiny Llama bundle the tests and the conformance suite run on.

The bundle is small enough to commit (a few hundred kB) and fully determined by ``--seed``:
a byte-level BPE tokenizer trained on the text below, a ChatML-style chat template, and
random float32 weights scaled so that logits spread over a few units (greedy picks are then
far from ties, which keeps goldens stable across backends).

    python tools/make_tiny_fixture.py            # rewrites conformance/src/infer_conformance/data/tiny-llama
    python tools/make_tiny_fixture.py --out DIR --seed 7
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "conformance" / "src" / "infer_conformance" / "data" / "tiny-llama"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Training text: plain prose, code, digits and a little non-ASCII so that merges cover the
# shapes the tests feed the tokenizer. Byte-level BPE still encodes anything not seen here.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model answers short questions.
What is two plus two? Two plus two is four. The answer to this question is four.
Once upon a time a little robot learned to paint the sky blue, then green, then gold.
def add(a, b):
    return a + b

for i in range(10):
    print(i, i * i)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -17 1e-5
The weather today is sunny with a light breeze; tomorrow it will rain in the hills.
Café, naïve, façade, jalapeño, Grüße, добрый день, 你好世界, こんにちは 🙂
user: hello there! assistant: hello, how can I help you today?
system: you are a helpful assistant. Keep answers brief and clear.
"""


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer with ChatML special tokens at ids 0, 1, 2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Repeated so that the frequency ranking of pairs is decided by the text, not by one-offs.
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"tokenizer trained to {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    return tok


def make_weights(seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face naming, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    c = CONFIG
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    weights = {"model.embed_tokens.weight": rng.standard_normal((c["vocab_size"], h)).astype(np.float32)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights |= {
            p + "input_layernorm.weight": norm(h),
            p + "self_attn.q_proj.weight": dense(q, h),
            p + "self_attn.k_proj.weight": dense(kv, h),
            p + "self_attn.v_proj.weight": dense(kv, h),
            p + "self_attn.o_proj.weight": dense(h, q),
            p + "post_attention_layernorm.weight": norm(h),
            p + "mlp.gate_proj.weight": dense(i, h),
            p + "mlp.up_proj.weight": dense(i, h),
            p + "mlp.down_proj.weight": dense(h, i),
        }
    weights["model.norm.weight"] = norm(h)
    # A head of its own: tied to the embedding, the residual stream makes every token predict
    # itself and greedy continuations collapse into one repeated token.
    weights["lm_head.weight"] = (0.5 * rng.standard_normal((c["vocab_size"], h))).astype(np.float32)
    return weights


def write_bundle(out: Path, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write a bundle into a temporary sibling folder, then replace ``out`` with it whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fill(tmp)
        # mkdtemp makes the folder private; the fixture is ordinary repository data.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build(out: Path, seed: int) -> Path:
    """Write the bundle to ``out`` (replaced whole, through a temporary sibling folder)."""

    def fill(tmp: Path) -> None:
        tok = train_tokenizer()
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n"
        )
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "add_bos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": CONFIG["max_position_embeddings"],
            "chat_template": CHAT_TEMPLATE,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
        save_file(make_weights(seed), str(tmp / "model.safetensors"), metadata={"format": "pt", "seed": str(seed)})

    return write_bundle(out, fill)


def main() -> None:
    """Command-line entry: build the fixture."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle folder to write")
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the random weights")
    args = parser.parse_args()
    path = build(args.out, args.seed)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {path} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
