"""Declared capabilities are promises: each is tested when declared and skipped, saying so, when not.

Every member of :class:`infer.Capability` has tests here (``conformance/tests`` checks that none
is forgotten when the contract grows one).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import infer
from infer.sampling import SamplerState, SamplingParams, sample
from infer_conformance.plugin import SuiteConfig, require
from infer_conformance.tolerances import assert_consistent

pytestmark = pytest.mark.conformance

PROMPT = [5, 17, 42, 8, 99, 3, 61, 27, 14, 33, 71, 2]
Cap = infer.Capability


def _bits(a: npt.ArrayLike) -> npt.NDArray[np.uint32]:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _workload(model: infer.Model) -> list[npt.NDArray[np.float32]]:
    """Chunked and batched prefill, then decode steps: every logits array returned, copied."""
    rows = [PROMPT, PROMPT[:5], PROMPT[::-1]]
    seqs = [model.new_sequence(len(PROMPT) + 8) for _ in rows]
    out = [model.run_prefill(seqs, [r[:3] for r in rows]).copy()]
    out.append(model.run_prefill(seqs, [r[3:] or [1] for r in rows]).copy())
    for step in range(6):
        out.append(model.run_decode(seqs, [7 + step, 11, 13 * step % 50]).copy())
    for seq in seqs:
        seq.release()
    return out


@pytest.mark.certifies("capability:deterministic")
def test_deterministic_backends_repeat_prefill_and_decode_bit_for_bit(model: infer.Model) -> None:
    require(model.info, Cap.DETERMINISTIC)
    first = _workload(model)
    seq = model.new_sequence(32)  # unrelated work in between must not leak into the next run
    model.run_prefill([seq], [[9, 8, 7, 6, 5]])
    seq.release()
    second = _workload(model)
    for step, (a, b) in enumerate(zip(first, second, strict=True)):
        differ = int(np.count_nonzero(_bits(a) != _bits(b)))
        assert differ == 0, f"step {step}: {differ} logits differ between two identical runs (declared DETERMINISTIC)"


@pytest.mark.certifies("capability:deterministic")
def test_deterministic_backends_give_bit_identical_logits_on_a_fresh_model(
    suite: SuiteConfig, model: infer.Model
) -> None:
    require(model.info, Cap.DETERMINISTIC)
    with suite.load() as other:
        for step, (a, b) in enumerate(zip(_workload(model), _workload(other), strict=True)):
            assert np.array_equal(_bits(a), _bits(b)), f"step {step}: two loads of the same model differ"


@pytest.mark.certifies("capability:batch")
def test_a_ragged_batch_gives_the_same_logits_as_each_row_alone(model: infer.Model) -> None:
    require(model.info, Cap.BATCH)
    rows = [PROMPT, PROMPT[:3], PROMPT[2:9], [11], PROMPT[::-1]]
    singles = []
    for row in rows:
        seq = model.new_sequence(len(row) + 2)
        prefill = model.run_prefill([seq], [row])
        decode = model.run_decode([seq], [9])
        singles.append((prefill[0].copy(), decode[0].copy()))
        seq.release()
    seqs = [model.new_sequence(len(row) + 2) for row in rows]
    prefill = model.run_prefill(seqs, rows).copy()
    decode = model.run_decode(seqs, [9] * len(rows))
    for i, (p, d) in enumerate(singles):
        assert_consistent(p, prefill[i], model, f"prefill row {i} ({len(rows[i])} tokens)")
        assert_consistent(d, decode[i], model, f"decode row {i}")
        assert seqs[i].length == len(rows[i]) + 1
    for seq in seqs:
        seq.release()


@pytest.mark.certifies("capability:batch")
def test_a_batched_prefill_continuing_earlier_chunks_equals_each_row_alone(model: infer.Model) -> None:
    # The core chunks long prompts, so rows of one prefill batch may already hold earlier chunks.
    require(model.info, Cap.BATCH)
    rows = [PROMPT, PROMPT[::-1], PROMPT[3:]]
    alone = []
    for row in rows:
        seq = model.new_sequence(len(row))
        alone.append(model.run_prefill([seq], [row])[0].copy())
        seq.release()
    seqs = [model.new_sequence(len(row)) for row in rows]
    model.run_prefill(seqs, [row[:4] for row in rows])
    together = model.run_prefill(seqs, [row[4:] for row in rows])
    for i, expected in enumerate(alone):
        assert_consistent(expected, together[i], model, f"row {i}: second chunk in a batch against one prefill alone")
    for seq in seqs:
        seq.release()


@pytest.mark.certifies("capability:batch")
def test_a_decode_batch_of_caches_at_different_lengths_equals_each_alone(model: infer.Model) -> None:
    require(model.info, Cap.BATCH)
    prompts = [PROMPT[: n + 1] for n in range(0, len(PROMPT), 3)]
    alone = []
    for prompt in prompts:
        seq = model.new_sequence(len(prompt) + 3)
        model.run_prefill([seq], [prompt])
        alone.append([model.run_decode([seq], [t])[0].copy() for t in (4, 5, 6)])
        seq.release()
    seqs = [model.new_sequence(len(p) + 3) for p in prompts]
    for seq, prompt in zip(seqs, prompts, strict=True):
        model.run_prefill([seq], [prompt])
    for step, token in enumerate((4, 5, 6)):
        together = model.run_decode(seqs, [token] * len(seqs))
        for i in range(len(seqs)):
            assert_consistent(
                alone[i][step], together[i], model, f"decode step {step}, row {i} at length {len(prompts[i]) + step}"
            )
    for seq in seqs:
        seq.release()


# -- device sampling ----------------------------------------------------------------------------

EXACT = {
    "greedy": SamplingParams(temperature=0),
    "top_k=1": SamplingParams(temperature=1.0, top_k=1),
    "top_p->0": SamplingParams(temperature=1.0, top_p=1e-9),
    "penalties": SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5),
    "logit_bias": SamplingParams(temperature=0, logit_bias={3: 100.0}),
}


def _device_sampler(suite: SuiteConfig) -> Callable[..., Any]:
    from infer.plugins import get_registry

    sampler: Callable[..., Any] = get_registry().backend(suite.backend).hooks.sample
    return sampler


def _states(
    params: Sequence[SamplingParams], history: Sequence[int], vocab: int, seeds: Sequence[int] | None = None
) -> list[SamplerState]:
    out = []
    for i, p in enumerate(params):
        state = SamplerState(p.replace(seed=seeds[i]) if seeds is not None else p, PROMPT, vocab)
        for token in history:
            state.append(token)
        out.append(state)
    return out


def _rows(model: infer.Model) -> npt.NDArray[np.float32]:
    seqs = [model.new_sequence(len(PROMPT)) for _ in range(3)]
    logits: npt.NDArray[np.float32] = model.run_prefill(seqs, [PROMPT, PROMPT[:4], PROMPT[6:]]).copy()
    for seq in seqs:
        seq.release()
    return logits


@pytest.mark.certifies("capability:device_sampling")
@pytest.mark.parametrize("case", sorted(EXACT))
def test_the_device_sampler_equals_the_reference_sampler_where_it_is_deterministic(
    suite: SuiteConfig, model: infer.Model, case: str
) -> None:
    require(model.info, Cap.DEVICE_SAMPLING)
    # Flattened rows, each repeated with its own seed: a sampler that draws where the reference
    # is deterministic (ignoring top_p -> 0, say) cannot match all of them by luck.
    logits = np.repeat(_rows(model) * np.float32(0.25), 8, axis=0)
    history = [int(np.argmax(logits[0])), 3, 3]  # makes the penalties bite on the favourite token
    params = [EXACT[case]] * len(logits)
    seeds = list(range(len(logits)))
    states = _states(params, history, model.vocab_size, seeds)
    got = _device_sampler(suite)(logits=logits.copy(), params=params, states=states)
    expected = sample(logits.copy(), params, _states(params, history, model.vocab_size, seeds))
    assert np.asarray(got).tolist() == expected.tolist(), f"{case}: the device sampler chose differently"


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at the normal quantile ``z`` (3.09: p = 0.001), Wilson-Hilferty."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


@pytest.mark.certifies("capability:device_sampling")
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_k=20),
        SamplingParams(temperature=1.0, top_p=0.7),
        SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.5),
    ],
    ids=["temperature+top_k", "top_p", "min_p+penalties"],
)
def test_the_device_sampler_draws_from_the_reference_distribution(
    suite: SuiteConfig, model: infer.Model, params: SamplingParams
) -> None:
    require(model.info, Cap.DEVICE_SAMPLING)
    row = _rows(model)[:1] * np.float32(0.25)  # flatter, so many tokens take part
    history = [int(np.argmax(row[0]))]
    draws = 3000
    device: Counter[int] = Counter()
    reference: Counter[int] = Counter()
    device_state = _states([params], history, model.vocab_size, seeds=[11])
    reference_state = _states([params], history, model.vocab_size, seeds=[12])
    sampler = _device_sampler(suite)
    for _ in range(draws):
        device[int(np.asarray(sampler(logits=row.copy(), params=[params], states=device_state))[0])] += 1
        reference[int(sample(row.copy(), [params], reference_state)[0])] += 1
    _assert_same_distribution(device, reference)


def _assert_same_distribution(device: Counter[int], reference: Counter[int]) -> None:
    """Two-sample chi-square over the tokens either side drew; rare ones are pooled so every cell
    expects at least 5 draws. The callers seed both sides, so the verdict is the same on every run."""
    tokens = sorted(set(device) | set(reference), key=lambda t: -(device[t] + reference[t]))
    cells, pooled = [], [0, 0]
    for t in tokens:
        if device[t] + reference[t] >= 10:
            cells.append((device[t], reference[t]))
        else:
            pooled = [pooled[0] + device[t], pooled[1] + reference[t]]
    if sum(pooled):
        cells.append((pooled[0], pooled[1]))
    stat = sum((a - b) ** 2 / (a + b) for a, b in cells)
    df = max(len(cells) - 1, 1)
    never = sorted(t for t in device if t not in reference and device[t] >= 10)
    assert not never, f"the device sampler drew tokens the reference never drew: {never[:10]}"
    assert stat <= _chi_square_critical(df), (
        f"the device sampler's draws differ from the reference sampler's: chi-square {stat:.1f} on {df} degrees "
        f"of freedom (critical {_chi_square_critical(df):.1f} at p=0.001)"
    )


# -- token masks (contract 1.2) -------------------------------------------------------------------


def _masked(model: infer.Model, rows: npt.NDArray[np.float32], banned_top: int) -> npt.NDArray[np.bool_]:
    """Each row's mask: a seeded random half of the vocabulary, minus the row's ``banned_top``
    likeliest tokens (so a sampler that ignores the mask picks banned tokens at once)."""
    rng = np.random.default_rng(5)
    masks = rng.random((len(rows), model.vocab_size)) < 0.5
    for mask, row in zip(masks, rows, strict=True):
        mask[np.argsort(row)[::-1][:banned_top]] = False
        mask[int(np.argsort(row)[::-1][banned_top])] = True  # the best allowed token exists
    return masks


def _with_masks(states: list[SamplerState], masks: npt.NDArray[np.bool_]) -> list[SamplerState]:
    for state, mask in zip(states, masks, strict=True):
        state.token_mask = mask
    return states


@pytest.mark.certifies("capability:token_mask")
@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=40), SamplingParams(temperature=1.3)],
    ids=["greedy", "temperature+top_k", "temperature"],
)
def test_the_device_sampler_never_draws_a_masked_token(
    suite: SuiteConfig, model: infer.Model, params: SamplingParams
) -> None:
    require(model.info, Cap.DEVICE_SAMPLING)
    require(model.info, Cap.TOKEN_MASK)
    logits = np.repeat(_rows(model) * np.float32(0.25), 4, axis=0)
    masks = _masked(model, logits, banned_top=5)
    rows = len(logits)
    seeds = list(range(rows))
    states = _with_masks(_states([params] * rows, [], model.vocab_size, seeds), masks)
    sampler = _device_sampler(suite)
    for draw in range(1 if params.greedy else 50):
        got = np.asarray(sampler(logits=logits.copy(), params=[params] * rows, states=states)).tolist()
        banned = [(i, t) for i, t in enumerate(got) if not masks[i][t]]
        assert not banned, f"draw {draw}: the device sampler chose masked tokens (row, token): {banned[:5]}"
    if params.greedy:
        expected = [int(np.argmax(np.where(m, row, -np.inf))) for m, row in zip(masks, logits, strict=True)]
        assert got == expected, "at temperature 0 the device sampler must choose the likeliest allowed token"


@pytest.mark.certifies("capability:token_mask")
def test_the_device_sampler_keeps_the_distribution_of_the_allowed_tokens(
    suite: SuiteConfig, model: infer.Model
) -> None:
    require(model.info, Cap.DEVICE_SAMPLING)
    require(model.info, Cap.TOKEN_MASK)
    # Masking renormalises over the allowed tokens: it must not flatten or sharpen them.
    params = SamplingParams(temperature=1.0)
    row = _rows(model)[:1] * np.float32(0.25)
    mask = _masked(model, row, banned_top=3)
    device_state = _with_masks(_states([params], [], model.vocab_size, seeds=[21]), mask)
    reference_state = _with_masks(_states([params], [], model.vocab_size, seeds=[22]), mask)
    sampler = _device_sampler(suite)
    device: Counter[int] = Counter()
    reference: Counter[int] = Counter()
    for _ in range(3000):
        device[int(np.asarray(sampler(logits=row.copy(), params=[params], states=device_state))[0])] += 1
        reference[int(sample(row.copy(), [params], reference_state)[0])] += 1
    assert all(mask[0][t] for t in device), "the device sampler drew masked tokens"
    _assert_same_distribution(device, reference)


# -- fault injection and synthetic logits -------------------------------------------------------


@pytest.mark.certifies("capability:fault_injection")
def test_injected_faults_surface_as_typed_errors_and_the_model_recovers(suite: SuiteConfig) -> None:
    info = suite.info()
    require(info, Cap.FAULT_INJECTION)
    with suite.load(raise_at_step=2) as model:
        with pytest.raises(infer.BackendError):
            model.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
        assert model.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True).usage.completion_tokens == 4


@pytest.mark.certifies("capability:fault_injection")
def test_injected_latency_slows_every_step(suite: SuiteConfig) -> None:
    import time

    require(suite.info(), Cap.FAULT_INJECTION)
    with suite.load(latency=0.02) as model:
        started = time.monotonic()
        model.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
        assert time.monotonic() - started >= 5 * 0.02


@pytest.mark.certifies("capability:synthetic")
def test_a_synthetic_backend_is_never_chosen_by_default(suite: SuiteConfig) -> None:
    info = suite.info()
    require(info, Cap.SYNTHETIC)
    from infer.plugins import get_registry

    real = [b for b in get_registry().ranked() if Cap.SYNTHETIC not in b.info.capabilities]
    assert info.priority < 0, f"synthetic backend {info.name!r} has priority {info.priority}: it could be the default"
    assert all(b.info.priority > info.priority for b in real)
