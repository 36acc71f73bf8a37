"""The resource contract: released caches give their memory back, returned logits stay the caller's,
and two models of one backend can be stepped from two threads at once."""

from __future__ import annotations

import gc
import threading

import numpy as np
import numpy.typing as npt
import pytest

import infer
from infer_conformance.plugin import SuiteConfig
from infer_conformance.tolerances import assert_consistent

pytestmark = [pytest.mark.conformance, pytest.mark.certifies("contract:resources")]

MiB = 1024 * 1024
#: Memory a round of full-context caches aims at (2 to 16 caches): a leak of 3 rounds shows above
#: the slack on a real model; the tiny fixture's caches are too small to fill it.
ROUND_BYTES = 64 * MiB
ROUNDS = 3
#: Growth allowed on top of one round's caches: allocator slack and lazily built kernels, not a leak.
SLACK = 16 * MiB
PROMPT = [5, 17, 42, 8, 99, 3, 61, 27, 14, 33, 71, 2]


def _full(model: infer.Model, count: int, ctx: int) -> int:
    """``count`` caches filled to ``ctx`` positions; their declared bytes."""
    ids = (np.arange(ctx) % (model.vocab_size - 64) + 1).tolist()
    seqs = [model.new_sequence(ctx) for _ in range(count)]
    model.run_prefill(seqs, [ids] * count)
    total = sum(seq.nbytes for seq in seqs)
    for seq in seqs:
        seq.release()
        assert seq.released and seq.nbytes == 0
    return total


def test_caches_at_full_context_released_repeatedly_give_their_memory_back(
    suite: SuiteConfig, model: infer.Model
) -> None:
    import psutil

    process = psutil.Process()
    ctx = suite.context(model)
    per_cache = max(_full(model, 1, ctx), 1)
    count = int(np.clip(ROUND_BYTES // per_cache, 2, 16))
    # Two warm-up rounds: kernels, arenas and allocator pools settle (ONNX Runtime's arena grows
    # once more on the second run of a new batch shape, then stays flat).
    round_bytes = max(_full(model, count, ctx) for _ in range(2))
    gc.collect()
    before = process.memory_info().rss
    for _ in range(ROUNDS):
        _full(model, count, ctx)
    gc.collect()
    grown = process.memory_info().rss - before
    assert grown <= round_bytes + SLACK, (
        f"RSS grew by {grown / MiB:.1f} MiB over {ROUNDS} rounds of {count} released full-context caches "
        f"({round_bytes / MiB:.1f} MiB a round): released caches keep their memory"
    )


def test_returned_logits_are_never_overwritten_by_later_steps(model: infer.Model) -> None:
    seqs = [model.new_sequence(len(PROMPT) + 4) for _ in range(2)]
    kept: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]] = []

    def keep(logits: npt.NDArray[np.float32]) -> None:
        kept.append((logits, logits.copy()))

    keep(model.run_prefill(seqs[:1], [PROMPT]))
    keep(model.run_decode(seqs[:1], [7]))
    keep(model.run_prefill(seqs[1:], [PROMPT[::-1]]))
    keep(model.run_decode(seqs, [8, 9]))
    keep(model.run_decode(seqs[:1], [10]))
    keep(model.run_decode(seqs, [11, 12]))
    for seq in seqs:
        seq.release()
    for step, (returned, copy) in enumerate(kept):
        assert np.array_equal(returned, copy), f"the logits returned by step {step} were overwritten by a later step"


def _script(model: infer.Model, prompt: list[int], steps: int = 40) -> npt.NDArray[np.float32]:
    seq = model.new_sequence(len(prompt) + steps)
    out = [model.run_prefill([seq], [prompt])[0].copy()]
    out += [model.run_decode([seq], [(7 * i + 3) % 50 + 1])[0].copy() for i in range(steps)]
    seq.release()
    return np.stack(out)


def test_two_models_of_the_backend_stepped_from_two_threads_equal_their_solo_runs(suite: SuiteConfig) -> None:
    with suite.load() as first, suite.load() as second:
        pairs = [(first, PROMPT), (second, PROMPT[::-1])]
        solo = [_script(m, p) for m, p in pairs]
        barrier = threading.Barrier(2)
        results: list[list[np.ndarray]] = [[], []]
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                for _ in range(3):
                    barrier.wait(timeout=30)
                    results[i].append(_script(*pairs[i]))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread below
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, f"a thread failed: {errors[0]!r}"
        for i in range(2):
            for attempt, together in enumerate(results[i]):
                assert_consistent(solo[i], together, pairs[i][0], f"model {i}, concurrent run {attempt}")
