"""Prometheus metrics: the only place they are defined and recorded.

Labels stay low-cardinality: alias, provider, model, outcome, reason. Never prompts, users or keys.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .config import DEFAULT_BUCKETS


class RouterMetrics:
    """The router's metrics on one registry. Use `RouterMetrics.on(registry)`: one set per registry + namespace."""

    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        namespace: str = "llm_router",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.registry = registry
        self.namespace = namespace
        kw = {"namespace": namespace, "registry": registry}
        b = tuple(buckets)
        self.requests = Counter("requests_total", "generate() calls by final outcome.", ["alias", "outcome"], **kw)
        self.request_duration = Histogram(
            "request_duration_seconds", "Wall time of generate() calls, retries included.", ["alias", "outcome"],
            buckets=b, **kw,
        )
        self.attempts = Counter(
            "attempts_total", "Requests sent to providers, by outcome.", ["alias", "provider", "model", "outcome"], **kw
        )
        self.attempt_duration = Histogram(
            "attempt_duration_seconds", "Wall time of one provider request.", ["alias", "provider", "model"],
            buckets=b, **kw,
        )
        self.tokens = Counter(
            "tokens_total", "Tokens used by successful calls.", ["alias", "provider", "model", "kind"], **kw
        )
        self.cost = Counter("cost_usd_total", "Cost of successful calls in USD.", ["alias", "provider", "model"], **kw)
        self.cost_unknown = Counter(
            "cost_unknown_total", "Successful calls whose price is unknown (counted as 0 USD).",
            ["alias", "provider", "model"], **kw,
        )
        self.fallbacks = Counter(
            "fallbacks_total", "Moves from one target to the next.", ["alias", "from_provider", "to_provider", "reason"],
            **kw,
        )
        self.skipped = Counter(
            "skipped_total", "Targets passed over without a request.", ["alias", "provider", "model", "reason"], **kw
        )
        self.in_flight = Gauge(
            "in_flight", "generate() calls under way.", ["alias"], multiprocess_mode="livesum", **kw
        )

    _shared: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, RouterMetrics]] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    @classmethod
    def on(
        cls, registry: CollectorRegistry | None = None, namespace: str = "llm_router",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> RouterMetrics:
        """The metrics of `registry` (default: prometheus_client's), created once; Routers sharing it share them."""
        registry = REGISTRY if registry is None else registry
        with cls._lock:
            per_ns = cls._shared.setdefault(registry, {})
            if namespace not in per_ns:
                per_ns[namespace] = cls(registry, namespace, buckets)
            return per_ns[namespace]

    # -- recording ----------------------------------------------------------------------------------------

    def request_started(self, alias: str) -> None:
        """A generate() call began."""
        self.in_flight.labels(alias).inc()

    def request_finished(self, alias: str, outcome: str, duration_s: float) -> None:
        """A generate() call ended with `outcome` (success or the final error outcome)."""
        self.in_flight.labels(alias).dec()
        self.requests.labels(alias, outcome).inc()
        self.request_duration.labels(alias, outcome).observe(duration_s)

    def attempt(self, alias: str, provider: str, model: str, outcome: str, duration_s: float) -> None:
        """One provider request ended."""
        self.attempts.labels(alias, provider, model, outcome).inc()
        self.attempt_duration.labels(alias, provider, model).observe(duration_s)

    def answered(
        self, alias: str, provider: str, model: str, input_tokens: int, output_tokens: int, cost_usd: float,
        cost_known: bool,
    ) -> None:
        """A successful answer's tokens and cost."""
        self.tokens.labels(alias, provider, model, "input").inc(input_tokens)
        self.tokens.labels(alias, provider, model, "output").inc(output_tokens)
        self.cost.labels(alias, provider, model).inc(cost_usd)
        if not cost_known:
            self.cost_unknown.labels(alias, provider, model).inc()

    def fallback(self, alias: str, from_provider: str, to_provider: str, reason: str) -> None:
        """The call moved from one target to the next because of `reason` (a failure outcome)."""
        self.fallbacks.labels(alias, from_provider, to_provider, reason).inc()

    def skip(self, alias: str, provider: str, model: str, reason: str) -> None:
        """A target was passed over without a request."""
        self.skipped.labels(alias, provider, model, reason).inc()
