"""Benchmark child: onnxruntime-genai on its own export of the same weights (the anchor).

Run by run.py with the anchor environment (see shared/ANCHORS.md):
``python child_genai.py JOB.json EXPORT_DIR``. The export's genai_config.json is expected to
carry ``intra_op_num_threads`` already (run.py sets it).
"""

from __future__ import annotations

import sys
import time

import onnxruntime_genai as og
from common import clock, emit, measure, read_job


def main() -> None:
    job = read_job(sys.argv[1])
    started = time.perf_counter()
    model = og.Model(sys.argv[2])
    load_s = time.perf_counter() - started

    def generate(prompt: list[int], new: int) -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new)
        generator = og.Generator(model, params)
        t0 = clock()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        t1 = clock()
        while len(tokens) < new and not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        t2 = clock()
        return t1 - t0, t2 - t1, tokens

    def prefill(prompt: list[int]) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + 1)
        generator = og.Generator(model, params)
        t0 = clock()
        generator.append_tokens(prompt)
        return clock() - t0

    emit(
        {
            "system": f"onnxruntime-genai {og.__version__} {sys.argv[2]}",
            "load_s": load_s,
            **measure(generate, prefill, job),
        }
    )


if __name__ == "__main__":
    main()
