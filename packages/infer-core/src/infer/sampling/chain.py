"""The default sampler's chain: one row of logits becomes one token.

::

    token mask -> logit bias -> repetition penalty -> presence/frequency penalties
        -> greedy: argmax
        -> otherwise: temperature -> top-k -> top-p -> min-p -> one draw from the row's own rng

The first links are the request's :class:`~infer.sampling.state.SamplerState`'s; the rest is
here, over the fast paths of :mod:`infer.sampling._fast`. :class:`DefaultSampler` registers
:func:`sample` as the ``trylast`` ``infer_sample`` implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from infer.errors import BackendError, InvalidParameterError
from infer.markers import hookimpl
from infer.sampling._fast import _NUCLEUS_GROWTH, _draw, _draw_nucleus, _scratch, _top_k, _weights
from infer.sampling.params import MAX_TOP_LOGPROBS, SamplingParams, _int
from infer.sampling.state import SamplerState

if TYPE_CHECKING:
    from infer.sampling._fast import FloatRow

__all__ = ["DefaultSampler", "logprobs", "sample"]

# Who reported non-finite logits: the sampler cannot know which backend produced the row.
_LOGITS_SOURCE = "unknown (reported by the sampler)"


def _sample_row(row: FloatRow, params: SamplingParams, rng: np.random.Generator, index: int) -> int:
    """One token from ``row`` (already biased and penalised): temperature, top-k, top-p, min-p, one draw."""
    n = row.shape[0]
    k = params.top_k if params.top_k < n else 0
    if k:
        ids, values, top = _top_k(row, k)
    else:
        top = float(row[row.argmax()])
    if not math.isfinite(top):
        raise _bad_row(index, top)
    u = rng.random()
    inv_t = 1.0 / params.temperature
    top_p, min_p = params.top_p, params.min_p
    if k:
        # Temperature scales the k survivors only.
        if top_p < 1.0:
            return _draw_nucleus(ids, values, top=top, mass=None, params=params, u=u)
        weights = _weights(values, top, inv_t)
    elif top_p < 1.0:
        scaled = np.subtract(row, row.dtype.type(top), out=_scratch(row, 1))
        scaled *= row.dtype.type(inv_t)
        probs = np.exp(scaled, out=scaled)
        mass = top_p * float(np.add.reduce(probs, dtype=np.float64))
        ids, values = np.arange(n), row  # when no smaller candidate set holds the mass
        for size in _NUCLEUS_GROWTH:
            if size >= n:
                break
            candidates, candidate_values, _ = _top_k(row, size)
            if probs[candidates].sum(dtype=np.float64) >= mass:
                ids, values = candidates, candidate_values
                break
        return _draw_nucleus(ids, values, top=top, mass=mass, params=params, u=u)
    elif min_p > 0.0:
        # Only tokens within T * log(min_p) of the top can pass; the slack keeps float32 rounding
        # of the cut from dropping one, and the exact test below decides.
        cut = top + params.temperature * math.log(min_p)
        ids = (row >= cut - 1e-6 * (abs(cut) + 1.0)).nonzero()[0]
        weights = _weights(row[ids], top, inv_t)
    else:
        scaled = np.subtract(row, row.dtype.type(top), out=_scratch(row, 1))
        scaled *= row.dtype.type(inv_t)
        return _draw(np.exp(scaled, out=scaled), u)
    if min_p > 0.0:
        passing = weights >= min_p
        ids, weights = ids[passing], weights[passing]
    return int(ids[_draw(weights, u)])


def _bad_row(index: int, value: float) -> BackendError:
    return BackendError(
        f"logits row {index} has no usable maximum ({value}): the row holds NaN or +inf, or every token is -inf "
        "(banned); check the backend's output and any plugin that masks logits",
        backend=_LOGITS_SOURCE,
    )


def sample(
    logits: npt.NDArray[np.floating[Any]],
    params: Sequence[SamplingParams],
    states: Sequence[SamplerState],
    *,
    borrow_rows: bool = False,
) -> npt.NDArray[np.int64]:
    """Choose one token per row of ``logits`` (``[B, vocab]``); returns int64 ``[B]``.

    Row ``i`` uses ``params[i]`` and draws from ``states[i].rng`` only (one draw per sampled
    token, none when greedy), so its tokens depend on its seed, not on the batch. ``logits`` is
    never modified; with ``borrow_rows`` a writable row is penalised in place and restored before
    the call returns, which saves copying it (for arrays no other thread reads meanwhile, as the
    engine's own logits). Raises :class:`~infer.errors.InvalidParameterError` when the shapes disagree
    and :class:`~infer.errors.BackendError` for a row with NaN, +inf, or nothing but -inf.
    The caller records the chosen tokens with :meth:`SamplerState.append`.
    """
    if not isinstance(logits, np.ndarray) or logits.ndim != 2 or logits.dtype.kind != "f":
        raise InvalidParameterError("logits", getattr(logits, "shape", logits), "a [batch, vocab] float array")
    rows, vocab = logits.shape
    if len(params) != rows:
        raise InvalidParameterError("params", len(params), f"one SamplingParams per logits row ({rows})")
    if len(states) != rows:
        raise InvalidParameterError("states", len(states), f"one SamplerState per logits row ({rows})")
    chosen = np.empty(rows, dtype=np.int64)
    for i in range(rows):
        state, p = states[i], params[i]
        if state.vocab_size != vocab:
            raise InvalidParameterError("logits", logits.shape, f"{state.vocab_size} columns, the state's vocabulary")
        row = logits[i]
        # A masked row is processed in a copy: restoring it would mean saving most of the row anyway.
        if not (borrow_rows and row.flags.writeable and state.token_mask is None):
            row = state.process_logits(row, p, out=_scratch(row, 0))
        elif state._applies(p):
            saved = [(ids, row[ids]) for ids in state._touched()]
            try:
                state._apply(row, p)
                chosen[i] = _choose(row, p, state.rng, i)
            finally:
                for ids, values in saved:
                    row[ids] = values
            continue
        chosen[i] = _choose(row, p, state.rng, i)
    return chosen


def _choose(row: FloatRow, params: SamplingParams, rng: np.random.Generator, index: int) -> int:
    """The token for one processed row: its argmax when greedy, else a draw through the chain."""
    if params.greedy:
        token = int(row.argmax())
        if not math.isfinite(row[token]):
            raise _bad_row(index, float(row[token]))
        return token
    return _sample_row(row, params, rng, index)


def logprobs(logits_row: npt.ArrayLike, token_id: int, top_n: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """Log-probability of ``token_id`` under the raw row's softmax, and the ``top_n`` most likely tokens.

    Computed before any bias, penalty or temperature (what the model itself predicted), with a
    max-shifted log-sum-exp accumulated in float64. Alternatives are ordered most likely first,
    ties by lower id.
    """
    row = np.asarray(logits_row)
    if row.ndim != 1 or row.dtype.kind != "f" or row.size == 0:
        raise InvalidParameterError("logits_row", getattr(row, "shape", row), "a non-empty 1-D float array")
    token = _int("token_id", token_id, 0, row.shape[0] - 1, f"a token id in [0, {row.shape[0]})")
    top_n = _int("top_n", top_n, 0, MAX_TOP_LOGPROBS, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    top = float(row[row.argmax()])
    if not math.isfinite(top):
        raise _bad_row(0, top)
    shifted = np.subtract(row, row.dtype.type(top), out=_scratch(row, 1))
    log_total = top + math.log(float(np.add.reduce(np.exp(shifted, out=shifted), dtype=np.float64)))
    alternatives: tuple[tuple[int, float], ...] = ()
    if top_n:
        ids, _, _ = _top_k(row, top_n)
        best = ids[np.argsort(-row[ids], kind="stable")[:top_n]]
        alternatives = tuple((int(t), float(row[t]) - log_total) for t in best)
    return float(row[token]) - log_total, alternatives


class DefaultSampler:
    """The sampler infer-core registers as a plugin; any other ``infer_sample`` runs before it."""

    @hookimpl(trylast=True)
    def infer_sample(
        self,
        logits: npt.NDArray[np.float32],
        params: Sequence[SamplingParams],
        states: Sequence[SamplerState],
    ) -> npt.NDArray[np.int64]:
        """Sample with :func:`sample`, penalising the engine's own logits rows in place."""
        return sample(logits, params, states, borrow_rows=True)
