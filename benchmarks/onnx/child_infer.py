"""Benchmark child: this project's ONNX backend, driven through its hooks (no engine, greedy argmax).

Run by run.py with the project's environment:
``python child_infer.py JOB.json DTYPE [THREADS [KV_DTYPE [KEY=VALUE...]]]``; each ``KEY=VALUE`` is
a further backend option, its value read as JSON (``batch_invariant=false``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from common import clock, emit, measure, read_job

from infer.bundle import Bundle
from infer.contract import Batch, LoadSpec, token_rows
from infer_backend_onnx import plugin


def main() -> None:
    job = read_job(sys.argv[1])
    dtype = sys.argv[2]
    options: dict[str, object] = {"cache_dir": job["cache_dir"]}
    if len(sys.argv) > 3:
        options["threads"] = int(sys.argv[3])
    if len(sys.argv) > 4:
        options["kv_dtype"] = sys.argv[4]
    extra = dict(pair.split("=", 1) for pair in sys.argv[5:])
    options |= {key: json.loads(value) for key, value in extra.items()}
    bundle = Bundle.open(Path(job["bundle"]))
    started = time.perf_counter()
    spec = LoadSpec(backend="onnx", ref=str(bundle.path), path=bundle.path, bundle=bundle, dtype=dtype)
    model = plugin.infer_load(spec, options)
    assert model is not None
    load_s = time.perf_counter() - started

    def generate(prompt: list[int], new: int) -> tuple[float, float, list[int]]:
        cache = model.new_sequence(len(prompt) + new)
        t0 = clock()
        logits = plugin.infer_prefill(model, Batch((cache,), token_rows([prompt])))
        token = int(np.argmax(logits[0]))
        t1 = clock()
        tokens = [token]
        for _ in range(new - 1):
            logits = plugin.infer_decode(model, Batch((cache,), token_rows([[token]])))
            token = int(np.argmax(logits[0]))
            tokens.append(token)
        t2 = clock()
        cache.release()
        return t1 - t0, t2 - t1, tokens

    def prefill(prompt: list[int]) -> float:
        cache = model.new_sequence(len(prompt) + 1)
        t0 = clock()
        plugin.infer_prefill(model, Batch((cache,), token_rows([prompt])))
        cache.release()
        return clock() - t0

    result = measure(generate, prefill, job)
    emit(
        {
            "system": f"infer onnx {dtype}"
            + (f" kv {sys.argv[4]}" if len(sys.argv) > 4 else "")
            + "".join(f" {pair}" for pair in sys.argv[5:]),
            "load_s": load_s,
            "details": {k: str(v) for k, v in model.details.items()},
            **result,
        }
    )


if __name__ == "__main__":
    main()
