"""Prometheus metrics: the only place they are defined and recorded.

Labels stay low-cardinality: alias, provider, model, outcome, reason. Never prompts, users or keys.

Under several worker processes (gunicorn, uvicorn), set PROMETHEUS_MULTIPROC_DIR before they start:
prometheus_client then keeps each process's values in files there, and `multiprocess_registry()` reads the
aggregate of all of them. Counters and histograms sum over every worker that ever ran (a worker that exits
loses no counts); the gauges count live workers only, so a worker marked dead (`mark_process_dead`, from
gunicorn's `child_exit`) takes its in-flight calls, circuit states and config with it:

    in_flight                           livesum         calls under way in all live workers
    worker_processes                    livesum         the live workers (1 each)
    circuit_state                       livemostrecent  the state a live worker recorded last
    config_info                         livemax         each sha256 that some live worker has in force
    config_last_reload_timestamp        livemin         every live worker has (re)loaded at or after this
    ledger_rows_waiting                 livemax         the most rows any live worker has waiting (workers on
                                                        one host share a spool: a sum would count it twice)
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from .config import DEFAULT_BUCKETS

log = logging.getLogger("router")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONFIG_INFO_HELP = "1 for the config in force, by its sha256."
_warned_late_env = False


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode ($PROMETHEUS_MULTIPROC_DIR), or None when off."""
    return os.environ.get(MULTIPROC_ENV) or None


def _check_multiprocess() -> bool:
    """Whether this process records into the multiprocess files; makes their directory if it is missing."""
    global _warned_late_env
    path = multiprocess_dir()
    if path is None:
        return False
    if not getattr(values.ValueClass, "_multiprocess", False):
        if not _warned_late_env:
            _warned_late_env = True
            log.warning(
                "%s was set after prometheus_client was imported, so this process's metrics are not shared with "
                "the other workers: set it in the environment the workers start with (see README)",
                MULTIPROC_ENV,
            )
        return False
    os.makedirs(path, exist_ok=True)
    return True


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
        self.multiprocess = _check_multiprocess()
        kw: dict[str, Any] = {"namespace": namespace, "registry": registry}
        b = self.buckets = tuple(buckets)
        self.requests = Counter("requests_total", "generate() calls by final outcome.", ["alias", "outcome"], **kw)
        self.request_duration = Histogram(
            "request_duration_seconds",
            "Wall time of generate() calls, retries included.",
            ["alias", "outcome"],
            buckets=b,
            **kw,
        )
        self.attempts = Counter(
            "attempts_total", "Requests sent to providers, by outcome.", ["alias", "provider", "model", "outcome"], **kw
        )
        self.attempt_duration = Histogram(
            "attempt_duration_seconds",
            "Wall time of one provider request.",
            ["alias", "provider", "model"],
            buckets=b,
            **kw,
        )
        self.tokens = Counter(
            "tokens_total", "Tokens used by successful calls.", ["alias", "provider", "model", "kind"], **kw
        )
        self.cost = Counter("cost_usd_total", "Cost of successful calls in USD.", ["alias", "provider", "model"], **kw)
        self.cost_unknown = Counter(
            "cost_unknown_total",
            "Successful calls whose price is unknown (counted as 0 USD).",
            ["alias", "provider", "model"],
            **kw,
        )
        self.fallbacks = Counter(
            "fallbacks_total",
            "Moves from one target to the next.",
            ["alias", "from_provider", "to_provider", "reason"],
            **kw,
        )
        self.skipped = Counter(
            "skipped_total", "Targets passed over without a request.", ["alias", "provider", "model", "reason"], **kw
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Streaming: time from request to the first text.",
            ["alias", "provider", "model"],
            buckets=b,
            **kw,
        )
        self.stream_interrupted = Counter(
            "stream_interrupted_total",
            "Streams that broke off after text had been yielded.",
            ["alias", "provider", "model"],
            **kw,
        )
        self.key_requests = Counter(
            "key_requests_total",
            "Requests sent with each key (its name or a short hash, never the key).",
            ["provider", "key"],
            **kw,
        )
        self.circuit_state = Gauge(
            "circuit_state",
            "Breaker of each target: 0 closed, 1 half-open, 2 open.",
            ["provider", "model"],
            multiprocess_mode="livemostrecent",
            **kw,
        )
        self.circuit_transitions = Counter(
            "circuit_transitions_total", "Breaker state changes.", ["provider", "model", "to"], **kw
        )
        self.config_reloads = Counter("config_reloads_total", "Config reloads by result.", ["result"], **kw)
        self.config_info = Gauge("config_info", CONFIG_INFO_HELP, ["sha256"], multiprocess_mode="livemax", **kw)
        self.config_last_reload = Gauge(
            "config_last_reload_timestamp_seconds",
            "Unix time of the last successful config (re)load.",
            multiprocess_mode="livemin",
            **kw,
        )
        self.budget_remaining_usd = Gauge(
            "budget_remaining_usd",
            "USD left in each budget's current period, as last settled (per-tag budgets: not reported).",
            ["budget"],
            multiprocess_mode="livemin",
            **kw,
        )
        self.budget_rejections = Counter(
            "budget_rejections_total",
            "Requests a budget refused or rerouted before sending, by reason (limit, unpriced, unavailable, deadline).",
            ["budget", "reason"],
            **kw,
        )
        self.ledger_rows_dropped = Counter(
            "ledger_rows_dropped_total",
            "Ledger rows that reached no database, by reason (rejected: refused for their content, kept in the "
            "dead-letter file; queue_full: no room left in memory; torn: a spool line torn by a crash; closed: "
            "still in memory when the ledger closed).",
            ["reason"],
            **kw,
        )
        self.ledger_rows_waiting = Gauge(
            "ledger_rows_waiting",
            "Ledger rows a failed write left waiting for the database, in the spool file and in memory.",
            multiprocess_mode="livemax",
            **kw,
        )
        self.in_flight = Gauge("in_flight", "generate() calls under way.", ["alias"], multiprocess_mode="livesum", **kw)
        self.cache_hits = Counter("cache_hits_total", "Calls answered from the response cache.", ["alias"], **kw)
        self.cache_misses = Counter(
            "cache_misses_total", "Calls the response cache could not answer (sent to a provider).", ["alias"], **kw
        )
        self.cost_saved = Counter(
            "cost_saved_usd_total",
            "USD the cached answers cost when first bought, saved by serving them again.",
            ["alias", "provider", "model"],
            **kw,
        )
        self.hedges = Counter(
            "hedges_total",
            "Extra (hedged) requests sent because a request was slow.",
            ["alias", "provider", "model"],
            **kw,
        )
        self.hedge_wins = Counter(
            "hedge_wins_total", "Hedged requests that answered first.", ["alias", "provider", "model"], **kw
        )
        self.worker_processes = Gauge(
            "worker_processes",
            "Live processes recording these metrics (more than you run: exited workers are not marked dead).",
            multiprocess_mode="livesum",
            **kw,
        )
        self.worker_processes.set(1)
        self.state_store_up = Gauge(
            "state_store_up",
            "1 while the shared health-state store (state.backend) answers, 0 while calls go on with local state.",
            ["backend"],
            multiprocess_mode="livemin",
            **kw,
        )
        self.state_store_errors = Counter(
            "state_store_errors_total", "Failed exchanges with the shared health-state store.", ["backend"], **kw
        )
        self.gateway_responses = Counter(
            "gateway_responses_total",
            "HTTP answers of the gateway (llm-router serve, openai_client()) by route and status (499: client left).",
            ["route", "status"],
            **kw,
        )

    _shared: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, dict[str, RouterMetrics]]] = (
        weakref.WeakKeyDictionary()
    )
    _lock = threading.Lock()

    @classmethod
    def on(
        cls,
        registry: CollectorRegistry | None = None,
        namespace: str = "llm_router",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> RouterMetrics:
        """The metrics of `registry` (default: prometheus_client's), created once; Routers sharing it share them."""
        registry = REGISTRY if registry is None else registry
        with cls._lock:
            per_ns = cls._shared.setdefault(registry, {})
            if namespace not in per_ns:
                per_ns[namespace] = cls(registry, namespace, buckets)
            elif per_ns[namespace].buckets != tuple(buckets):
                log.warning("metrics %r already exist on this registry with other buckets; keeping those", namespace)
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
        self,
        alias: str,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cost_usd: float,
        cost_known: bool,
    ) -> None:
        """A successful answer's tokens and cost."""
        self.tokens.labels(alias, provider, model, "input").inc(input_tokens)
        self.tokens.labels(alias, provider, model, "output").inc(output_tokens)
        self.cost.labels(alias, provider, model).inc(cost_usd)
        if not cost_known:
            self.cost_unknown.labels(alias, provider, model).inc()

    def first_token(self, alias: str, provider: str, model: str, seconds: float) -> None:
        """A stream delivered its first text after `seconds`."""
        self.ttft.labels(alias, provider, model).observe(seconds)

    def interrupted(self, alias: str, provider: str, model: str) -> None:
        """A stream broke off after text had been yielded."""
        self.stream_interrupted.labels(alias, provider, model).inc()

    def fallback(self, alias: str, from_provider: str, to_provider: str, reason: str) -> None:
        """The call moved from one target to the next because of `reason` (a failure outcome)."""
        self.fallbacks.labels(alias, from_provider, to_provider, reason).inc()

    def skip(self, alias: str, provider: str, model: str, reason: str) -> None:
        """A target was passed over without a request."""
        self.skipped.labels(alias, provider, model, reason).inc()

    def key_used(self, provider: str, key: str) -> None:
        """A request went out with the key named `key`."""
        self.key_requests.labels(provider, key).inc()

    def circuit(self, provider: str, model: str, state: str, value: int, transition: bool) -> None:
        """A breaker is in `state` (value 0/1/2); `transition`: it just changed to it."""
        self.circuit_state.labels(provider, model).set(value)
        if transition:
            self.circuit_transitions.labels(provider, model, state).inc()

    def cache_lookup(self, alias: str, hit: bool) -> None:
        """The response cache answered a call (`hit`) or did not."""
        (self.cache_hits if hit else self.cache_misses).labels(alias).inc()

    def cache_saved(self, alias: str, provider: str, model: str, cost_usd: float) -> None:
        """A cached answer served again saved what it cost when first bought."""
        self.cost_saved.labels(alias, provider, model).inc(cost_usd)

    def hedged(self, alias: str, provider: str, model: str) -> None:
        """An extra request went to this target because the call's earlier request was slow."""
        self.hedges.labels(alias, provider, model).inc()

    def hedge_won(self, alias: str, provider: str, model: str) -> None:
        """A hedged request answered first."""
        self.hedge_wins.labels(alias, provider, model).inc()

    def gateway_response(self, route: str, status: int) -> None:
        """The gateway answered a request to `route` (a fixed set of names) with `status`."""
        self.gateway_responses.labels(route, str(status)).inc()

    def state_store(self, backend: str, up: bool, failed: bool) -> None:
        """The shared state store answered (`up`) or not; `failed`: count one failed exchange."""
        self.state_store_up.labels(backend).set(1 if up else 0)
        if failed:
            self.state_store_errors.labels(backend).inc()

    def budget_rejected(self, budget: str, reason: str) -> None:
        """A budget refused (or rerouted) a request before it was sent."""
        self.budget_rejections.labels(budget, reason).inc()

    def budget_remaining(self, budget: str, usd: float) -> None:
        """What is left of a budget's current period."""
        self.budget_remaining_usd.labels(budget).set(usd)

    def ledger_dropped(self, reason: str, rows: int) -> None:
        """Ledger rows that reached no database (0: make the series exist)."""
        self.ledger_rows_dropped.labels(reason).inc(rows)

    def ledger_waiting(self, rows: int) -> None:
        """Ledger rows waiting for the database after a failed write."""
        self.ledger_rows_waiting.set(rows)

    def reload_result(self, ok: bool) -> None:
        """A config reload was applied or rejected."""
        self.config_reloads.labels("success" if ok else "error").inc()

    def config_in_force(self, sha256: str, previous: str | None, when: float) -> None:
        """The config with this sha256 is now in force (replacing `previous`)."""
        if previous is not None and previous != sha256:
            if self.multiprocess:
                # The worker's file cannot forget a series: 0 says "not in force here", and
                # multiprocess_registry() shows no sha256 that no live worker has at 1.
                self.config_info.labels(previous).set(0)
            else:
                with warnings.catch_warnings():  # it warns whenever the variable is set, even set too late to act
                    warnings.simplefilter("ignore", UserWarning)
                    try:
                        self.config_info.remove(previous)
                    except KeyError:  # another Router on this registry already removed it
                        pass
        self.config_info.labels(sha256).set(1)
        self.config_last_reload.set(when)


# -- several worker processes ------------------------------------------------------------------------------


class _LiveWorkers(MultiProcessCollector):
    """prometheus_client's MultiProcessCollector, less the config_info series that no live worker has in force."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():  # type: ignore[no-untyped-call]
            if metric.type == "gauge" and metric.documentation == CONFIG_INFO_HELP:
                metric.samples = [s for s in metric.samples if s.value != 0]
            yield metric


_mp_registries: dict[str, CollectorRegistry] = {}


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry that reads the metrics of every worker from the multiprocess directory `path`."""
    with RouterMetrics._lock:
        if path not in _mp_registries:
            os.makedirs(path, exist_ok=True)
            registry = CollectorRegistry()
            _LiveWorkers(registry, path=path)  # type: ignore[no-untyped-call]
            _mp_registries[path] = registry
        return _mp_registries[path]
