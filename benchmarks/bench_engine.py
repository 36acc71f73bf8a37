"""Engine overhead per token on the fake backend at a real vocabulary size (49,152).

Figures, not tests. For greedy and for the full sampling chain (top-k 50, top-p 0.9,
temperature 0.7, repetition penalty 1.1) it reports the engine's own time per generated token:
wall time minus the time spent inside the backend (measured by a wrapper hookimpl), so the
fake's table lookup is not counted. Also reports the wall time of `infer backends`.

    python benchmarks/bench_engine.py [--tokens 2000] [--runs 5]

Targets (issue 2): greedy <= 25 us/token, full chain <= 100 us/token, `infer backends` <= 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import infer

CASES = {
    "greedy": {"temperature": 0.0},
    "full_chain": {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 1},
}


def engine_overhead(model: infer.Model, tokens: int, runs: int, sampling: dict[str, object]) -> dict[str, float]:
    # Backend time is taken around the fake's own forward (not with a wrapper hookimpl, which
    # would switch the engine off its direct-call path and add pluggy's cost to the figure).
    handle = model.handle
    forward = handle.forward
    spent = [0.0]

    def timed_forward(batch: object) -> object:
        started = time.perf_counter()
        try:
            return forward(batch)
        finally:
            spent[0] += time.perf_counter() - started

    handle.forward = timed_forward
    model.generate([1, 2, 3], max_tokens=200, ignore_eos=True, **sampling)  # warm-up
    per_token, cpu_per_token = [], []
    for _ in range(runs):
        spent[0] = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        model.generate([1, 2, 3], max_tokens=tokens, ignore_eos=True, **sampling)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        per_token.append((wall - spent[0]) / tokens * 1e6)
        cpu_per_token.append(cpu / tokens * 1e6)
    return {
        "engine_us_per_token": round(statistics.median(per_token), 2),
        "process_cpu_us_per_token": round(statistics.median(cpu_per_token), 2),
    }


def backends_wall(runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "infer.cli", "backends"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    model = infer.load("fake", backend="fake", vocab_size=49152, context_length=args.tokens + 16)
    try:
        for name, sampling in CASES.items():
            print(json.dumps({"case": name, **engine_overhead(model, args.tokens, args.runs, sampling)}))
    finally:
        model.close()
    print(json.dumps({"case": "infer_backends_wall_s", "median_s": backends_wall(args.runs)}))


if __name__ == "__main__":
    main()
