"""Benchmark child: llama.cpp's perplexity on token ids the driver hands it (``perplexity_llamacpp.py``).

Run with the anchor environment (llama-cpp-python, shared/ANCHORS.md):
``python child_llamacpp_ppl.py JOB.json MODEL.gguf THREADS``. The job holds ``chunks``: lists of
token ids of one length. Each chunk is a fresh context evaluated in one batch with the logits of
every position kept (``logits_all``); position ``i`` scores token ``i + 1``, as ``infer eval``
does, so both systems score the same predictions. Emits the perplexity, the negative
log-likelihood per chunk and the top-ranked token at each scored position.
"""

from __future__ import annotations

import sys
import time

import llama_cpp
import numpy as np
from common import emit, read_job
from llama_cpp import Llama


def main() -> None:
    job = read_job(sys.argv[1])
    chunks: list[list[int]] = job["chunks"]
    width = len(chunks[0])
    llm = Llama(
        model_path=sys.argv[2],
        n_ctx=width,
        n_batch=width,
        n_ubatch=width,
        n_threads=int(sys.argv[3]),
        n_threads_batch=int(sys.argv[3]),
        logits_all=True,
        verbose=False,
    )
    started = time.perf_counter()
    nll_per_chunk, best = [], []
    for ids in chunks:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: width - 1], dtype=np.float64)
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
        picked = logits[np.arange(width - 1), ids[1:]] - log_z
        nll_per_chunk.append(float(-picked.sum()))
        best.append(logits.argmax(axis=-1).tolist())
    scored = len(chunks) * (width - 1)
    emit(
        {
            "system": f"llama.cpp {llama_cpp.__version__}",
            "perplexity": float(np.exp(sum(nll_per_chunk) / scored)),
            "scored_tokens": scored,
            "nll_per_chunk": nll_per_chunk,
            "best": best,
            "seconds": time.perf_counter() - started,
        }
    )


if __name__ == "__main__":
    main()
