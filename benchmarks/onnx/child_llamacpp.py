"""Benchmark child: llama.cpp (llama-cpp-python) on the Q4_1 GGUF itself (the second anchor).

Run with the anchor environment, where llama-cpp-python was built as shared/ANCHORS.md says:
``python child_llamacpp.py JOB.json MODEL.gguf THREADS [KV_TYPE]``. Same protocol as the other
children: the prompt ids of the job, greedy, timings by :mod:`common`. ``KV_TYPE``: ``f16`` (its
default) or ``q8_0`` (a quantized V cache needs flash attention, which is then switched on).
"""

from __future__ import annotations

import sys
import time

import llama_cpp
from common import clock, emit, measure, read_job
from llama_cpp import Llama


def main() -> None:
    job = read_job(sys.argv[1])
    threads = int(sys.argv[3])
    kv = sys.argv[4] if len(sys.argv) > 4 else "f16"
    kv_type = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[kv]
    started = time.perf_counter()
    n_ctx = max(len(job["long_prompt"]), len(job["prompt"]) + job["new_tokens"]) + 8
    llm = Llama(
        model_path=sys.argv[2],
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        logits_all=False,
        type_k=kv_type,
        type_v=kv_type,
        flash_attn=kv != "f16",
        verbose=False,
    )
    load_s = time.perf_counter() - started

    def generate(prompt: list[int], new: int) -> tuple[float, float, list[int]]:
        llm.reset()
        t0 = clock()
        llm.eval(prompt)
        tokens = [int(llm.sample(temp=0.0))]
        t1 = clock()
        while len(tokens) < new:
            llm.eval([tokens[-1]])
            tokens.append(int(llm.sample(temp=0.0)))
        return t1 - t0, clock() - t1, tokens

    def prefill(prompt: list[int]) -> float:
        llm.reset()
        t0 = clock()
        llm.eval(prompt)
        return clock() - t0

    result = measure(generate, prefill, job)
    result["load_s"] = load_s
    result["system"] = f"llama.cpp {llama_cpp.__version__} kv {kv}"
    emit(result)


if __name__ == "__main__":
    main()
