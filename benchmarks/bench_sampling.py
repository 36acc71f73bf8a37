"""Time the default sampler per token: one JSON line per case, median microseconds over many calls.

    python benchmarks/bench_sampling.py                 # every case, vocab 49,152 (SmolLM2)
    python benchmarks/bench_sampling.py --case greedy --iterations 20000 --rounds 5

Each case times whole ``infer.sampling.sample()`` calls on pre-made logits (several rows in
turn, so no single row stays hot), with the request's state built once: a prompt of 200
tokens stands in for the history the penalties walk. Reference cases time the numpy building
blocks (``argmax``, a full ``argpartition``, a full sort) on the same rows for scale, and
``state_append`` the per-token bookkeeping.

A case runs ``--rounds`` rounds of ``--iterations`` calls. ``median_us`` is the median of the
quietest round (on a shared machine other processes inflate whole rounds; the quietest is the
closest to the code's own cost) and ``median_all_us`` the median over every call.

Targets at vocab 49,152: greedy <= 10 us; the full chain (top-k 50, top-p 0.9, temperature 0.7,
repetition penalty 1.1 over 200 tokens) <= 60 us. This is a benchmark, not a test: machines
differ and a shared one is noisy, so it reports numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from infer.sampling import SamplerState, SamplingParams, sample

HISTORY = 200
ROWS = 8  # distinct logits rows cycled through


def lm_logits(rng: np.random.Generator, rows: int, vocab: int) -> npt.NDArray[np.float32]:
    """Logits shaped like a language model's: a broad bulk and a few strong candidates per row."""
    logits = rng.normal(0.0, 2.0, (rows, vocab))
    for row in logits:
        row[rng.choice(vocab, 20, replace=False)] += np.linspace(12.0, 4.0, 20)
    return logits.astype(np.float32)


def sampler_case(
    params: SamplingParams, batch: int, vocab: int, rng: np.random.Generator
) -> tuple[Callable[[int], object], int]:
    """A call sampling ``batch`` rows with ``params``; returns it and the batch size."""
    blocks = [lm_logits(rng, batch, vocab) for _ in range(ROWS)]
    states = [SamplerState(params, rng.integers(0, vocab, HISTORY), vocab) for _ in range(batch)]
    plist = [params] * batch
    return (lambda i: sample(blocks[i % ROWS], plist, states)), batch


def numpy_case(
    fn: Callable[[npt.NDArray[np.float32]], object], vocab: int, rng: np.random.Generator
) -> Callable[[int], object]:
    rows = lm_logits(rng, ROWS, vocab)
    return lambda i: fn(rows[i % ROWS])


def time_calls(call: Callable[[int], object], iterations: int, rounds: int) -> list[list[float]]:
    """Microseconds per call, by round, after a warm-up."""
    for i in range(min(200, iterations)):
        call(i)
    clock = time.perf_counter_ns
    by_round = []
    for _ in range(rounds):
        samples = []
        for i in range(iterations):
            start = clock()
            call(i)
            samples.append((clock() - start) / 1e3)
        by_round.append(samples)
    return by_round


def append_case(vocab: int, rng: np.random.Generator) -> Callable[[int], object]:
    state = SamplerState(
        SamplingParams(repetition_penalty=1.1, frequency_penalty=0.5), rng.integers(0, vocab, HISTORY), vocab
    )
    tokens = rng.integers(0, vocab, 4096).tolist()
    return lambda i: state.append(tokens[i % 4096])


FULL_CHAIN = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=0)

SAMPLER_CASES: dict[str, tuple[SamplingParams, int]] = {
    "greedy": (SamplingParams(temperature=0.0), 1),
    "greedy+repetition_penalty": (SamplingParams(temperature=0.0, repetition_penalty=1.1), 1),
    "full_chain": (FULL_CHAIN, 1),
    "full_chain_batch8": (FULL_CHAIN, 8),
    "top_k50": (SamplingParams(top_k=50, seed=0), 1),
    "top_p0.9": (SamplingParams(top_p=0.9, temperature=0.7, seed=0), 1),
    "min_p0.05": (SamplingParams(min_p=0.05, seed=0), 1),
    "temperature_only": (SamplingParams(temperature=0.8, seed=0), 1),
    "all_penalties+bias+top_k": (
        SamplingParams(
            top_k=40,
            temperature=0.8,
            repetition_penalty=1.1,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            logit_bias={1: 5.0, 2: -100.0},
            seed=0,
        ),
        1,
    ),
}

NUMPY_CASES: dict[str, Callable[[npt.NDArray[np.float32]], object]] = {
    "numpy_argmax": lambda row: row.argmax(),
    "numpy_argpartition_k50": lambda row: np.argpartition(row, row.size - 50),
    "numpy_full_sort": np.sort,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--case", action="append", help="run only these cases (repeatable)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    every = [*SAMPLER_CASES, *NUMPY_CASES, "state_append"]
    names = args.case or every
    for name in names:
        batch = 1
        if name in SAMPLER_CASES:
            params, batch = SAMPLER_CASES[name]
            call, batch = sampler_case(params, batch, args.vocab, rng)
        elif name in NUMPY_CASES:
            call = numpy_case(NUMPY_CASES[name], args.vocab, rng)
        elif name == "state_append":
            call = append_case(args.vocab, rng)
        else:
            parser.error(f"unknown case {name!r}; choose from {every}")
        iterations = args.iterations if "sort" not in name else max(50, args.iterations // 20)
        by_round = time_calls(call, iterations, args.rounds)
        quietest = min(by_round, key=statistics.median)
        every_call = [t for samples in by_round for t in samples]
        median = statistics.median(quietest)
        line = {
            "case": name,
            "vocab": args.vocab,
            "batch": batch,
            "calls": iterations * args.rounds,
            "median_us": round(median, 2),
            "per_token_us": round(median / batch, 2),
            "p10_us": round(statistics.quantiles(quietest, n=10)[0], 2),
            "p90_us": round(statistics.quantiles(quietest, n=10)[-1], 2),
            "median_all_us": round(statistics.median(every_call), 2),
        }
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
