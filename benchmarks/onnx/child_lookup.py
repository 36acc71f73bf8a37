"""Benchmark child: the KV-reuse benchmark's tasks on an anchor, greedy, with and without lookup decoding.

Run by benchmarks/bench_kv_reuse.py with the anchor environment (see shared/ANCHORS.md):

    python child_lookup.py JOB.json llamacpp MODEL.gguf THREADS
    python child_lookup.py JOB.json genai EXPORT_DIR

The job holds ``tasks`` (name -> prompt ids, the chat template already applied by infer),
``new_tokens`` and ``repeats``. llama.cpp runs each task plainly and with its prompt-lookup
drafter (``LlamaPromptLookupDecoding``, the n-gram drafting llama.cpp's ``lookup`` example does),
interleaved; onnxruntime-genai has no lookup decoding on CPU, so it runs plainly. Each task
reports decode tok/s (median over the repeats, the first token excluded) and the tokens.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from common import clock, emit, read_job

Generate = Callable[[list[int], int], tuple[float, list[int]]]


def _llamacpp(model_path: str, threads: int, n_ctx: int) -> dict[str, Generate]:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    def make(draft: Any) -> Generate:
        llm = Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            draft_model=draft,
            verbose=False,
        )

        def generate(prompt: list[int], new: int) -> tuple[float, list[int]]:
            llm.reset()
            tokens: list[int] = []
            t1 = 0.0
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                tokens.append(int(token))
                if len(tokens) == 1:
                    t1 = clock()
                if len(tokens) == new or token == llm.token_eos():
                    break
            return clock() - t1, tokens

        return generate

    # max_ngram_size 2 and 10 drafted tokens: llama-cpp-python's documented defaults
    return {"off": make(None), "lookup": make(LlamaPromptLookupDecoding(num_pred_tokens=10))}


def _genai(export: str) -> dict[str, Generate]:
    import onnxruntime_genai as og

    model = og.Model(export)

    def generate(prompt: list[int], new: int) -> tuple[float, list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        t1 = clock()
        while not generator.is_done() and len(tokens) < new:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return clock() - t1, tokens

    return {"off": generate}


def main() -> None:
    job = read_job(sys.argv[1])
    kind = sys.argv[2]
    started = time.perf_counter()
    longest = max(len(p) for p in job["tasks"].values()) + job["new_tokens"] + 16
    modes = _llamacpp(sys.argv[3], int(sys.argv[4]), longest) if kind == "llamacpp" else _genai(sys.argv[3])
    load_s = time.perf_counter() - started
    tasks: dict[str, Any] = {}
    for name, prompt in job["tasks"].items():
        speeds: dict[str, list[float]] = {mode: [] for mode in modes}
        tokens: dict[str, list[int]] = {}
        for generate in modes.values():
            generate(prompt, 8)  # warm-up
        for _ in range(job["repeats"]):
            for mode, generate in modes.items():  # interleaved: load drifts hit every mode alike
                seconds, tokens[mode] = generate(prompt, job["new_tokens"])
                speeds[mode].append((len(tokens[mode]) - 1) / max(seconds, 1e-9))
        row: dict[str, Any] = {f"{mode}_tok_s": statistics.median(v) for mode, v in speeds.items()}
        row["tokens"] = tokens["off"]
        if "lookup" in modes:
            row["lookup_speedup"] = row["lookup_tok_s"] / row["off_tok_s"]
            row["lookup_identical"] = tokens["lookup"] == tokens["off"]
        tasks[name] = row
    emit({"system": kind, "load_s": load_s, "tasks": tasks})


if __name__ == "__main__":
    main()
