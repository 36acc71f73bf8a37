"""Prometheus metrics of one server: a registry per app, so two apps in one process never mix.

Exported (``GET /metrics``)::

    infer_requests_total{endpoint, status}        requests by outcome (499: client went away;
                                                  a stream that failed after it began counts
                                                  under the status its error maps to)
    infer_prompt_tokens_total                     prompt tokens of admitted requests
    infer_completion_tokens_total                 tokens generated
    infer_time_to_first_token_seconds             arrival at the server -> first token (queueing included)
    infer_time_per_output_token_seconds           gap between consecutive tokens of a request
    infer_queue_depth                             requests waiting for a free slot
    infer_running_requests                        requests holding a slot
    infer_active_sequences                        sequences the model's scheduler holds (queued or decoding)
    infer_kv_bytes_per_token                      KV cache bytes one token of context takes on this model
    infer_kv_reserved_bytes                       KV cache bytes the running requests reserve (prompt + max_tokens)
    infer_kv_budget_bytes                         the server's KV budget (absent without one)
    infer_prefix_cache_lookups_total              requests that looked for a cached prompt prefix
    infer_prefix_cache_hits_total                 ... and found one
    infer_prefix_cache_hit_rate                   hits per lookup
    infer_prefix_cache_cached_tokens_total        prompt tokens served from the cache, not prefilled
    infer_prefix_cache_evictions_total            cached prefixes dropped to stay within the budget
    (the prefix-cache series are absent when the server runs without a prefix cache)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from infer.prefix_cache import PrefixStats

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

#: Content type of the exposition format.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


@final
class ServerMetrics:
    """The server's counters, histograms and gauges, in their own registry."""

    def __init__(self, active_sequences: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "infer_requests", "HTTP requests by endpoint and outcome status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("infer_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("infer_completion_tokens", "Generated tokens", registry=r)
        self.time_to_first_token = Histogram(
            "infer_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "infer_time_per_output_token_seconds",
            "Seconds between consecutive generated tokens of a request",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("infer_queue_depth", "Requests waiting for a free slot", registry=r)
        self.running = Gauge("infer_running_requests", "Requests holding a slot", registry=r)
        active = Gauge("infer_active_sequences", "Sequences held by the model's scheduler", registry=r)
        # Read at scrape time: the scheduler's own count is the truth about released sequences.
        active.set_function(lambda: float(active_sequences()))
        self.kv_bytes_per_token = Gauge(
            "infer_kv_bytes_per_token", "KV cache bytes one token of context takes", registry=r
        )
        self.kv_reserved_bytes = Gauge(
            "infer_kv_reserved_bytes", "KV cache bytes reserved by running requests", registry=r
        )

    def prefix_cache(self, stats: Callable[[], PrefixStats | None]) -> None:
        """Export the prefix cache's totals, read from ``stats()`` at scrape time (``None``: no cache)."""
        self.registry.register(_PrefixCacheCollector(stats))

    def kv_budget(self, budget_bytes: int) -> None:
        """Export the server's KV budget (only a server with one has the gauge)."""
        Gauge("infer_kv_budget_bytes", "The server's KV cache budget", registry=self.registry).set(budget_bytes)

    def count(self, endpoint: str, status: int) -> None:
        """Record one finished request."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)


@final
class _PrefixCacheCollector(Collector):
    """Reads the engine's own prefix-cache totals at each scrape: they are the truth, counted once."""

    def __init__(self, stats: Callable[[], PrefixStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        for name, text, value in (
            ("lookups", "Requests that looked for a cached prompt prefix", stats.lookups),
            ("hits", "Lookups that found a cached prompt prefix", stats.hits),
            ("cached_tokens", "Prompt tokens served from the prefix cache instead of prefilled", stats.cached_tokens),
            ("evictions", "Cached prefixes released to stay within the budget", stats.evictions),
        ):
            yield CounterMetricFamily(f"infer_prefix_cache_{name}", text, value=value)
        yield GaugeMetricFamily("infer_prefix_cache_hit_rate", "Prefix cache hits per lookup", value=stats.hit_rate)
