"""Where the bytes of a loaded GGUF model go: resident memory of the ONNX backend's session, broken down.

    python benchmarks/onnx/load_memory.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--dtype native]

Each configuration loads the model (build cache already warm) in a fresh process and reports, from
``/proc/self/status``: resident memory after the imports, after the load, after one decode step,
and the peak (``VmHWM``), each split into anonymous pages (memory the process owns: copies,
prepacked weights, arenas) and file pages (mapped files the kernel can drop and re-read, which
another process mapping the same file shares); plus the median process CPU time of a decode step,
since a configuration that saves memory by slowing decode is no answer. The configurations are
ONNX Runtime session settings:

* ``default``: what the backend does;
* ``no-prepack``: ``session.disable_prepacking`` (the kernels read the initializers as stored);
* ``prepacked-file``: the session saves the optimized graph with its prepacked weights written to
  the external data file (``session.save_external_prepacked_constant_initializers``), and a
  second session loads that file, so the prepacked weights are mapped from disk;
* ``no-arena``: ``session.enable_cpu_mem_arena`` off (the arena keeps freed scratch buffers);
* ``parallel-prepack``: ``session.prepack.enable_parallel`` (prepacking spread over the intra-op
  threads: a faster load with two or more ``--threads``, perhaps a higher peak).

Memory figures do not depend on the machine's load; step times do (compare within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS = ("default", "no-prepack", "prepacked-file", "no-arena", "parallel-prepack")
#: Where resident memory is read: after ``import infer`` (and onnxruntime), before the session is
#: made (the bundle and its GGUF metadata open), after it, when ``infer.load`` returns (the core's
#: tokenizer and engine), after the decode steps.
STAGES = ("imported", "before_session", "after_session", "loaded", "stepped")


def _status() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


def _child(gguf: Path, dtype: str, config: str, threads: int, work: Path) -> dict[str, Any]:
    """Load and step the model under ``config``; return the memory figures (runs in the child)."""
    import onnxruntime as ort

    entries: dict[str, str] = {}
    marks: dict[str, dict[str, float]] = {}
    base_session = ort.InferenceSession
    if config == "no-prepack":
        entries["session.disable_prepacking"] = "1"
    elif config == "no-arena":
        entries["session.enable_cpu_mem_arena"] = "0"
    elif config == "parallel-prepack":
        entries["session.prepack.enable_parallel"] = "1"

    class Session(base_session):  # type: ignore[misc,valid-type]
        """The backend's session, with ``config``'s settings added to its options."""

        def __init__(self, path: str, sess_options: ort.SessionOptions, **kwargs: Any) -> None:
            if config == "prepacked-file":
                path = _prepacked_copy(base_session, path, sess_options, kwargs, work)
            for key, value in entries.items():
                sess_options.add_session_config_entry(key, value)
            if config == "no-arena":
                sess_options.enable_cpu_mem_arena = False
            marks["before_session"] = _status()
            super().__init__(path, sess_options=sess_options, **kwargs)
            marks["after_session"] = _status()

    ort.InferenceSession = Session
    import infer

    imported = _status()
    started = time.perf_counter()
    model = infer.load(gguf, backend="onnx", dtype=dtype, threads=threads)
    load_s = time.perf_counter() - started
    loaded = _status()
    ids = model.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    cache = model.new_sequence(len(ids) + 40)
    logits = model.run_prefill([cache], [ids])
    steps = []
    for _ in range(33):
        started = time.process_time()
        logits = model.run_decode([cache], [int(logits[0].argmax())])
        steps.append(time.process_time() - started)
    stepped = _status()
    return {
        "config": config,
        "imported": imported,
        **marks,
        "loaded": loaded,
        "stepped": stepped,
        "peak_mib": stepped["VmHWM"],
        "load_s": load_s,
        "decode_step_ms": statistics.median(steps[1:]) * 1e3,
    }


def _prepacked_copy(session: Any, path: str, options: Any, kwargs: dict[str, Any], work: Path) -> str:
    """Save ``path`` optimized, with its prepacked weights in the external data file; return the copy's path."""
    import onnxruntime as ort

    target = work / "prepacked" / "model.onnx"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        saving = ort.SessionOptions()
        saving.graph_optimization_level = options.graph_optimization_level
        saving.optimized_model_filepath = str(target)
        saving.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
        saving.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        saving.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        session(path, sess_options=saving, **kwargs)
    return str(target)


def main() -> None:
    """Command-line entry: the driver runs each configuration in a child process."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, type=Path)
    parser.add_argument("--dtype", default="native")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--home", type=Path, help="INFER_HOME (default: a temporary folder, built once)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="infer-load-memory-"))
    os.environ["INFER_HOME"] = str(home)
    if args.child:
        result = _child(args.gguf, args.dtype, args.child, args.threads, home)
        print("RESULT " + json.dumps(result), flush=True)
        return
    gguf_mib = args.gguf.stat().st_size / 2**20
    results = []
    for config in ["default", *[c for c in args.configs.split(",") if c != "default"]]:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--gguf",
                str(args.gguf),
                "--dtype",
                args.dtype,
                "--threads",
                str(args.threads),
                "--home",
                str(home),
                "--child",
                config,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results.append(json.loads(out.rsplit("RESULT ", 1)[1]))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{args.gguf.name} ({gguf_mib:.1f} MiB), dtype {args.dtype}; MiB, anonymous + file pages")
    header = "imports | bundle open | session made | load returned | decode | peak | peak / GGUF | load s | step ms"
    print(f"| config | {header} |")
    print("|---" * 10 + "|")
    base_step = results[0]["decode_step_ms"]
    for r in results:
        cells = [f"{r[k]['RssAnon']:.0f} + {r[k]['RssFile']:.0f}" for k in STAGES]
        print(
            f"| {r['config']} | {' | '.join(cells)} | {r['peak_mib']:.0f} | {r['peak_mib'] / gguf_mib:.2f}x"
            f" | {r['load_s']:.2f} | {r['decode_step_ms']:.2f} ({r['decode_step_ms'] / base_step:.2f}x) |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
