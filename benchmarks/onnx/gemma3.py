"""Gemma 3 270M on the ONNX backend: fp32 against int4 (and llama.cpp when the anchor has it), one run.

Each system runs in its own process (``child_infer.py``, ``child_llamacpp.py``), one after the
other, on the same prompt ids: "The capital of France is" after <bos> (6 tokens), 128 new tokens,
greedy; plus a 512-token prefill; median of 3 after a warm-up. Figures are reported as ratios to
the fp32 run of the same round (absolute numbers on a shared 2-core machine move with its load).

    python benchmarks/onnx/gemma3.py --gguf /path/to/gemma-3-270m-q4_k_m.gguf [--threads 1 --clock cpu]

llama.cpp runs on the GGUF itself (Q4_K_M) when ``--anchor-python`` can import llama_cpp
(built as shared/ANCHORS.md says); otherwise that row is left out and the report says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from run import child

PROMPT = "The capital of France is"
LONG_TEXT = "The history of painting reaches back to the artefacts of pre-historic humans and spans all cultures. "


def prepare(work: Path, gguf: Path) -> dict[str, Any]:
    """Import the GGUF and tokenise the prompts (the tokenizer adds <bos>)."""
    from tokenizers import Tokenizer

    from infer.gguf_import import import_gguf

    bundle = work / "gemma3"
    if not (bundle / "config.json").is_file():
        import_gguf(gguf, bundle)
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    long_ids = tok.encode(LONG_TEXT * 40).ids[:512]
    return {
        "bundle": str(bundle),
        "cache_dir": str(work / "infer-cache"),
        "prompt": tok.encode(PROMPT).ids,
        "long_prompt": long_ids,
        "new_tokens": 128,
    }


def has_llama_cpp(python: str) -> bool:
    """Whether the anchor interpreter can import llama_cpp."""
    try:
        done = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, check=False)
    except OSError:
        return False
    return done.returncode == 0


def main() -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "infer-bench-gemma3")
    parser.add_argument("--anchor-python", default="/work/.venv-anchors/bin/python")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    job_path = args.work / "job.json"
    job_path.write_text(json.dumps(prepare(args.work, args.gguf)))
    llama = has_llama_cpp(args.anchor_python)
    results = []
    for _ in range(args.rounds):
        runs = {
            d: child([sys.executable, "child_infer.py", str(job_path), d, str(args.threads)], args.clock)
            for d in ("fp32", "int4")
        }
        if llama:
            cmd = [args.anchor_python, "child_llamacpp.py", str(job_path), str(args.gguf), str(args.threads)]
            runs["llama.cpp q4_k_m"] = child(cmd, args.clock)
        results.append(runs)
        report(runs, args.threads, args.clock, llama)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(runs: dict[str, dict[str, Any]], threads: int, clock: str, llama: bool) -> None:
    """Absolute figures and ratios to fp32; how many greedy tokens agree with fp32."""
    base = runs["fp32"]
    print(f"\n== Gemma 3 270M, {threads} thread(s), {clock} clock, prompt {base['prompt_tokens']} tokens, 128 new")
    keys = ("decode_tok_s", "ttft_ms", "long_prefill_tok_s", "peak_rss_mb")
    print(f"{'':20s}" + "".join(f"{k:>22s}" for k in keys) + f"{'same tokens':>14s}")
    for name, r in runs.items():
        same = next(
            (i for i, (a, b) in enumerate(zip(r["tokens"], base["tokens"], strict=False)) if a != b), len(r["tokens"])
        )
        cells = "".join(f"{r[k]:>12.1f} ({r[k] / base[k]:4.2f}x)" for k in keys)
        print(f"{name:20s}{cells}{same:>14d}")
    if not llama:
        print("llama.cpp: not measured (the anchor environment has no llama_cpp)")


if __name__ == "__main__":
    main()
