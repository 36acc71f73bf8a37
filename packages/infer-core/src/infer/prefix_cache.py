"""Automatic prefix caching: KV caches kept by the token ids they hold, so a request starts from
the longest prefix computed before (the previous chat turn, a shared system prompt).

The index maps chained hashes of fixed-size token blocks to the caches holding those blocks, so a
lookup costs one dict probe per block of the new prompt, whatever the number of caches; the match
is then checked token by token (a hash collision can never give wrong KV) and extended past the
last whole block. Entries are live (a running request's cache: its prompt can be forked while it
decodes) or owned (a finished request's cache, handed over instead of released). Owned entries
count against a byte budget and are evicted least recently used first. A hit is served by the
backend's ``infer_fork`` (contract 1.1), so the request never writes into a cached entry.

Only the scheduler thread calls in, except :meth:`PrefixCache.clear` at close; a lock keeps that
safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, final

import numpy as np
import numpy.typing as npt

from infer.contract import KVCache

__all__ = ["DEFAULT_BUDGET", "PrefixCache", "PrefixHit", "PrefixStats"]

#: Tokens per hashed block of the index.
BLOCK: Final = 16
#: Bytes of KV kept for reuse when ``prefix_cache=True``.
DEFAULT_BUDGET: Final = 512 * 1024 * 1024


@final
@dataclass(slots=True)
class _Entry:
    tokens: npt.NDArray[np.int32]
    kv: KVCache
    #: A running request's cache: it may be forked but not evicted (the request owns it).
    live: bool
    hashes: list[int] = field(default_factory=list)


@final
@dataclass(frozen=True, slots=True)
class PrefixHit:
    """The cache to fork and how many of the prompt's tokens it already holds."""

    kv: KVCache
    length: int


@final
@dataclass(slots=True)
class PrefixStats:
    """Running totals, for usage and metrics."""

    #: Lookups made (one per request that prefilled).
    lookups: int = 0
    #: Lookups that found a cached prefix.
    hits: int = 0
    #: Prompt tokens served from cache instead of prefilled.
    cached_tokens: int = 0
    #: Owned entries released to stay within the budget.
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits per lookup (0 before the first)."""
        return self.hits / self.lookups if self.lookups else 0.0


def _block_hashes(tokens: npt.NDArray[np.int32]) -> Iterator[int]:
    """Chained hashes of the whole blocks of ``tokens``: block i's hash covers blocks 0..i."""
    h = 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        h = hash((h, tokens[start : start + BLOCK].tobytes()))
        yield h


@final
class PrefixCache:
    """KV caches indexed by the token ids they hold, within ``budget`` bytes of owned caches."""

    def __init__(self, budget: int) -> None:
        #: Most bytes of owned (finished requests') caches kept.
        self.budget = budget
        self.stats = PrefixStats()
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id(kv) -> entry, least recent first
        self._by_block: dict[int, dict[int, None]] = {}  # block hash -> ids of entries holding it

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by owned entries."""
        return sum(e.kv.nbytes for e in self._entries.values() if not e.live)

    def lookup(self, prompt: npt.NDArray[np.int32]) -> PrefixHit | None:
        """The cache sharing the longest prefix with ``prompt``, at most ``len(prompt) - 1`` tokens
        (the last prompt token is always fed, for its logits), or ``None`` below one block."""
        with self._lock:
            self.stats.lookups += 1
            candidates: dict[int, None] = {}
            for h in _block_hashes(prompt[: len(prompt) - 1]):
                holders = self._by_block.get(h)
                if not holders:
                    break
                candidates = holders
            best: tuple[int, int] | None = None
            for key in reversed(candidates):  # most recently used first: it wins ties
                entry = self._entries[key]
                n = _common_prefix(entry.tokens, prompt, entry.kv.length, len(prompt) - 1)
                if n >= BLOCK and (best is None or n > best[1]):
                    best = (key, n)
            if best is None:
                return None
            self._entries.move_to_end(best[0])
            self.stats.hits += 1
            self.stats.cached_tokens += best[1]
            return PrefixHit(self._entries[best[0]].kv, best[1])

    def add_live(self, kv: KVCache, tokens: npt.NDArray[np.int32]) -> None:
        """Index a running request's cache, which holds ``tokens``."""
        with self._lock:
            self._put(_Entry(tokens, kv, live=True))

    def worth_keeping(self, length: int) -> bool:
        """Whether a cache of ``length`` tokens could be hit at all (it holds a whole block)."""
        return length >= BLOCK

    def adopt(self, kv: KVCache, tokens: npt.NDArray[np.int32]) -> bool:
        """Take ownership of a finished request's cache holding ``tokens``; return whether it was kept.

        A cache not kept (too short to index, or larger than the whole budget) is left to the
        caller to release. Keeping one may evict older entries.
        """
        with self._lock:
            self._drop(id(kv), release=False)
            if not self.worth_keeping(len(tokens)) or kv.nbytes > self.budget:
                return False
            self._put(_Entry(tokens, kv, live=False))
            self._evict()
            return True

    def forget(self, kv: KVCache) -> None:
        """Stop indexing ``kv`` (a live cache whose request failed: its contents are unknown)."""
        with self._lock:
            self._drop(id(kv), release=False)

    def clear(self) -> None:
        """Release every owned cache and empty the index."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key, release=True)

    def _put(self, entry: _Entry) -> None:
        key = id(entry.kv)
        self._drop(key, release=False)
        entry.hashes = list(_block_hashes(entry.tokens[: entry.kv.length]))
        self._entries[key] = entry
        for h in entry.hashes:
            self._by_block.setdefault(h, {})[key] = None

    def _drop(self, key: int, *, release: bool) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for h in entry.hashes:
            holders = self._by_block.get(h)
            if holders is not None:
                holders.pop(key, None)
                if not holders:
                    del self._by_block[h]
        if release and not entry.live:
            entry.kv.release()

    def _evict(self) -> None:
        total = self.nbytes
        for key in [k for k, e in self._entries.items() if not e.live]:
            if total <= self.budget:
                return
            total -= self._entries[key].kv.nbytes
            self._drop(key, release=True)
            self.stats.evictions += 1


def _common_prefix(a: npt.NDArray[np.int32], b: npt.NDArray[np.int32], a_len: int, b_len: int) -> int:
    n = min(a_len, len(a), b_len)
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n
