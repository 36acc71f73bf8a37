"""Batching on the ONNX backend: ragged first prompts padded in one run vs grouped by length vs
one at a time, and aggregate decode throughput by batch size (SmolLM2-135M, run.py's bundle).

    python benchmarks/onnx/batch.py [--dtype int4] [--work /tmp/infer-bench-onnx]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from infer.bundle import Bundle
from infer.contract import Batch, LoadSpec, token_rows
from infer_backend_onnx import plugin


def timed(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "infer-bench-onnx")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bundle = Bundle.open(args.work / "smollm2")
    spec = LoadSpec(backend="onnx", ref=str(bundle.path), path=bundle.path, bundle=bundle, dtype=args.dtype)
    model = plugin.infer_load(spec, {"cache_dir": args.work / "infer-cache", "threads": args.threads})
    assert model is not None
    rng = np.random.default_rng(0)
    lengths = [21, 64, 9, 40, 33, 21, 12, 50]
    prompts = [rng.integers(100, 40000, n).tolist() for n in lengths]

    def prefill(rows: list[list[int]]) -> None:
        caches = tuple(model.new_sequence(len(r) + 1) for r in rows)
        plugin.infer_prefill(model, Batch(caches, token_rows(rows)))

    def grouped() -> None:
        by_len: dict[int, list[list[int]]] = defaultdict(list)
        for p in prompts:
            by_len[len(p)].append(p)
        for rows in by_len.values():
            prefill(rows)

    total = sum(lengths)
    print(f"ragged prefill of {len(prompts)} prompts ({total} tokens), {args.dtype}, {args.threads} threads")
    for name, fn in (
        ("padded, one run", lambda: prefill(prompts)),
        ("grouped by length", grouped),
        ("one prompt per run", lambda: [prefill([p]) for p in prompts]),
    ):
        print(f"  {name:22s} {total / timed(fn):8.1f} tok/s")

    print("batched decode (32 steps after a 21-token prompt per row)")
    for rows in (1, 2, 4, 8):
        caches = tuple(model.new_sequence(21 + 40) for _ in range(rows))
        plugin.infer_prefill(model, Batch(caches, token_rows([prompts[0]] * rows)))

        def decode(caches=caches, rows=rows) -> None:  # type: ignore[no-untyped-def]
            for _ in range(8):
                plugin.infer_decode(model, Batch(caches, token_rows([[7]] * rows)))

        print(f"  batch {rows}: {8 * rows / timed(decode):8.1f} tok/s aggregate")


if __name__ == "__main__":
    main()
