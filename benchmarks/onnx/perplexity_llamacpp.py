"""``infer eval``'s perplexity of a GGUF model on the ONNX backend beside llama.cpp's on the same file and tokens.

    python benchmarks/onnx/perplexity_llamacpp.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --chunks 4
    python benchmarks/onnx/perplexity_llamacpp.py --gguf gemma-3-270m-q4_k_m.gguf --dtypes native,fp32

The chunks are ``infer eval``'s (:func:`infer.evaluate.eval_chunks`: the pydoc topic texts cut
into 512-token pieces by the model's own tokenizer); llama.cpp (llama-cpp-python from the anchor
environment, ``--anchor-python``) is handed those token ids, so both systems score exactly the
same predictions and only the arithmetic differs. Issue 19's goal: native within 0.5% of
llama.cpp on the same file. Perplexity is deterministic, so one run of each is enough and the
machine's load does not matter; the top-1 column is the share of scored positions where a
precision ranks first the token llama.cpp ranks first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def llamacpp(anchor_python: str, gguf: Path, chunks: list[list[int]], threads: int, work: Path) -> dict[str, Any]:
    """Run :mod:`child_llamacpp_ppl` on ``chunks`` and return its result."""
    job = work / "ppl-job.json"
    job.write_text(json.dumps({"chunks": chunks}))
    out = subprocess.run(
        [anchor_python, str(HERE / "child_llamacpp_ppl.py"), str(job), str(gguf), str(threads)],
        check=True,
        capture_output=True,
        text=True,
        cwd=HERE,
    ).stdout
    result: dict[str, Any] = json.loads(out.rsplit("RESULT ", 1)[1])
    return result


def main() -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, type=Path)
    parser.add_argument("--dtypes", default="native,int4,fp32")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--anchor-python", default="/work/.venv-anchors/bin/python")
    parser.add_argument("--home", type=Path, help="INFER_HOME for the run (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="infer-ppl-"))
    os.environ["INFER_HOME"] = str(home)

    import infer
    from infer.evaluate import eval_chunks, perplexity, scoring

    results: dict[str, dict[str, Any]] = {}
    chunks: list[list[int]] | None = None
    best: dict[str, np.ndarray] = {}
    for dtype in args.dtypes.split(","):
        model = infer.load(args.gguf, backend="onnx", dtype=dtype, threads=args.threads)
        try:
            chunks = chunks or eval_chunks(model, args.chunks)
            ppl, scored, best[dtype] = perplexity(model, chunks)
            how = scoring(model)
        finally:
            model.close()
        results[f"infer {dtype}"] = {"perplexity": ppl, "scored_tokens": scored, "scoring": how}
        print(json.dumps({dtype: results[f"infer {dtype}"]}), flush=True)
    assert chunks is not None
    anchor = llamacpp(args.anchor_python, args.gguf, chunks, args.threads, home)
    anchor_best = np.asarray(anchor.pop("best"))
    results["llama.cpp"] = anchor
    print(f"\n{args.gguf.name}: {len(chunks)} chunks of {len(chunks[0])} tokens, {anchor['scored_tokens']} scored")
    print("| system | perplexity | vs llama.cpp | top-1 same as llama.cpp |")
    print("|---|---|---|---|")
    for name, r in results.items():
        dtype = name.removeprefix("infer ")
        same = f"{(best[dtype] == anchor_best).mean():.3f}" if dtype in best else "-"
        delta = f"{(r['perplexity'] / anchor['perplexity'] - 1) * 100:+.2f}%" if name != "llama.cpp" else "-"
        print(f"| {name} | {r['perplexity']:.4f} | {delta} | {same} |")
        r["top1_same_as_llamacpp"] = None if same == "-" else float(same)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
