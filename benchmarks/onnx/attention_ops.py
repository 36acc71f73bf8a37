"""One decode step of attention over a long cache: ONNX Runtime's ``GroupQueryAttention`` against plain ops.

    python benchmarks/onnx/attention_ops.py --cached 2048,6000,8000 --threads 1

SmolLM2-135M's heads (9 query heads, 3 KV heads, head size 64), one row, one new token, a cache
of ``--cached`` tokens in a block of that many plus 16: the backend's op (``GroupQueryAttention``,
past and present bound to one block as the backend binds them, rotary off: it is the same work either way) against the
product written as ops (query heads grouped per KV head, ``MatMul`` with the keys stored
transposed, ``Softmax``, ``MatMul`` with the values), both over the live tokens only, in fp32
and in fp16. Reports the median process CPU time of a run per layer (with one thread, CPU time
holds on a loaded machine) and checks both give the same output.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

HEADS, KV_HEADS, HEAD = 9, 3, 64
GROUP = HEADS // KV_HEADS


def make_session(model: Any, threads: int) -> Any:
    """A CPU session of ``model`` with ``threads`` intra-op threads, as the backend makes it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def gqa_node(inputs: list[str], **attributes: Any) -> Any:
    """SmolLM2's ``GroupQueryAttention`` node on ``inputs``, writing ``out`` and the present cache."""
    from onnx import helper

    return helper.make_node(
        "GroupQueryAttention",
        inputs,
        ["out", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
        **attributes,
    )


def gqa_model(capacity: int, dtype: Any) -> Any:
    """The backend's op: q, k, v of one token and the shared cache block in; the attention out."""
    from onnx import TensorProto, helper

    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = gqa_node(["q", "k", "v", "past_key", "past_value", "seqlens_k", "total_len"])
    cache = [1, KV_HEADS, capacity, HEAD]
    graph = helper.make_graph(
        [node],
        "gqa",
        [
            helper.make_tensor_value_info("q", t, [1, 1, HEADS * HEAD]),
            helper.make_tensor_value_info("k", t, [1, 1, KV_HEADS * HEAD]),
            helper.make_tensor_value_info("v", t, [1, 1, KV_HEADS * HEAD]),
            helper.make_tensor_value_info("past_key", t, cache),
            helper.make_tensor_value_info("past_value", t, cache),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total_len", TensorProto.INT32, []),
        ],
        [
            helper.make_tensor_value_info("out", t, [1, 1, HEADS * HEAD]),
            helper.make_tensor_value_info("present_key", t, cache),
            helper.make_tensor_value_info("present_value", t, cache),
        ],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def ops_model(dtype: Any) -> Any:
    """The same product as plain ops over live keys ``[1, kv, 64, T]`` (transposed) and values ``[1, kv, T, 64]``."""
    from onnx import helper, numpy_helper

    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    scale = numpy_helper.from_array(np.array(HEAD**-0.5, dtype), "scale")
    nodes = [
        helper.make_node("Mul", ["q", "scale"], ["qs"]),
        helper.make_node("MatMul", ["qs", "keys_t"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "values"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ops",
        [
            helper.make_tensor_value_info("q", t, [1, KV_HEADS, GROUP, HEAD]),
            helper.make_tensor_value_info("keys_t", t, [1, KV_HEADS, HEAD, "T"]),
            helper.make_tensor_value_info("values", t, [1, KV_HEADS, "T", HEAD]),
        ],
        [helper.make_tensor_value_info("out", t, [1, KV_HEADS, GROUP, HEAD])],
        [scale],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _median_cpu(run: Any, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    return statistics.median(times)


def measure(cached: int, dtype: Any, threads: int, repeats: int) -> dict[str, float]:
    """Median CPU ms of one layer's attention each way, and the largest difference of their outputs."""
    rng = np.random.default_rng(0)
    capacity = cached + 16
    keys = rng.standard_normal((1, KV_HEADS, capacity, HEAD)).astype(dtype)
    values = rng.standard_normal((1, KV_HEADS, capacity, HEAD)).astype(dtype)
    q = rng.standard_normal((1, 1, HEADS * HEAD)).astype(dtype)
    k = rng.standard_normal((1, 1, KV_HEADS * HEAD)).astype(dtype)
    v = rng.standard_normal((1, 1, KV_HEADS * HEAD)).astype(dtype)
    gqa = make_session(gqa_model(capacity, dtype), threads)
    feed = {
        "q": q, "k": k, "v": v, "past_key": keys, "past_value": values,
        "seqlens_k": np.array([cached], np.int32), "total_len": np.array(cached + 1, np.int32),
    }  # fmt: skip
    # As the backend runs it: present bound to the past's own block, so nothing is copied.
    import onnxruntime as ort

    binding = gqa.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
        block = ort.OrtValue.ortvalue_from_numpy(feed[past])
        binding.bind_ortvalue_input(past, block)
        binding.bind_ortvalue_output(present, block)
    binding.bind_output("out")
    gqa.run_with_iobinding(binding)
    gqa_out = binding.copy_outputs_to_cpu()[2]  # in binding order: present_key, present_value, out
    # The plain-ops form reads the same live tokens, the new one appended.
    live_k = np.concatenate([keys[:, :, :cached], k.reshape(1, KV_HEADS, 1, HEAD)], axis=2)
    live_v = np.concatenate([values[:, :, :cached], v.reshape(1, KV_HEADS, 1, HEAD)], axis=2)
    ops = make_session(ops_model(dtype), threads)
    ops_feed = {
        "q": q.reshape(1, KV_HEADS, GROUP, HEAD),
        "keys_t": np.ascontiguousarray(live_k.transpose(0, 1, 3, 2)),
        "values": live_v,
    }
    ops_out = ops.run(["out"], ops_feed)[0].reshape(1, 1, HEADS * HEAD)
    return {
        "gqa_ms": _median_cpu(lambda: gqa.run_with_iobinding(binding), repeats) * 1e3,
        "ops_ms": _median_cpu(lambda: ops.run(["out"], ops_feed), repeats) * 1e3,
        "max_diff": float(np.abs(gqa_out.astype(np.float32) - ops_out.astype(np.float32)).max()),
    }


def main() -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cached", default="512,2048,6000,8000")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print("| cached tokens | KV | GroupQueryAttention | MatMul / Softmax / MatMul | ratio | max difference |")
    print("|---|---|---|---|---|---|")
    for cached in (int(c) for c in args.cached.split(",")):
        for dtype in (np.float32, np.float16):
            r = measure(cached, dtype, args.threads, args.repeats)
            print(
                f"| {cached} | {np.dtype(dtype).name} | {r['gqa_ms']:.3f} ms | {r['ops_ms']:.3f} ms"
                f" | {r['ops_ms'] / r['gqa_ms']:.2f}x | {r['max_diff']:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
