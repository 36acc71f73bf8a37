"""Where a decode step of the ONNX backend spends its time, per operator type, at a given context length.

    python benchmarks/onnx/profile_step.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --context 32,6000 --threads 1

For each context length the model (``--dtype``, ``--kv``) prefills that many tokens of the pydoc
text and then runs ``--steps`` greedy decode steps with ONNX Runtime's profiler on; the report
takes each node's fastest run over the decode steps (the profiler's node events inside the last
``--steps`` runs: a preempted run only takes longer, so the minimum holds on a loaded machine),
sums them per operator type and gives each type's time per step and share of the step, beside
the step's median process CPU time (profiler on) and the fastest profiled run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def profile(gguf: Path, dtype: str, kv: str | None, *, threads: int, context: int, steps: int) -> dict[str, Any]:
    """Prefill ``context`` tokens, then time and profile ``steps`` decode steps."""
    import onnxruntime as ort

    import infer
    from infer.evaluate import eval_chunks

    base = ort.InferenceSession
    prefix = str(Path(tempfile.mkdtemp(prefix="infer-profile-")) / "ort")

    class Session(base):  # type: ignore[misc,valid-type]
        """The backend's session with the profiler on."""

        def __init__(self, path: str, sess_options: ort.SessionOptions, **kwargs: Any) -> None:
            sess_options.enable_profiling = True
            sess_options.profile_file_prefix = prefix
            super().__init__(path, sess_options=sess_options, **kwargs)

    ort.InferenceSession = Session
    try:
        options: dict[str, Any] = {"kv_dtype": kv} if kv else {}
        model = infer.load(gguf, backend="onnx", dtype=dtype, threads=threads, **options)
    finally:
        ort.InferenceSession = base
    ids = [t for chunk in eval_chunks(model, -(-context // 512)) for t in chunk][:context]
    cache = model.new_sequence(context + 2 * steps + 2)
    logits = model.run_prefill([cache], [ids])
    cpu = []
    for _ in range(steps):
        started = time.process_time()
        logits = model.run_decode([cache], [int(logits[0].argmax())])
        cpu.append(time.process_time() - started)
    trace = json.loads(Path(model.handle.session.end_profiling()).read_text())
    model.close()
    runs = [e for e in trace if e.get("name") == "model_run"][-steps:]
    start, end = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    # Each node's fastest run of the steps: a run the scheduler preempted only ever takes longer,
    # so the minimum is the op's own cost even on a loaded machine.
    fastest: dict[str, float] = {}
    op_of: dict[str, str] = {}
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and start <= event["ts"] <= end:
            node = event["name"]
            fastest[node] = min(fastest.get(node, float("inf")), event["dur"])
            op_of[node] = event["args"]["op_name"]
    per_op: collections.Counter[str] = collections.Counter()
    for node, us in fastest.items():
        per_op[op_of[node]] += us
    return {
        "context": context,
        "step_cpu_ms": statistics.median(cpu) * 1e3,
        "profiled_run_ms": min(r["dur"] for r in runs) / 1e3,
        "ops_ms": {op: us / 1e3 for op, us in per_op.most_common()},
    }


def main() -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, type=Path)
    parser.add_argument("--dtype", default="native")
    parser.add_argument("--kv", help="kv_dtype (default: the backend's)")
    parser.add_argument("--context", default="32,6000", help="context lengths, comma-separated")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--home", type=Path, help="INFER_HOME (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ["INFER_HOME"] = str(args.home or Path(tempfile.mkdtemp(prefix="infer-profile-home-")))
    results = []
    for context in (int(c) for c in args.context.split(",")):
        r = profile(args.gguf, args.dtype, args.kv, threads=args.threads, context=context, steps=args.steps)
        results.append(r)
        print(
            f"\n{args.gguf.name} {args.dtype}, kv {args.kv or 'default'}, {args.threads} threads, context {context}:"
            f" step {r['step_cpu_ms']:.2f} ms CPU, fastest run {r['profiled_run_ms']:.2f} ms"
        )
        total = sum(r["ops_ms"].values())
        for op, ms in r["ops_ms"].items():
            print(f"  {op:36s} {ms:8.3f} ms  {ms / total:6.1%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
