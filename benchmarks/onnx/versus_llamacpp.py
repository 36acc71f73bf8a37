"""A GGUF model on the ONNX backend (native, int4, fp32) against llama.cpp on the same file, one run.

    python benchmarks/onnx/versus_llamacpp.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--rounds 3] [--threads 2]
    python benchmarks/onnx/versus_llamacpp.py --gguf gemma-3-270m-q4_k_m.gguf --work /tmp/bench-gemma3

Each round runs every system once, one process each, in a fixed alternation (infer at each
precision, then llama.cpp), all with the same prompt ids (``run.py``'s job: a 21-token chat
prompt, 128 greedy tokens, a 512-token prefill). The report gives the median over rounds of each
figure and its ratio to llama.cpp's median: on a shared machine only the ratios of one run mean
anything. llama.cpp runs from the anchor environment (shared/ANCHORS.md, ``--anchor-python``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from run import child, prepare

KEYS = ("decode_tok_s", "ttft_ms", "long_prefill_tok_s", "peak_rss_mb")


def main() -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "infer-bench-llamacpp")
    parser.add_argument("--anchor-python", default="/work/.venv-anchors/bin/python")
    parser.add_argument("--dtypes", default="native,int4,fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the medians here")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time (with --threads 1 it counts only the work done, fair on a busy machine)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    job = prepare(args.work, args.gguf, args.anchor_python, [], args.threads)  # no GenAI exports needed
    job_path = args.work / "job.json"
    job_path.write_text(json.dumps(job))
    systems = {
        f"infer {d}": [sys.executable, "child_infer.py", str(job_path), d, str(args.threads)]
        for d in args.dtypes.split(",")
    }
    systems["llama.cpp"] = [args.anchor_python, "child_llamacpp.py", str(job_path), str(args.gguf), str(args.threads)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    for _ in range(args.rounds):
        for name, cmd in systems.items():
            runs[name].append(child(cmd, args.clock))
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in KEYS} for name, rs in runs.items()}
    anchor = medians["llama.cpp"]
    tokens = {name: rs[0]["tokens"] for name, rs in runs.items()}
    setup = f"{args.threads} threads, {args.clock} clock, {args.rounds} rounds"
    print(f"{args.gguf.name}, {setup}, medians (ratio to llama.cpp)")
    print(f"{'':16s}" + "".join(f"{k:>24s}" for k in KEYS) + f"{'same tokens':>14s}")
    for name, m in medians.items():
        same = next(
            (i for i, (a, b) in enumerate(zip(tokens[name], tokens["llama.cpp"], strict=False)) if a != b),
            len(tokens[name]),
        )
        cells = "".join(f"{m[k]:>14.1f} ({m[k] / anchor[k]:5.2f}x)" for k in KEYS)
        print(f"{name:16s}{cells}{same:>14d}")
    if args.json:
        args.json.write_text(json.dumps({"medians": medians, "rounds": runs}, indent=1))


if __name__ == "__main__":
    main()
