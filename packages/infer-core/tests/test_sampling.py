"""The default sampler: parameter validation, the processing chain, determinism, and its fast paths."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pluggy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infer import hookimpl, hookspecs
from infer.errors import BackendError, InvalidParameterError, InvalidTokenError, RequestError
from infer.sampling import (
    BAN_BIAS,
    DefaultSampler,
    SamplerState,
    SamplingParams,
    logprobs,
    sample,
)
from infer.sampling._fast import _top_k

pytestmark = pytest.mark.unit

VOCAB = 49_152  # SmolLM2's vocabulary: the size the fast paths are built for
SEEDS = st.integers(0, 2**32 - 1)


def lm_row(rng: np.random.Generator, vocab: int = VOCAB) -> npt.NDArray[np.float32]:
    """Logits shaped like a language model's: a broad bulk and a few strong candidates."""
    row = rng.normal(0.0, 2.0, vocab)
    row[rng.choice(vocab, 20, replace=False)] += np.linspace(12.0, 4.0, 20)
    return row.astype(np.float32)


def state_for(params: SamplingParams, vocab: int = VOCAB, prompt: Sequence[int] = ()) -> SamplerState:
    return SamplerState(params, np.asarray(prompt, dtype=np.int64), vocab)


def draw(row: npt.NDArray[np.floating[Any]], params: SamplingParams, state: SamplerState) -> int:
    return int(sample(row[None, :], [params], [state])[0])


def softmax64(row: npt.ArrayLike, temperature: float = 1.0) -> npt.NDArray[np.float64]:
    scaled = np.asarray(row, dtype=np.float64) / temperature
    scaled -= scaled.max()
    e = np.exp(scaled)
    return e / e.sum()


def reference_nucleus(row: npt.ArrayLike, top_p: float, temperature: float) -> set[int]:
    """Slow top-p by a full sort: the fewest most likely tokens whose probability reaches top_p."""
    values = np.asarray(row, dtype=np.float64)
    probs = softmax64(values, temperature)
    order = np.lexsort((np.arange(values.size), -values))  # most likely first, ties by lower id
    cumulative = np.cumsum(probs[order])
    count = int(np.searchsorted(cumulative, top_p, side="left")) + 1
    return set(order[:count].tolist())


def reference_top_k(row: npt.NDArray[np.floating[Any]], k: int) -> npt.NDArray[np.intp]:
    """Slow top-k by a full sort: the k largest, ties at the k-th taken by lower id, as ascending ids."""
    order = np.lexsort((np.arange(row.size), -row.astype(np.float64)))
    return np.sort(order[:k])


def chi_square(counts: npt.NDArray[np.int64], expected_probs: npt.NDArray[np.float64]) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# Critical chi-square values at p = 0.001: the seeded draws are deterministic, so a pass is stable,
# while a wrong distribution (a missing temperature, an off-by-one cut) lands far above them.
CHI2_999 = {2: 13.82, 4: 18.47, 7: 24.32}  # by degrees of freedom


# --------------------------------------------------------------------------- parameters

INVALID = [
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 2.0),
    ("max_tokens", True),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "0.7"),
    ("temperature", True),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", True),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.2),
    ("top_p", math.nan),
    ("min_p", 1.5),
    ("min_p", -0.01),
    ("min_p", math.nan),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.1),
    ("repetition_penalty", math.inf),
    ("repetition_penalty", 1e-300),
    ("repetition_penalty", 0.009),
    ("repetition_penalty", 1e300),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", math.nan),
    ("logit_bias", {-1: 5.0}),
    ("logit_bias", {3: 100.5}),
    ("logit_bias", {3: -101.0}),
    ("logit_bias", {3: math.nan}),
    ("logit_bias", {True: 1.0}),
    ("logit_bias", {"3": 1.0}),
    ("logit_bias", {2.0: 1.0}),
    ("logit_bias", [(3, 1.0)]),
    ("seed", -1),
    ("seed", 1.5),
    ("seed", True),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", [b"bytes"]),
    ("stop", 7),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [False]),
    ("stop_token_ids", "12"),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("logprobs", 0),
    ("top_logprobs", 21),
    ("top_logprobs", -1),
    ("top_logprobs", True),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_each_invalid_parameter_raises_an_error_naming_it(name: str, value: object) -> None:
    extra = {"logprobs": True} if name == "top_logprobs" else {}
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams(**{name: value}, **extra)
    assert caught.value.parameter == name
    assert name in str(caught.value)
    assert isinstance(caught.value, RequestError)
    assert isinstance(caught.value, ValueError)


def test_replace_validates_the_changed_parameter() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams().replace(top_p=0.0)
    assert caught.value.parameter == "top_p"


def test_top_logprobs_without_logprobs_is_refused() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams(top_logprobs=5)
    assert caught.value.parameter == "top_logprobs"
    assert SamplingParams(logprobs=True, top_logprobs=5).top_logprobs == 5


@pytest.mark.parametrize(
    ("name", "changes"),
    [("logit_bias", {"logit_bias": {100: 1.0}}), ("stop_token_ids", {"stop_token_ids": (5, 100)})],
)
def test_validate_with_a_vocabulary_refuses_token_ids_outside_it(name: str, changes: dict[str, Any]) -> None:
    params = SamplingParams(**changes)
    params.validate()
    params.validate(vocab_size=101)
    with pytest.raises(InvalidParameterError) as caught:
        params.validate(vocab_size=100)
    assert caught.value.parameter == name


def test_validate_checks_the_token_ids_once_per_vocabulary_and_keeps_the_value_as_it_was(validations) -> None:
    params = SamplingParams(logit_bias={5: 1.0}, stop_token_ids=(2,), seed=1)
    for _ in range(3):
        params.validate(vocab_size=10)
    assert validations["token ids"] == 1
    with pytest.raises(InvalidParameterError):
        params.validate(vocab_size=5)  # another vocabulary is checked again
    params.validate(vocab_size=10)  # a failed check leaves the passed one remembered
    assert validations["token ids"] == 2
    twin = SamplingParams(logit_bias={5: 1.0}, stop_token_ids=(2,), seed=1)
    assert params == twin and hash(params) == hash(twin) and repr(params) == repr(twin)
    assert pickle.loads(pickle.dumps(params)) == params and params.replace(seed=2).seed == 2


@pytest.mark.parametrize("vocab_size", [0, -3, 2.0, True])
def test_validate_refuses_a_bad_vocabulary_size(vocab_size: object) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams().validate(vocab_size=vocab_size)  # type: ignore[arg-type]
    assert caught.value.parameter == "vocab_size"


def test_parameters_are_normalised_to_plain_python_values() -> None:
    params = SamplingParams(
        stop="###",
        stop_token_ids=[np.int64(7), 9],
        temperature=np.float32(0.5),
        top_k=np.int32(40),
        logit_bias={np.int64(3): np.float64(-2.0)},
    )
    assert params.stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert params.stop_token_ids == (7, 9)
    assert type(params.temperature) is float
    assert type(params.top_k) is int
    assert dict(params.logit_bias) == {3: -2.0}
    assert all(type(k) is int and type(v) is float for k, v in params.logit_bias.items())


def test_parameters_are_immutable_hashable_and_compared_by_value() -> None:
    params = SamplingParams(logit_bias={1: 2.0}, stop=["x"])
    with pytest.raises(AttributeError):
        params.temperature = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        params.logit_bias[1] = 3.0  # type: ignore[index]
    assert params == SamplingParams(logit_bias={1: 2.0}, stop=("x",))
    assert params != SamplingParams(logit_bias={1: 3.0}, stop=("x",))
    assert hash(params) == hash(SamplingParams(logit_bias={1: 2.0}, stop=("x",)))


def test_parameters_survive_pickle_and_deepcopy() -> None:
    params = SamplingParams(logit_bias={1: 2.0, 7: -100.0}, stop=["x"], seed=3, temperature=0.4)
    assert pickle.loads(pickle.dumps(params)) == params
    assert copy.deepcopy(params) == params
    assert copy.copy(params) == params


def test_bias_given_as_a_mutable_dict_cannot_change_later() -> None:
    bias = {1: 2.0}
    params = SamplingParams(logit_bias=bias)
    bias[1] = -50.0
    assert params.logit_bias[1] == 2.0


@pytest.mark.parametrize(
    ("changes", "greedy"),
    [({"temperature": 0.0}, True), ({"temperature": 1e-7}, True), ({"top_k": 1}, True), ({}, False)],
)
def test_greedy_means_temperature_zero_or_a_single_candidate(changes: dict[str, Any], greedy: bool) -> None:
    assert SamplingParams(**changes).greedy is greedy


# --------------------------------------------------------------------------- state


def test_a_prompt_token_outside_the_vocabulary_is_refused_with_its_position() -> None:
    with pytest.raises(InvalidTokenError) as caught:
        SamplerState(SamplingParams(), [1, 2, 50, 3], 50)
    assert (caught.value.token_id, caught.value.position) == (50, 2)


def test_a_prompt_that_is_not_integer_ids_is_refused() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        SamplerState(SamplingParams(), [1.5, 2.0], 50)
    assert caught.value.parameter == "prompt_ids"


def test_appending_a_token_outside_the_vocabulary_is_refused() -> None:
    state = SamplerState(SamplingParams(), [1], 50)
    with pytest.raises(InvalidTokenError):
        state.append(50)
    with pytest.raises(InvalidTokenError):
        state.append(-1)


def test_state_refuses_params_whose_bias_is_outside_its_vocabulary() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        SamplerState(SamplingParams(logit_bias={60: 1.0}), [1], 50)
    assert caught.value.parameter == "logit_bias"


def test_state_tracks_distinct_seen_tokens_and_generated_counts() -> None:
    state = SamplerState(SamplingParams(), [5, 5, 9, 2], 50)
    for token in [9, 7, 7, np.int64(7), 1]:
        state.append(token)  # type: ignore[arg-type]
    assert sorted(state.seen_ids.tolist()) == [1, 2, 5, 7, 9]
    assert state.generated_counts == {9: 1, 7: 3, 1: 1}
    assert state.num_generated == 5


def test_state_bookkeeping_stays_correct_over_many_appends() -> None:
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 1000, 5000)
    state = SamplerState(SamplingParams(), [], 1000)
    for token in tokens.tolist():
        state.append(token)
    ids, counts = np.unique(tokens, return_counts=True)
    assert state.generated_counts == dict(zip(ids.tolist(), counts.tolist(), strict=True))
    assert sorted(state.seen_ids.tolist()) == ids.tolist()


# --------------------------------------------------------------------------- greedy and determinism


@settings(max_examples=60, deadline=None)
@given(seed=SEEDS, rows=st.integers(1, 4), vocab=st.sampled_from([7, 100, 4096, VOCAB]))
def test_greedy_equals_argmax(seed: int, rows: int, vocab: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    params = [SamplingParams(temperature=0.0)] * rows
    states = [state_for(p, vocab) for p in params]
    assert sample(logits, params, states).tolist() == logits.argmax(axis=1).tolist()


def test_greedy_draws_no_randomness_and_sampling_draws_exactly_one_value_per_token() -> None:
    rng = np.random.default_rng(0)
    configs = [
        {"temperature": 0.0},
        {"top_k": 1},
        {"top_k": 50, "top_p": 0.9, "temperature": 0.7},
        {"top_p": 0.8},
        {"min_p": 0.1},
        {},
    ]
    for config in configs:
        params = SamplingParams(seed=11, **config)
        state = state_for(params)
        for _ in range(5):
            draw(lm_row(rng), params, state)
        reference = np.random.default_rng(11)
        for _ in range(0 if params.greedy else 5):
            reference.random()
        assert state.rng.random() == reference.random(), config


FULL_CHAIN = SamplingParams(
    temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2, seed=1234
)


def run_request(params: SamplingParams, steps: npt.NDArray[np.float32], prompt: Sequence[int] = (1, 2, 3)) -> list[int]:
    state = state_for(params, steps.shape[1], prompt)
    tokens = []
    for row in steps:
        token = draw(row, params, state)
        state.append(token)
        tokens.append(token)
    return tokens


@pytest.mark.parametrize(
    "params",
    [
        FULL_CHAIN,
        SamplingParams(seed=5),
        SamplingParams(seed=5, top_p=0.95),
        SamplingParams(seed=5, min_p=0.05, temperature=1.3),
    ],
)
def test_the_same_seed_gives_the_same_tokens(params: SamplingParams) -> None:
    rng = np.random.default_rng(1)
    steps = np.stack([lm_row(rng) for _ in range(30)])
    first = run_request(params, steps)
    assert run_request(params, steps) == first
    assert run_request(params.replace(seed=6), steps) != first


def test_a_row_samples_the_same_tokens_alone_or_in_a_batch_with_other_seeds() -> None:
    rng = np.random.default_rng(2)
    batch, steps = 8, 20
    logits = np.stack([np.stack([lm_row(rng) for _ in range(batch)]) for _ in range(steps)])
    params = [FULL_CHAIN] + [
        SamplingParams(seed=100 + i, temperature=0.5 + 0.1 * i, top_p=0.9 if i % 2 else 1.0, top_k=i * 10)
        for i in range(1, batch)
    ]
    params[3] = SamplingParams(temperature=0.0)
    alone = run_request(FULL_CHAIN, logits[:, 0])
    states = [state_for(p, VOCAB, (1, 2, 3)) for p in params]
    together = []
    for step in logits:
        chosen = sample(step, params, states)
        for state, token in zip(states, chosen.tolist(), strict=True):
            state.append(token)
        together.append(int(chosen[0]))
    assert together == alone


def test_logits_for_a_row_are_the_same_as_a_row_of_a_larger_array_viewed_in_place() -> None:
    rng = np.random.default_rng(4)
    block = np.stack([lm_row(rng) for _ in range(3)])
    params = SamplingParams(seed=9, top_p=0.9)
    contiguous = draw(block[1].copy(), params, state_for(params))
    assert int(sample(block[1:2], [params], [state_for(params)])[0]) == contiguous


# --------------------------------------------------------------------------- filters


@settings(max_examples=60, deadline=None)
@given(
    seed=SEEDS,
    k=st.integers(1, 300),
    vocab=st.sampled_from([50, 4096, 5003, VOCAB]),
    temperature=st.floats(0.05, 5.0),
)
def test_top_k_never_picks_outside_the_k_best(seed: int, k: int, vocab: int, temperature: float) -> None:
    rng = np.random.default_rng(seed)
    row = lm_row(rng, vocab) if vocab > 100 else rng.normal(0, 2, vocab).astype(np.float32)
    params = SamplingParams(top_k=k, temperature=temperature, seed=seed)
    state = state_for(params, vocab)
    kth = np.sort(row)[::-1][min(k, vocab) - 1]
    for _ in range(5):
        assert row[draw(row, params, state)] >= kth


@settings(max_examples=60, deadline=None)
@given(
    seed=SEEDS,
    top_p=st.floats(0.05, 0.999),
    temperature=st.floats(0.3, 3.0),
    top_k=st.sampled_from([0, 0, 40, 500]),
    vocab=st.sampled_from([64, 4096, VOCAB]),
    flat=st.booleans(),
)
def test_top_p_picks_only_from_the_smallest_nucleus_reaching_p(
    *, seed: int, top_p: float, temperature: float, top_k: int, vocab: int, flat: bool
) -> None:
    rng = np.random.default_rng(seed)
    # A flat row pushes the nucleus past the first candidate sets, down to the whole row.
    row = rng.normal(0, 0.3, vocab).astype(np.float32) if flat else lm_row(rng, vocab)
    params = SamplingParams(top_p=top_p, temperature=temperature, top_k=top_k, seed=seed)
    candidates = row
    if 0 < top_k < vocab:
        kept = reference_top_k(row, top_k)
        candidates = np.full_like(row, -np.inf)
        candidates[kept] = row[kept]
    # A hair of slack on p: float32 and float64 sums may disagree on the last token at the edge.
    allowed = reference_nucleus(candidates, min(top_p * (1 + 1e-5), 1.0), temperature)
    state = state_for(params, vocab)
    for _ in range(5):
        assert draw(row, params, state) in allowed


def test_top_p_samples_the_renormalised_nucleus() -> None:
    row = np.full(VOCAB, -30.0, dtype=np.float32)
    row[[10, 2000, 30000, 49151]] = [3.0, 2.5, 2.0, 1.0]
    params = SamplingParams(top_p=0.8, seed=21)
    nucleus = sorted(reference_nucleus(row, 0.8, 1.0))
    assert nucleus == [10, 2000, 30000]
    state = state_for(params)
    counts = np.bincount([draw(row, params, state) for _ in range(6000)], minlength=VOCAB)
    assert counts.sum() == counts[nucleus].sum()
    probs = softmax64(row)[nucleus]
    assert chi_square(counts[nucleus], probs / probs.sum()) < CHI2_999[2]


@settings(max_examples=40, deadline=None)
@given(
    seed=SEEDS,
    min_p=st.floats(0.001, 1.0),
    temperature=st.floats(0.3, 3.0),
    top_k=st.sampled_from([0, 30]),
)
def test_min_p_drops_tokens_less_likely_than_min_p_times_the_best(
    seed: int, min_p: float, temperature: float, top_k: int
) -> None:
    rng = np.random.default_rng(seed)
    row = lm_row(rng)
    params = SamplingParams(min_p=min_p, temperature=temperature, top_k=top_k, seed=seed)
    probs = softmax64(row, temperature)
    state = state_for(params)
    for _ in range(5):
        token = draw(row, params, state)
        assert probs[token] >= min_p * probs.max() * (1 - 1e-5)


def test_min_p_of_one_keeps_only_the_most_likely_tokens() -> None:
    row = np.zeros(VOCAB, dtype=np.float32)
    row[[3, 70, 40000]] = 5.0
    params = SamplingParams(min_p=1.0, seed=0)
    state = state_for(params)
    assert {draw(row, params, state) for _ in range(300)} == {3, 70, 40000}


def test_top_k_breaks_ties_at_the_kth_by_lower_id() -> None:
    row = np.zeros(VOCAB, dtype=np.float32)
    row[[5, 6, 7, 8]] = [9.0, 4.0, 4.0, 4.0]
    params = SamplingParams(top_k=2, temperature=3.0, seed=3)
    state = state_for(params)
    assert {draw(row, params, state) for _ in range(500)} == {5, 6}


def test_top_k_on_a_masked_row_stays_within_the_unmasked_tokens() -> None:
    # A constraint plugin may leave a handful of tokens and mask the rest to -inf: top-k larger
    # than what is left must neither pick a masked token nor fall back to sorting the whole row.
    row = np.full(VOCAB, -np.inf, dtype=np.float32)
    row[[7, 9000, 48000]] = [1.0, 2.0, 1.5]
    params = SamplingParams(top_k=50, top_p=0.95, seed=2)
    state = state_for(params)
    assert {draw(row, params, state) for _ in range(300)} == {7, 9000, 48000}


def test_top_k_at_least_the_vocabulary_is_plain_sampling() -> None:
    rng = np.random.default_rng(12)
    steps = np.stack([lm_row(rng, 4096) for _ in range(10)])
    assert run_request(SamplingParams(top_k=4096, seed=4), steps) == run_request(SamplingParams(seed=4), steps)


def test_tokens_with_minus_infinite_logits_are_never_drawn() -> None:
    rng = np.random.default_rng(13)
    row = np.full(VOCAB, -np.inf, dtype=np.float32)
    live = rng.choice(VOCAB, 5, replace=False)
    row[live] = rng.normal(0, 1, 5)
    for config in [{}, {"top_k": 50}, {"top_p": 0.99}, {"min_p": 1e-6}, {"top_k": 3000, "top_p": 0.999}]:
        params = SamplingParams(seed=1, **config)
        state = state_for(params)
        assert {draw(row, params, state) for _ in range(200)} <= set(live.tolist()), config


def _temperature_counts(row: npt.NDArray[np.float32], params: SamplingParams, draws: int) -> npt.NDArray[np.int64]:
    state = state_for(params, row.size)
    return np.bincount([draw(row, params, state) for _ in range(draws)], minlength=row.size)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_shapes_the_distribution_as_softmax_of_logits_over_t(temperature: float) -> None:
    row = np.array([2.0, 1.5, 1.0, 0.0, -0.5, -1.0, 0.7, 1.2], dtype=np.float32)
    counts = _temperature_counts(row, SamplingParams(temperature=temperature, seed=77), 20_000)
    assert chi_square(counts, softmax64(row, temperature)) < CHI2_999[7]
    # The test has teeth: the same counts are far from the distribution at the default temperature.
    if temperature != 1.0:
        assert chi_square(counts, softmax64(row, 1.0)) > 10 * CHI2_999[7]


@pytest.mark.parametrize(
    "config",
    [{"top_k": 5}, {"top_k": 5, "top_p": 0.999999}, {}, {"min_p": 1e-4}],
    ids=["top_k", "top_p", "plain", "min_p"],
)
def test_large_vocabulary_draws_follow_the_tempered_distribution(config: dict[str, Any]) -> None:
    # Five strong tokens spread over the vocabulary (both ends, the middle, a 16-aligned column) hold
    # nearly all the mass; the fast candidate paths and the blocked draw must still weigh them right.
    row = np.full(VOCAB, -30.0, dtype=np.float32)
    strong = [0, 16, 24_577, 40_000, VOCAB - 1]
    row[strong] = [3.0, 2.2, 1.8, 2.6, 1.0]
    params = SamplingParams(temperature=1.5, seed=31, **config)
    counts = _temperature_counts(row, params, 8000)
    assert counts.sum() == counts[strong].sum()
    probs = softmax64(row[strong], 1.5)
    assert chi_square(counts[strong], probs) < CHI2_999[4]


# --------------------------------------------------------------------------- fast top-k


def _adversarial_rows() -> list[tuple[str, npt.NDArray[np.float32]]]:
    rng = np.random.default_rng(99)
    n = VOCAB
    rows = {
        "all equal": np.zeros(n),
        "two levels": rng.integers(0, 2, n).astype(float),
        "few distinct values": rng.integers(0, 5, n).astype(float),
        "many equal maxima": np.where(rng.random(n) < 0.01, 7.0, rng.normal(0, 1, n)),
        "ascending": np.arange(n, dtype=float),
        "descending": -np.arange(n, dtype=float),
        "best in one slice": np.concatenate([rng.normal(10, 1, n // 16), rng.normal(0, 1, n - n // 16)]),
        "best in one column": np.where(np.arange(n) % (n // 16) == 5, 10.0 + rng.random(n), rng.random(n)),
        "best on a stride of 16": np.where(np.arange(n) % 16 == 0, 5.0 + rng.random(n), rng.random(n)),
        "mostly -inf": np.where(rng.random(n) < 0.999, -np.inf, rng.normal(0, 1, n)),
        "all -inf but one": np.where(np.arange(n) == 4321, 0.0, -np.inf),
        "huge and tiny": np.where(rng.random(n) < 0.5, 3e38, -3e38),
    }
    return [(name, row.astype(np.float32)) for name, row in rows.items()]


@pytest.mark.parametrize(("name", "row"), _adversarial_rows(), ids=[name for name, _ in _adversarial_rows()])
@pytest.mark.parametrize("k", [1, 2, 50, 64, 191, 1024, 3000])
def test_fast_top_k_equals_exact_top_k_on_adversarial_rows(name: str, row: npt.NDArray[np.float32], k: int) -> None:
    ids, values, top = _top_k(row, k)
    assert ids.tolist() == reference_top_k(row, k).tolist()
    # the same k values np.argpartition finds, whichever of the tied entries it picked
    assert np.sort(values).tolist() == np.sort(row[np.argpartition(row, row.size - k)[row.size - k :]]).tolist()
    assert values.tolist() == row[ids].tolist()
    assert top == row.max()


@settings(max_examples=80, deadline=None)
@given(
    seed=SEEDS,
    n=st.integers(1, 70_000),
    k=st.integers(1, 2500),
    levels=st.sampled_from([2, 10, 1000, 0]),
)
def test_fast_top_k_equals_exact_top_k_for_any_row_length_and_ties(seed: int, n: int, k: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    row = (rng.integers(0, levels, n) if levels else rng.normal(0, 1, n)).astype(np.float32)
    ids, values, _ = _top_k(row, k)
    assert ids.tolist() == reference_top_k(row, k).tolist()
    assert values.tolist() == row[ids].tolist()
    if k < n:
        assert np.sort(values).tolist() == np.sort(row[np.argpartition(row, n - k)[n - k :]]).tolist()


# --------------------------------------------------------------------------- penalties and bias


def test_penalties_and_bias_follow_their_formulas() -> None:
    rng = np.random.default_rng(5)
    vocab = 1000
    prompt = rng.integers(0, vocab, 40)
    generated = rng.integers(0, vocab, 60)
    bias = {int(t): float(b) for t, b in zip(rng.choice(vocab, 10, replace=False), rng.uniform(-5, 5, 10), strict=True)}
    params = SamplingParams(
        repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, logit_bias=bias, seed=0
    )
    state = SamplerState(params, prompt, vocab)
    for token in generated.tolist():
        state.append(token)
    row = rng.normal(0, 3, vocab).astype(np.float32)

    expected = row.astype(np.float64)
    for token, amount in bias.items():
        expected[token] += amount
    for token in np.unique(np.concatenate([prompt, generated])):
        # repetition penalty (prompt and generated): positive logits shrink, negative ones grow
        expected[token] = expected[token] / 1.3 if expected[token] > 0 else expected[token] * 1.3
    ids, counts = np.unique(generated, return_counts=True)
    # presence once per generated token, frequency once per occurrence
    expected[ids] -= 0.5 + 0.25 * counts
    np.testing.assert_allclose(state.process_logits(row), expected, rtol=1e-5, atol=1e-5)


def test_presence_and_frequency_penalties_ignore_prompt_tokens() -> None:
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=1.0)
    state = SamplerState(params, [1, 2, 3], 10)
    row = np.zeros(10, dtype=np.float32)
    assert state.process_logits(row).tolist() == row.tolist()
    state.append(2)
    state.append(2)
    assert state.process_logits(row)[[1, 2, 3]].tolist() == [0.0, -3.0, 0.0]


def test_process_logits_writes_into_out_when_given_and_leaves_the_row_alone() -> None:
    params = SamplingParams(repetition_penalty=2.0, logit_bias={0: 1.0})
    state = SamplerState(params, [1], 4)
    row = np.array([1.0, 4.0, -2.0, 0.5], dtype=np.float32)
    out = np.full(4, np.nan, dtype=np.float32)
    result = state.process_logits(row, out=out)
    assert result is out
    assert out.tolist() == [2.0, 2.0, -2.0, 0.5]
    assert row.tolist() == [1.0, 4.0, -2.0, 0.5]


def test_sampling_many_rows_in_turn_reuses_no_result_across_rows() -> None:
    # rows share the sampler's scratch buffer: each row's penalties must apply to its own logits only
    params = SamplingParams(temperature=0.0, repetition_penalty=10.0)
    states = [SamplerState(params, [0], 3), SamplerState(params, [1], 3), SamplerState(params, [], 3)]
    logits = np.array([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0], [0.0, 1.0, 3.0]], dtype=np.float32)
    assert sample(logits, [params] * 3, states).tolist() == [1, 0, 2]
    assert logits[0].tolist() == [5.0, 4.0, 0.0]


@pytest.mark.parametrize(
    "config",
    [
        {"temperature": 0.0, "repetition_penalty": 1.3},
        {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1},
        {"temperature": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.3, "logit_bias": {7: 5.0, 9: -100}},
    ],
)
def test_borrowed_rows_draw_what_copied_rows_draw_and_are_left_as_they_were(config: dict[str, Any]) -> None:
    rng = np.random.default_rng(12)
    params = SamplingParams(seed=3, **config)
    prompt = rng.integers(0, VOCAB, 300)
    borrowed, copied = SamplerState(params, prompt, VOCAB), SamplerState(params, prompt, VOCAB)
    for _ in range(30):
        logits = np.stack([lm_row(rng), lm_row(rng)])
        before = logits.copy()
        got = sample(logits, [params] * 2, [borrowed] * 2, borrow_rows=True)
        assert np.array_equal(logits, before)
        assert got.tolist() == sample(logits, [params] * 2, [copied] * 2).tolist()
        for token in got.tolist():
            borrowed.append(token)
            copied.append(token)


def test_a_borrowed_row_is_restored_when_sampling_it_fails() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    state = SamplerState(params, [1, 2], 4)
    logits = np.array([[3.0, 2.0, np.nan, 1.0]], dtype=np.float32)
    before = logits.copy()
    with pytest.raises(BackendError):
        sample(logits, [params], [state], borrow_rows=True)
    np.testing.assert_array_equal(logits, before)


def test_a_read_only_row_is_never_borrowed() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=10.0)
    logits = np.array([[5.0, 4.0, 0.0]], dtype=np.float32)
    logits.flags.writeable = False
    assert sample(logits, [params], [SamplerState(params, [0], 3)], borrow_rows=True).tolist() == [1]


def test_repetition_penalty_steers_greedy_away_from_a_seen_token() -> None:
    row = np.array([0.0, 2.0, 1.9, -1.0, -1.05], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.1)
    assert draw(row, params, SamplerState(params, [1], 5)) == 2
    assert draw(row, params, SamplerState(params, [0], 5)) == 1
    negative = np.array([-1.0, -1.05, -9.0], dtype=np.float32)
    assert draw(negative, params, SamplerState(params, [0], 3)) == 1


def test_nothing_to_apply_returns_the_row_itself_without_a_copy() -> None:
    row = np.zeros(10, dtype=np.float32)
    params = SamplingParams(repetition_penalty=1.0, presence_penalty=0.0)
    assert SamplerState(params, [1, 2], 10).process_logits(row) is row


@pytest.mark.parametrize("config", [{"temperature": 0.0}, {}, {"top_k": 40}, {"top_p": 0.9}, {"min_p": 0.2}])
def test_a_bias_of_minus_100_bans_a_token_and_plus_100_forces_one(config: dict[str, Any]) -> None:
    rng = np.random.default_rng(6)
    row = lm_row(rng)
    best = int(row.argmax())
    for seed in range(30):
        banned = SamplingParams(seed=seed, logit_bias={best: BAN_BIAS}, **config)
        assert draw(row, banned, state_for(banned)) != best
        forced = SamplingParams(seed=seed, logit_bias={12345: 100.0}, **config)
        assert draw(row, forced, state_for(forced)) == 12345


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, repetition_penalty=1.2, logit_bias={3: 5.0}),
        FULL_CHAIN.replace(logit_bias={3: -100.0, 4: 50.0}),
        SamplingParams(top_p=0.5, repetition_penalty=0.8, seed=1),
        SamplingParams(min_p=0.1, presence_penalty=2.0, seed=1),
        SamplingParams(temperature=2.0, frequency_penalty=-2.0, seed=1),
    ],
)
def test_the_callers_logits_are_never_modified(params: SamplingParams) -> None:
    rng = np.random.default_rng(7)
    logits = np.stack([lm_row(rng), lm_row(rng)])
    before = logits.copy()
    logits.flags.writeable = False  # any write would raise
    states = [state_for(params, VOCAB, range(0, 300, 3)) for _ in range(2)]
    for state in states:
        state.append(int(before[0].argmax()))
    sample(logits, [params, params], states)
    np.testing.assert_array_equal(logits, before)


# --------------------------------------------------------------------------- logprobs


@settings(max_examples=60, deadline=None)
@given(
    seed=SEEDS,
    vocab=st.sampled_from([3, 100, 4096, VOCAB]),
    top_n=st.integers(0, 20),
    scale=st.sampled_from([0.1, 3.0, 40.0]),
)
def test_logprobs_match_a_float64_log_softmax(seed: int, vocab: int, top_n: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    row = (rng.normal(0, scale, vocab) + 1000.0 * rng.choice([-1, 0, 1])).astype(np.float32)
    token = int(rng.integers(0, vocab))
    chosen, alternatives = logprobs(row, token, top_n)
    row64 = row.astype(np.float64)
    reference = row64 - (row64.max() + np.log(np.exp(row64 - row64.max()).sum()))
    assert chosen == pytest.approx(reference[token], abs=1e-5)
    expected_ids = np.lexsort((np.arange(vocab), -row64))[: min(top_n, vocab)]
    assert [t for t, _ in alternatives] == expected_ids.tolist()
    assert [lp for _, lp in alternatives] == pytest.approx(reference[expected_ids].tolist(), abs=1e-5)


def test_logprobs_of_a_banned_token_is_minus_infinity() -> None:
    row = np.array([0.0, -np.inf, 1.0], dtype=np.float32)
    assert logprobs(row, 1, 2) == (-math.inf, ((2, pytest.approx(-0.3132617)), (0, pytest.approx(-1.3132617))))


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((np.zeros(5, np.float32), 5, 0), "token_id"),
        ((np.zeros(5, np.float32), 0, 21), "top_n"),
        ((np.zeros((2, 5)), 0, 0), "logits_row"),
    ],
)
def test_logprobs_refuses_bad_arguments(args: tuple[Any, int, int], name: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        logprobs(*args)
    assert caught.value.parameter == name


# --------------------------------------------------------------------------- bad logits and the hook


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("config", [{"temperature": 0.0}, {}, {"top_k": 50}, {"top_p": 0.9}, {"min_p": 0.1}])
def test_a_row_with_nan_or_plus_inf_raises_a_backend_error(bad: float, config: dict[str, Any]) -> None:
    row = lm_row(np.random.default_rng(8))
    row[777] = bad
    params = SamplingParams(seed=0, **config)
    with pytest.raises(BackendError, match="row 0"):
        draw(row, params, state_for(params))


@pytest.mark.parametrize("config", [{"temperature": 0.0}, {}, {"top_k": 50}])
def test_a_row_where_every_token_is_banned_raises_a_backend_error(config: dict[str, Any]) -> None:
    row = np.full(64, -np.inf, dtype=np.float32)
    params = SamplingParams(seed=0, **config)
    with pytest.raises(BackendError):
        draw(row, params, state_for(params, 64))


def test_shape_mismatches_raise_invalid_parameter_errors() -> None:
    params = SamplingParams()
    state = state_for(params, 10)
    with pytest.raises(InvalidParameterError, match="logits"):
        sample(np.zeros(10, np.float32), [params], [state])  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="params"):
        sample(np.zeros((2, 10), np.float32), [params], [state, state])
    with pytest.raises(InvalidParameterError, match="states"):
        sample(np.zeros((1, 10), np.float32), [params], [])
    with pytest.raises(InvalidParameterError, match="logits"):
        sample(np.zeros((1, 11), np.float32), [params], [state])


def _hook_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("infer")
    pm.add_hookspecs(hookspecs)
    pm.register(DefaultSampler(), name="infer.sampling")
    return pm


def test_default_sampler_answers_the_sample_hook() -> None:
    pm = _hook_manager()
    logits = np.array([[0.0, 3.0, 1.0]], dtype=np.float32)
    params = SamplingParams(temperature=0.0)
    result = pm.hook.infer_sample(logits=logits, params=[params], states=[state_for(params, 3)])
    assert result.tolist() == [1]
    assert result.dtype == np.int64


def test_another_sampler_plugin_runs_before_the_default() -> None:
    class AlwaysZero:
        @hookimpl
        def infer_sample(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
            return np.zeros(logits.shape[0], dtype=np.int64)

    pm = _hook_manager()
    pm.register(AlwaysZero())
    logits = np.array([[0.0, 3.0, 1.0]], dtype=np.float32)
    params = SamplingParams(temperature=0.0)
    assert pm.hook.infer_sample(logits=logits, params=[params], states=[state_for(params, 3)]).tolist() == [0]
