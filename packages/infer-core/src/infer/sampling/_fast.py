"""The measured fast paths of the chain: scratch rows, grouped top-k, blocked draws, the nucleus.

The chain is written for a decode loop: on a 49k vocabulary a greedy step costs about one
``argmax`` and a top-k/top-p step avoids sorting or partitioning the whole row (see
:func:`_top_k`); ``benchmarks/bench_sampling.py`` measures it. Each constant below says what
its measurement chose. Private to :mod:`infer.sampling`: :mod:`infer.sampling.chain` is the only
caller, and its tests pin the results these shortcuts must give.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from infer.sampling.params import SamplingParams

# Rows at least this long take the column-maximum shortcut in _top_k; shorter ones are
# cheap enough to partition whole.
_FAST_TOP_K_MIN_ROW = 4096
# _top_k views a row as this many stacked slices (3,072 columns for a 49k vocabulary).
_GROUPS = 16
# Candidate-set sizes tried, in turn, when top-p runs without top-k: most LM distributions
# reach p inside the first, flat ones fall through to the whole row.
_NUCLEUS_GROWTH = (64, 1024, 8192)
# Above this many weights a draw sums blocks first, instead of a cumulative sum of every weight.
_BLOCKED_DRAW_MIN = 8192
_DRAW_BLOCK = 256

_local = threading.local()


def _scratch(like: FloatRow, slot: int) -> FloatRow:
    """This thread's buffer shaped like the row ``like``; slot 0 holds a processed row, 1 its transforms.

    Sampling needs a row-sized copy or two per token. Allocated afresh each time, a 49,152-float
    row costs several times its copy (measured 79 us against 17 us beside a backend's fresh
    logits), so each thread keeps one per slot, vocabulary size and dtype.
    """
    buffers: dict[tuple[int, np.dtype[Any], int], FloatRow] = _local.__dict__.setdefault("buffers", {})
    key = (like.shape[0], like.dtype, slot)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = np.empty(like.shape[0], dtype=like.dtype)
    return buffer


#: A row of logits (float32 from backends; other float widths work too).
FloatRow = npt.NDArray[np.floating[Any]]


def _top_k(row: FloatRow, k: int) -> tuple[npt.NDArray[np.intp], FloatRow, float]:
    """The k largest entries of ``row``, ties at the k-th broken by lower id: ascending ids, values, and the row max.

    Breaking ties by id makes every top-k set the first k of one order (value down, id up), so
    a larger set always extends a smaller one, and the set never outgrows k even on a row of
    equal (or masked, -inf) logits.

    Exact without partitioning the whole row. Viewed as ``_GROUPS`` stacked slices, the row has
    ``n / _GROUPS`` columns; one vectorised pass takes each column's maximum (and a second pass
    the maxima of groups of those). The k-th largest of k or more such maxima is a threshold
    that at least k distinct entries reach, so the k-th largest entry reaches it too, and every
    entry of the top k sits in a column whose maximum reaches it: only those columns, about
    ``k * _GROUPS`` entries, are partitioned.

    The max is returned as is; when it is not finite (NaN anywhere, +inf, all -inf) the ids are
    empty and the caller must refuse the row. (Array methods rather than ``np.`` functions
    throughout: on arrays this small the call overhead is most of the cost.)
    """
    n = row.shape[0]
    if k >= n:
        return np.arange(n), row, float(row[row.argmax()])
    width = n // _GROUPS
    if n < _FAST_TOP_K_MIN_ROW or 2 * k > width:
        top = float(row[row.argmax()])
        if not math.isfinite(top):
            return np.empty(0, dtype=np.intp), row[:0], top
        kth = row[np.argpartition(row, n - k)[n - k]]
        ids = (row >= kth).nonzero()[0]
        ids, values = _first_k(ids, row[ids], kth, k)
        return ids, values, top
    body = width * _GROUPS
    grid = row[:body].reshape(_GROUPS, width) if body < n else row.reshape(_GROUPS, width)
    tail = row[body:] if body < n else None
    column_max = grid.max(axis=0)
    # Where k is small next to the columns, the maxima of column groups give the threshold for
    # less work than partitioning every column maximum.
    if width % _GROUPS == 0 and 2 * k <= width // _GROUPS:
        coarse = column_max.reshape(_GROUPS, -1).max(axis=0)
    else:
        coarse = column_max.copy()  # partitioned in place below; column_max is read again
    top = float(coarse[coarse.argmax()])  # argmax: far less call overhead than max; finds a NaN too
    if tail is not None:
        # np.maximum keeps a NaN from either side, where Python's max() would depend on the order.
        top = float(np.maximum(top, tail.max()))
    if not math.isfinite(top):
        return np.empty(0, dtype=np.intp), row[:0], top
    pivot = coarse.shape[0] - k
    coarse.partition(pivot)
    threshold = coarse[pivot]
    columns = (column_max >= threshold).nonzero()[0]
    if 4 * columns.shape[0] > width:
        # A flat or masked row (most columns reach the threshold): gathering columns would copy
        # most of the row, and partitioning masses of equal values is numpy's slow case.
        ids, values = _top_k_above(row, threshold, k)
        return ids, values, top
    values = grid.take(columns, axis=1)
    ids = _id_grid(width).take(columns, axis=1)
    if tail is not None:
        values = np.concatenate((values.ravel(), tail))
        ids = np.concatenate((ids.ravel(), np.arange(body, n)))
    pool = values.flatten()  # a copy: the partition reorders it
    pivot = pool.shape[0] - k
    pool.partition(pivot)
    # Boolean masks walk the slices in order (then the tail), so the ids come out ascending.
    kth = pool[pivot]
    keep = values >= kth
    ids, values = _first_k(ids[keep], values[keep], kth, k)
    return ids, values, top


def _top_k_above(row: FloatRow, threshold: np.floating[Any], k: int) -> tuple[npt.NDArray[np.intp], FloatRow]:
    """Top k of ``row`` (ties by lower id, ids ascending), given that at least k entries reach ``threshold``.

    Works from the entries strictly above the threshold, so a row where most entries share one
    value (-inf after masking, say) is never partitioned as a whole.
    """
    above = (row > threshold).nonzero()[0]
    if above.shape[0] >= k:
        values = row[above]
        pivot = above.shape[0] - k
        kth = np.partition(values, pivot)[pivot]
        keep = values >= kth
        return _first_k(above[keep], values[keep], kth, k)
    # The k-th largest is the threshold itself: every entry above it, then the lowest-id ties.
    ties = (row == threshold).nonzero()[0][: k - above.shape[0]]
    ids = np.concatenate((above, ties))
    ids.sort()
    return ids, row[ids]


def _first_k(
    ids: npt.NDArray[np.intp], values: FloatRow, kth: np.floating[Any], k: int
) -> tuple[npt.NDArray[np.intp], FloatRow]:
    """From the (ascending) ids of every entry >= ``kth``, the ``k`` with ties at ``kth`` taken by lower id."""
    if ids.shape[0] == k:
        return ids, values
    ties = (values == kth).nonzero()[0]
    keep = np.ones(ids.shape[0], dtype=bool)
    keep[ties[k - (ids.shape[0] - ties.shape[0]) :]] = False
    return ids[keep], values[keep]


@functools.lru_cache(maxsize=8)
def _id_grid(width: int) -> npt.NDArray[np.intp]:
    """The token ids of a row viewed as ``_GROUPS`` stacked slices of ``width`` (read-only, cached)."""
    ids = np.arange(_GROUPS * width, dtype=np.intp).reshape(_GROUPS, width)
    ids.flags.writeable = False
    return ids


def _search(cumulative: npt.NDArray[np.float64], target: float) -> int:
    """First index whose cumulative weight exceeds ``target``; rounding past the end lands on the last positive one."""
    index = int(cumulative.searchsorted(target, side="right"))
    if index < cumulative.shape[0]:
        return index
    # target reached the total through rounding: take the last entry that adds weight.
    steps = (np.diff(cumulative, prepend=0.0) > 0).nonzero()[0]
    return int(steps[-1])


def _draw(weights: FloatRow, u: float) -> int:
    """Index drawn from unnormalised ``weights`` (>= 0, some > 0) by inverse CDF at ``u`` in [0, 1).

    Never returns a zero-weight index. A long array is searched by block sums first, so a draw
    over a whole vocabulary needs no float64 cumulative sum of every entry.
    """
    if weights.shape[0] <= _BLOCKED_DRAW_MIN:
        # np.add.accumulate: the same sums as cumsum, for a fraction of the call overhead.
        cumulative = np.add.accumulate(weights, dtype=np.float64)
        return _search(cumulative, u * cumulative[-1])
    starts = np.arange(0, weights.shape[0], _DRAW_BLOCK)
    block_cumulative = np.add.accumulate(np.add.reduceat(weights, starts, dtype=np.float64))
    target = u * block_cumulative[-1]
    block = _search(block_cumulative, target)
    start = block * _DRAW_BLOCK
    below = block_cumulative[block - 1] if block else 0.0
    within = np.add.accumulate(weights[start : start + _DRAW_BLOCK], dtype=np.float64)
    return start + _search(within, target - below)


def _weights(values: FloatRow, top: float, inv_t: float) -> npt.NDArray[np.float64]:
    """``exp((values - top) / T)`` in float64: unnormalised probabilities, the top one exactly 1."""
    weights = np.multiply(values, inv_t, dtype=np.float64)
    weights -= top * inv_t  # the top value's own product: its weight is exp(0)
    return np.exp(weights, out=weights)


def _draw_nucleus(
    ids: npt.NDArray[np.intp],
    values: FloatRow,
    *,
    top: float,
    mass: float | None,
    params: SamplingParams,
    u: float,
) -> int:
    """Token drawn from the fewest most likely of ``ids`` holding ``mass``, then min-p.

    ``values`` are the candidates' logits and ``top`` the row max. ``mass`` is top-p of the whole
    distribution's (unnormalised) weight; ``None`` when the candidates are all of it. The
    candidates are ordered most likely first, ties by lower id (``ids`` is ascending), so the
    nucleus is the same whichever candidate set it was cut from; the draw walks that order too.
    """
    inv_t = 1.0 / params.temperature
    # Minus the tempered logits: an ascending stable sort puts the most likely first, ties by lower id.
    weights = np.multiply(values, -inv_t, dtype=np.float64)
    order = weights.argsort(kind="stable")
    weights = weights[order]
    np.subtract(-top * inv_t, weights, out=weights)  # (value - top) / T, exactly 0 for the top
    np.exp(weights, out=weights)
    cumulative = np.add.accumulate(weights)
    if mass is None:
        mass = params.top_p * cumulative[-1]
    count = int(cumulative.searchsorted(mass, side="left")) + 1
    if params.min_p > 0.0:
        # Sorted, the tokens passing min-p (weight >= min_p * the top weight of 1) are a prefix.
        count = min(count, int(weights.shape[0] - weights[::-1].searchsorted(params.min_p, side="left")))
    count = min(count, order.shape[0])
    chosen = int(cumulative.searchsorted(u * cumulative[count - 1], side="right"))
    if chosen >= count:  # rounding put the target on the nucleus's total: search it alone
        chosen = _search(cumulative[:count], u * cumulative[count - 1])
    return int(ids[order[chosen]])
