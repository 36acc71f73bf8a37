"""How to carry a quant type's block minimums (Q4_1, Q4_K) through ``MatMulNBits``: measured.

Four graphs compute ``x @ W.T`` for the same 4-bit blocks of 32, one row of ``x`` (a decode step):

* ``float_zp``  - the minimums as float zero points inside the op (exact, one op);
* ``u8_zp0``    - codes against a uint8 zero point of 0, plus ``block_sums(x) @ mins`` (exact);
* ``default_zp``- codes against the op's default zero point (no tensor), plus the offset product
  (what :mod:`infer_backend_onnx.gguf_blocks` builds; exact to float32 rounding);
* ``no_mins``   - the default zero point alone (not exact for these types: the floor to compare).

Sizes: SmolLM2's output head (49,152 x 576) and its fused gate/up projection (3,072 x 576).
Each graph runs ``--repeats`` times after a warm-up; the median is reported with its ratio to
``no_mins`` in the same process run.

    python benchmarks/onnx/matmulnbits_mins.py --threads 2 --accuracy-level 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from infer_backend_onnx.quantize import pack

SIZES = {"lm_head 49152x576": (49152, 576), "gate_up 3072x576": (3072, 576)}
BLOCK = 32


def build(kind: str, n: int, k: int, accuracy_level: int, rng: np.random.Generator) -> bytes:
    blocks = k // BLOCK
    codes = rng.integers(0, 16, (n, blocks, BLOCK), dtype=np.uint8)
    scales = rng.uniform(1e-3, 5e-2, (n, blocks)).astype(np.float32)
    mins = rng.uniform(-0.3, 0.0, (n, blocks)).astype(np.float32)
    inits = [numpy_helper.from_array(pack(codes, 4), "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["x", "B", "scales"]
    if kind == "float_zp":
        # w = scale * (q - zp) + 0  with  zp = -min / scale
        inits.append(numpy_helper.from_array((-mins / scales).astype(np.float32), "zp"))
        inputs.append("zp")
    elif kind == "u8_zp0":
        inits.append(numpy_helper.from_array(np.zeros((n, (blocks + 1) // 2), np.uint8), "zp"))
        inputs.append("zp")
    nodes = [
        helper.make_node(
            "MatMulNBits",
            inputs,
            ["y0" if kind in ("u8_zp0", "default_zp") else "y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=BLOCK,
            accuracy_level=accuracy_level,
        )
    ]
    if kind in ("u8_zp0", "default_zp"):
        offsets = mins if kind == "u8_zp0" else mins + 8 * scales
        inits += [
            numpy_helper.from_array(np.array([0, blocks, BLOCK], np.int64), "shape"),
            numpy_helper.from_array(np.array([-1], np.int64), "axis"),
            numpy_helper.from_array(np.ascontiguousarray(offsets.T), "offsets"),
        ]
        nodes += [
            helper.make_node("Reshape", ["x", "shape"], ["xb"]),
            helper.make_node("ReduceSum", ["xb", "axis"], ["sums"], keepdims=0),
            helper.make_node("MatMul", ["sums", "offsets"], ["shift"]),
            helper.make_node("Add", ["y0", "shift"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    return model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, accuracy_level {args.accuracy_level}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for label, (n, k) in SIZES.items():
            x = rng.standard_normal((1, k)).astype(np.float32)
            times = {}
            for kind in ("no_mins", "default_zp", "u8_zp0", "float_zp"):
                path = Path(tmp) / f"{kind}.onnx"
                path.write_bytes(build(kind, n, k, args.accuracy_level, rng))
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                session.run(None, {"x": x})
                repeats = args.repeats if kind != "float_zp" else max(args.repeats // 20, 5)
                samples = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    session.run(None, {"x": x})
                    samples.append(time.perf_counter() - started)
                times[kind] = statistics.median(samples)
            base = times["no_mins"]
            for kind, t in times.items():
                print(f"{label:20s} {kind:11s} {t * 1e3:8.3f} ms  x{t / base:6.2f}")


if __name__ == "__main__":
    main()
