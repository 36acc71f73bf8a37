"""Replay the engine's n-gram drafter over real greedy outputs, without running the model again.

    python benchmarks/replay_drafting.py [MODEL] [--verify-cost 1.1,1.14,1.16,1.38] [--outputs FILE]

Speculation never changes greedy tokens, so a request's plain greedy output says, for every draft
the drafter would propose, how much of it verification would keep. This generates that output once
for each of ``bench_kv_reuse.py``'s grounded and open-ended prompts (fp32, cached in ``--outputs``),
then feeds it through :class:`infer.speculative.NgramDrafter` as the engine does and prices each
step: a decode step costs 1, verifying k drafted tokens what ``--verify-cost`` says (decode steps
for k = 1, 2, 4, 8, interpolated; ``bench_kv_reuse.py`` measures them). It prints the speedup per
task and the geomean, beside a ceiling: a drafter that always proposes the longest run of the
coming tokens found anywhere in the context (up to 16).

Use it to compare drafting policies in seconds; confirm a change with ``bench_kv_reuse.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from infer.speculative import MAX_DRAFT, NgramDrafter

GROUNDED_TASKS = ("rewrite", "summarize", "extract", "code_edit")


def greedy_outputs(model_ref: str, path: Path) -> dict[str, dict[str, list[int]]]:
    """Prompt ids and 128 greedy tokens per benchmark prompt, generated once and cached in ``path``."""
    if path.is_file():
        data: dict[str, dict[str, list[int]]] = json.loads(path.read_text())
        return data
    from bench_kv_reuse import GROUNDED, OPEN_ENDED

    import infer

    model = infer.load(model_ref, dtype="fp32")
    data = {}
    for name, text in {**GROUNDED, **OPEN_ENDED}.items():
        prepared = model.prepare(messages=[{"role": "user", "content": text}], max_tokens=128, temperature=0)
        data[name] = {"prompt": list(prepared.prompt_ids), "generated": list(model.generate(prepared).token_ids)}
    model.close()
    path.write_text(json.dumps(data))
    return data


def cost_model(points: list[float]) -> Callable[[int], float]:
    """Decode steps to verify k drafted tokens, from the costs at k = 1, 2, 4, 8 (linear between, and past 8)."""
    ks = [1, 2, 4, 8]
    slope = (points[3] - points[2]) / 4
    return lambda k: float(np.interp(k, ks, points)) if k <= 8 else points[3] + slope * (k - 8)


def replay(prompt: list[int], generated: list[int], verify: Callable[[int], float]) -> float:
    """Speedup of speculative over plain decoding of ``generated`` (the first token comes from prefill)."""
    drafter = NgramDrafter()
    context = [*prompt, generated[0]]
    i, steps = 1, 0.0
    while i < len(generated):
        draft = drafter.draft(np.asarray(context, np.int32), min(MAX_DRAFT, len(generated) - i)).tolist()
        if not draft:
            steps += 1
            context.append(generated[i])
            i += 1
            continue
        kept = 0
        while kept < len(draft) and draft[kept] == generated[i + kept]:
            kept += 1
        steps += verify(len(draft))
        drafter.update(len(draft), kept)
        emitted = min(kept + 1, len(generated) - i)  # the kept drafts and the token sampled after them
        context += generated[i : i + emitted]
        i += emitted
    return (len(generated) - 1) / steps


def ceiling(prompt: list[int], generated: list[int], verify: Callable[[int], float]) -> float:
    """Speedup of a drafter that always proposes the longest run of the coming tokens in the context."""
    context = [*prompt, generated[0]]
    i, steps = 1, 0.0
    while i < len(generated):
        found = 0
        array = np.asarray(context)
        for length in range(min(MAX_DRAFT, len(generated) - i), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(array, length)
            if (windows == np.asarray(generated[i : i + length])).all(axis=1).any():
                found = length
                break
        steps += verify(found) if found else 1
        emitted = min(found + 1, len(generated) - i)
        context += generated[i : i + emitted]
        i += emitted
    return (len(generated) - 1) / steps


def main() -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=os.environ.get("INFER_SMOLLM2_GGUF"))
    parser.add_argument("--verify-cost", default="1.1,1.14,1.16,1.38", help="decode steps at k = 1, 2, 4, 8")
    parser.add_argument("--outputs", type=Path, default=Path("replay_drafting_outputs.json"))
    args = parser.parse_args()
    verify = cost_model([float(x) for x in args.verify_cost.split(",")])
    data = greedy_outputs(args.model, args.outputs)
    for label, run in (("drafter", replay), ("ceiling", ceiling)):
        speedups = {name: run(d["prompt"], d["generated"], verify) for name, d in data.items()}
        grounded = [speedups[t] for t in GROUNDED_TASKS]
        geomean = math.exp(sum(map(math.log, grounded)) / len(grounded))
        print(f"{label}: grounded geomean {geomean:.2f}x; " + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items()))


if __name__ == "__main__":
    main()
