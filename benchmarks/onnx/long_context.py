"""Long contexts: prefill and decode speed of SmolLM2-135M at 512 / 2k / 6k / 8k prompt tokens, in one run.

Systems, each in its own process, one after the other on the same prompt ids (the start of the
Python standard library's own documentation, as plain text), greedy, 64 new tokens:

- infer's ONNX backend at ``--dtype`` (default ``native``: the GGUF's own Q4_1 blocks) with each
  KV cache precision of ``--kv`` (default fp32 and fp16);
- llama.cpp on the GGUF with its default fp16 KV cache and with q8_0 KV;
- onnxruntime-genai on its int4 export of the same weights (built by run.py's ``prepare``).

Figures are medians of 3 after a warm-up (benchmarks/onnx/common.py) and are reported as ratios
to llama.cpp's fp16-KV run of the same length: absolute figures on a shared machine move with
whatever else runs. With ``--clock cpu --threads 1`` each process is timed by its own CPU time.

    python benchmarks/onnx/long_context.py                       # all lengths, 2 threads
    python benchmarks/onnx/long_context.py --lengths 512,6000 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import json
import pydoc
import sys
import tempfile
from pathlib import Path
from typing import Any

from run import GGUF, child, prepare

HERE = Path(__file__).resolve().parent
#: Standard-library modules whose documentation makes the prompt (long, varied, always installed).
DOC_MODULES = ("collections", "itertools", "functools", "pathlib", "json", "re", "argparse", "typing", "asyncio")


def document_ids(tokenizer_path: Path, tokens: int) -> list[int]:
    """The first ``tokens`` ids of the standard library's documentation, rendered as plain text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    ids: list[int] = []
    for name in DOC_MODULES:
        ids += tok.encode(pydoc.render_doc(name, renderer=pydoc.plaintext), add_special_tokens=False).ids
        if len(ids) >= tokens:
            return ids[:tokens]
    raise RuntimeError(f"the documentation of {DOC_MODULES} has only {len(ids)} tokens, fewer than {tokens}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=GGUF)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "infer-bench-onnx")
    parser.add_argument("--anchor-python", default="/work/.venv-anchors/bin/python")
    parser.add_argument("--lengths", default="512,2048,6000,8000")
    parser.add_argument("--dtype", default="native", help="infer's weight precision")
    parser.add_argument("--kv", default="fp32,fp16", help="infer's KV cache precisions")
    parser.add_argument("--llama-kv", default="f16,q8_0", help="llama.cpp's KV cache types")
    parser.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = prepare(args.work, args.gguf, args.anchor_python, [] if args.no_genai else ["int4"], args.threads)
    results: list[dict[str, Any]] = []
    for length in (int(n) for n in args.lengths.split(",")):
        ids = document_ids(Path(base["bundle"]) / "tokenizer.json", length)
        # The long prompt is the generation prompt; the separate prefill measure gets a short one.
        job = base | {"prompt": ids, "long_prompt": ids[:16], "new_tokens": args.new_tokens}
        job_path = args.work / f"long-{length}.json"
        job_path.write_text(json.dumps(job))
        runs: dict[str, dict[str, Any]] = {}
        for kv in args.llama_kv.split(","):
            cmd = [args.anchor_python, "child_llamacpp.py", str(job_path), str(args.gguf), str(args.threads), kv]
            runs[f"llama.cpp kv {kv}"] = child(cmd, args.clock)
        if not args.no_genai:
            cmd = [args.anchor_python, "child_genai.py", str(job_path), str(args.work / "genai-int4")]
            runs["GenAI int4"] = child(cmd, args.clock)
        for kv in args.kv.split(","):
            cmd = [sys.executable, "child_infer.py", str(job_path), args.dtype, str(args.threads), kv]
            runs[f"infer {args.dtype} kv {kv}"] = child(cmd, args.clock)
        report(length, runs, args)
        results.append({"prompt_tokens": length, "runs": runs})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(length: int, runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    """One table per prompt length: speeds, and their ratios to llama.cpp's default (first) run."""
    anchor_name = next(iter(runs))
    anchor = runs[anchor_name]
    print(
        f"\n== {length} prompt tokens, {args.new_tokens} new, greedy, {args.threads} thread(s), {args.clock} clock; "
        f"ratios to {anchor_name}"
    )
    print(f"{'':28s}{'prefill tok/s':>15s}{'decode tok/s':>14s}{'prefill x':>11s}{'decode x':>10s}{'same tokens':>13s}")
    for name, r in runs.items():
        same = next(
            (i for i, (a, b) in enumerate(zip(r["tokens"], anchor["tokens"], strict=False)) if a != b),
            min(len(r["tokens"]), len(anchor["tokens"])),
        )
        print(
            f"{name:28s}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.1f}"
            f"{r['prefill_tok_s'] / anchor['prefill_tok_s']:>11.2f}{r['decode_tok_s'] / anchor['decode_tok_s']:>10.2f}"
            f"{same:>13d}"
        )


if __name__ == "__main__":
    main()
