"""Write a synthetic Llama-shaped GGUF of a chosen size: random Q4_0 / Q4_K / Q6_K blocks, a real tokenizer.

For scale checks of the GGUF path (import, native build, load) without downloading a large model:
hidden 2048, intermediate 5632, 32 heads of 64, 4 KV heads; as many layers as the size asks for.
Attention and gate/up projections and the embedding are Q4_0, down projections Q4_K, the output
head Q6_K (the mix of a Q4_K_M file). Codes are random bytes; each block's float16 scales are set
so weights have a trained model's magnitude (~0.02). Tokenizer, special ids and chat template are
copied from ``--tokenizer-from`` (SmolLM2's GGUF). Tensors are generated and written one at a time,
so memory stays at one tensor whatever the size.

    python tools/make_synthetic_gguf.py --out big.gguf --size-gb 2.5 --tokenizer-from SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 2048, 5632, 32, 4, 64
#: Byte offsets of each type's float16 scale fields, and the scale that gives weights of ~0.02.
_SCALES = {Q.Q4_0: ((0,), 0.005), Q.Q4_K: ((0, 2), 0.0001), Q.Q6_K: ((208,), 0.00002)}


def layer_tensors(n: int) -> list[tuple[str, tuple[int, int], Any]]:
    """Name, (rows, columns) and type of each matrix of layer ``n``."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return [
        (f"blk.{n}.attn_q.weight", (q, HIDDEN), Q.Q4_0),
        (f"blk.{n}.attn_k.weight", (kv, HIDDEN), Q.Q4_0),
        (f"blk.{n}.attn_v.weight", (kv, HIDDEN), Q.Q4_0),
        (f"blk.{n}.attn_output.weight", (HIDDEN, q), Q.Q4_0),
        (f"blk.{n}.ffn_gate.weight", (INTERMEDIATE, HIDDEN), Q.Q4_0),
        (f"blk.{n}.ffn_up.weight", (INTERMEDIATE, HIDDEN), Q.Q4_0),
        (f"blk.{n}.ffn_down.weight", (HIDDEN, INTERMEDIATE), Q.Q4_K),
    ]


def _nbytes(shape: tuple[int, int], qtype: Any) -> int:
    block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    return shape[0] * shape[1] // block * size


def random_blocks(shape: tuple[int, int], qtype: Any, rng: np.random.Generator) -> np.ndarray:
    """``shape`` weights of ``qtype`` as ``[rows, bytes]``: random codes, scales of a trained model's size."""
    block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    fields, scale = _SCALES[qtype]
    for start in fields:
        values = rng.uniform(0.5 * scale, 1.5 * scale, data.shape[:2]).astype(np.float16)
        data[..., start : start + 2] = values[..., None].view(np.uint8)
    if qtype == Q.Q4_K:
        data[..., 4:16] &= 0x3F  # keep the 6-bit sub-block scales and minimums small: no top bits
    return data.reshape(shape[0], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size-gb", type=float, default=2.5)
    parser.add_argument("--tokenizer-from", type=Path, required=True, help="a GGUF whose tokenizer to copy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    source = gguf.GGUFReader(args.tokenizer_from)
    tokens = source.fields["tokenizer.ggml.tokens"].contents()
    vocab = len(tokens)
    head = [("token_embd.weight", (vocab, HIDDEN), Q.Q4_0), ("output.weight", (vocab, HIDDEN), Q.Q6_K)]
    per_layer = sum(_nbytes(s, t) for _, s, t in layer_tensors(0))
    layers = max(1, round((args.size_gb * 1e9 - sum(_nbytes(s, t) for _, s, t in head)) / per_layer))

    writer = gguf.GGUFWriter(str(args.out), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(vocab)
    for key in ("model", "pre"):
        writer.add_string(f"tokenizer.ggml.{key}", source.fields[f"tokenizer.ggml.{key}"].contents())
    writer.add_token_list(tokens)
    writer.add_token_types(source.fields["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(source.fields["tokenizer.ggml.merges"].contents())
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        field = source.fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}", int(field.contents()))
    if "tokenizer.chat_template" in source.fields:
        writer.add_chat_template(source.fields["tokenizer.chat_template"].contents())

    matrices = [head[0], *(t for n in range(layers) for t in layer_tensors(n)), head[1]]
    norms = [f"blk.{n}.{kind}.weight" for n in range(layers) for kind in ("attn_norm", "ffn_norm")] + [
        "output_norm.weight"
    ]
    for name, shape, qtype in matrices:
        # The writer takes a quantized tensor's shape in bytes per row, numpy order.
        nbytes = _nbytes(shape, qtype)
        writer.add_tensor_info(name, (shape[0], nbytes // shape[0]), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    for name in norms:
        writer.add_tensor_info(name, (HIDDEN,), np.dtype(np.float32), HIDDEN * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    for _, shape, qtype in matrices:
        writer.write_tensor_data(random_blocks(shape, qtype, rng))
    for _ in norms:
        writer.write_tensor_data(np.ones(HIDDEN, np.float32))
    writer.close()
    print(f"{args.out}: {layers} layers, {args.out.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
