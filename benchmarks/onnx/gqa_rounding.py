"""Whether ONNX Runtime's ``GroupQueryAttention`` rounds a query the same way alone and among others.

    python benchmarks/onnx/gqa_rounding.py [--past 200] [--threads 2]

SmolLM2-135M's heads (9 query heads, 3 KV heads, head size 64), one row, a cache of ``--past``
random tokens. Each query is run once as a one-token step (what decode does) and once inside a
step of several tokens (what speculative verification and chunked prefill do), and the outputs
of the same query are compared bit for bit: one-token steps against many-token steps, and
many-token steps of different lengths against each other. Exact speculative decoding needs the
verification step to round like decode; at fp32 the difference is ~1e-7 and never flips a greedy
choice, while int4 graphs quantise activations to int8 after attention, which turns it into logit
differences of up to ~1 (see benchmarks/README.md, KV reuse).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from attention_ops import HEAD, HEADS, KV_HEADS, gqa_node, make_session

WIDTH = (HEADS + 2 * KV_HEADS) * HEAD


def _session(capacity: int, threads: int) -> Any:
    """The op with q, k and v packed, any number of new tokens, the cache block bound as past."""
    from onnx import TensorProto, helper

    cache = [1, KV_HEADS, capacity, HEAD]
    inputs = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, "s", WIDTH]),
        helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    node = gqa_node(["qkv", "", "", "past_key", "past_value", "seqlens_k", "total"], scale=HEAD**-0.5)
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "present_key", "present_value")
    ]
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return make_session(helper.make_model(graph, opset_imports=opsets), threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--past", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    capacity = args.past + 32
    session = _session(capacity, args.threads)
    rng = np.random.default_rng(0)

    def run(qkv: Any, key: Any, value: Any, past: int) -> tuple[Any, Any, Any]:
        feed = {
            "qkv": qkv[None],
            "past_key": key,
            "past_value": value,
            "seqlens_k": np.array([past + len(qkv) - 1], np.int32),
            "total": np.array(past + len(qkv), np.int32),
        }
        out, key, value = session.run(None, feed)
        return out[0], key, value

    empty = np.zeros((1, KV_HEADS, capacity, HEAD), np.float32)
    _, key, value = run(rng.standard_normal((args.past, WIDTH)).astype(np.float32), empty, empty.copy(), 0)
    tokens = rng.standard_normal((16, WIDTH)).astype(np.float32)
    many, _, _ = run(tokens, key.copy(), value.copy(), args.past)
    alone, k, v = [], key.copy(), value.copy()
    for i in range(len(tokens)):
        out, k, v = run(tokens[i : i + 1], k, v, args.past + i)
        alone.append(out[0])
    one = np.stack(alone)
    same, worst = np.array_equal(one, many), np.abs(one - many).max()
    print(f"one-token steps vs a 16-token step: bit-identical {same}, max |diff| {worst:.2e}")
    for n in (2, 3, 5, 8):
        part, _, _ = run(tokens[:n], key.copy(), value.copy(), args.past)
        print(f"a {n}-token step vs the 16-token step, same queries: bit-identical {np.array_equal(part, many[:n])}")


if __name__ == "__main__":
    main()
