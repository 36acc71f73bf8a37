"""A GGUF model at its own precision against float32 and a second int4 rounding: quality and speed, one run.

For each precision of the ONNX backend (``native``: the file's own blocks; ``int4``: requantised
from the dequantized weights, the backend's int4 options as given; ``fp32``: the dequantized
weights), in one process run, one after the other:

* ``infer eval``'s perplexity on the fixed pydoc chunks, with top-1 and greedy agreement with fp32;
* ``infer bench``'s decode tok/s and time to first token (21-token chat prompt, 128 new tokens),
  reported with their ratio to fp32 of the same run; with ``--clock cpu``, the process CPU time of
  the prefill and of each greedy decode step instead (with ``--threads 1`` it counts only the work
  done, not the time other processes take the cores away: the fair measure on a shared machine);
* disk: the GGUF, and the build cache entry of each precision.

    python benchmarks/onnx/gguf_native.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --chunks 8 --threads 2

Figures on a shared machine move with its load: compare the ratios of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _cpu_times(model: Any, *, runs: int, new_tokens: int = 128) -> dict[str, float]:
    """Median process CPU time of the chat prompt's prefill (as ``ttft_ms``) and of a greedy decode step."""
    import statistics
    import time

    from infer.bench import BENCH_PROMPT

    ids = model.encode(model.apply_chat_template([{"role": "user", "content": BENCH_PROMPT}]), add_special_tokens=False)
    prefills, steps = [], []
    for run in range(runs + 1):
        cache = model.new_sequence(len(ids) + new_tokens)
        started = time.process_time()
        logits = model.run_prefill([cache], [ids])
        prefilled = time.process_time()
        for _ in range(new_tokens):
            logits = model.run_decode([cache], [int(logits[0].argmax())])
        if run:  # the first run warms up
            prefills.append(prefilled - started)
            steps.append((time.process_time() - prefilled) / new_tokens)
        cache.release()
    return {
        "decode_tok_s": round(1 / statistics.median(steps), 2),
        "ttft_ms": round(statistics.median(prefills) * 1e3, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, type=Path)
    parser.add_argument(
        "--dtypes",
        default="native,int4,fp32",
        help="precisions; int4-rtn: int4 as before least squares (RTN, 4-bit head)",
    )
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--home", type=Path, help="INFER_HOME for the run (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="infer-gguf-native-"))
    os.environ["INFER_HOME"] = str(home)

    import infer
    from infer.bench import run_bench
    from infer.evaluate import evaluate

    variants = {"int4-rtn": ("int4", {"int4_fit": False, "head_bits": 4, "block_size": 32})}
    models = {}
    for label in args.dtypes.split(","):
        dtype, options = variants.get(label, (label, {}))
        models[label] = infer.load(args.gguf, backend="onnx", dtype=dtype, threads=args.threads, **options)
    reference = models.get("fp32")
    results: dict[str, dict[str, Any]] = {}
    for dtype, model in models.items():
        report = evaluate(model, reference=reference if dtype != "fp32" else None, chunks=args.chunks).as_dict()
        if args.clock == "cpu":
            report |= _cpu_times(model, runs=args.runs)
        else:
            bench = run_bench(model, runs=args.runs)
            report |= {k: bench[k] for k in ("decode_tok_s", "ttft_ms", "prefill_tok_s")}
        report["graph_mb"] = round(_size(Path(model.handle.details["graph"]).parent) / 1e6, 1)
        results[dtype] = report
        print(json.dumps({dtype: report}), flush=True)
    base = results.get("fp32")
    print(f"\nGGUF {args.gguf.name}: {_size(args.gguf) / 1e6:.1f} MB; imported bundle (without the GGUF) ", end="")
    bundle = next(p for p in (home / "converted").iterdir())
    print(f"{sum(p.stat().st_size for p in bundle.iterdir() if p.name != 'model.gguf') / 1e6:.1f} MB")
    print("| dtype | perplexity | top-1 agree | greedy lead | decode tok/s | TTFT ms | graph MB |")
    print("|---|---|---|---|---|---|---|")
    for dtype, r in results.items():

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return f" ({r[key] / base[key]:.2f}x)" if base else ""

        agree = f"{r['top1_agreement']:.3f}" if r["top1_agreement"] is not None else "-"
        print(
            f"| {dtype} | {r['perplexity']:.3f} | {agree} | {r['greedy_leading_agreement'] or '-'}"
            f" | {r['decode_tok_s']}{ratio('decode_tok_s')} | {r['ttft_ms']}{ratio('ttft_ms')} | {r['graph_mb']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for model in models.values():
        model.close()


if __name__ == "__main__":
    main()
