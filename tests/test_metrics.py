"""Metrics: exact values after a scripted sequence of calls, read back from real exposition text.

Every expectation is derived from `SCRIPT` (the replies the upstream gives and the outcome each one must
have), `TARGETS` and `PRICING`; the tests parse `generate_latest()` output (and once a real /metrics
endpoint) rather than peeking at the metric objects.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import KEY_A, KEY_B, KEY_C, MakeRouter, Sleeps
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router import (
    AllTargetsFailedError,
    MissingCredentialsError,
    ProviderError,
    Router,
    start_metrics_server,
)
from router.config import DEFAULT_BUCKETS
from router.sandbox import Received, Reply, Upstream

PROMPT = "zebra-quartz-7731 PROMPT that must never become a label"
KEYS = (KEY_A, KEY_B, KEY_C)

# The family name (as the parser reports it: counters without _total) and type of every metric.
METRICS = {
    "requests": "counter",
    "request_duration_seconds": "histogram",
    "attempts": "counter",
    "attempt_duration_seconds": "histogram",
    "tokens": "counter",
    "cost_usd": "counter",
    "cost_unknown": "counter",
    "fallbacks": "counter",
    "skipped": "counter",
    "in_flight": "gauge",
    "key_requests": "counter",
    "time_to_first_token_seconds": "histogram",
    "stream_interrupted": "counter",
    "circuit_state": "gauge",
    "circuit_transitions": "counter",
    "config_reloads": "counter",
    "config_info": "gauge",
    "config_last_reload_timestamp_seconds": "gauge",
    "cache_hits": "counter",
    "cache_misses": "counter",
    "cost_saved_usd": "counter",
    "hedges": "counter",
    "hedge_wins": "counter",
    "worker_processes": "gauge",
    "state_store_up": "gauge",
    "state_store_errors": "counter",
    "budget_remaining_usd": "gauge",
    "budget_rejections": "counter",
    "gateway_responses": "counter",
    "ledger_rows_dropped": "counter",
    "ledger_rows_waiting": "gauge",
}
KEY_OF = {"a": KEY_A, "b": KEY_B, "c": KEY_C}


def key_label(secret: str) -> str:
    """The label an unnamed key gets: a short hash, never the key."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]

# -- the sequence config ----------------------------------------------------------------------------------

TARGETS: dict[str, list[tuple[str, str]]] = {
    "chat": [("a", "model-a"), ("b", "model-b"), ("c", "model-c")],
    "locked": [("d", "model-d")],  # d's key variable is unset: always skipped
    "unpriced": [("c", "model-x")],  # no pricing, and not in litellm's price map
}
NO_KEY = {"d"}
PRICING: dict[str, dict[str, float]] = {
    "a/model-a": {"input_per_1m": 3.0, "output_per_1m": 15.0},
    "b/model-b": {"input_per_1k": 0.5, "output_per_1k": 1.5},
    "c/model-c": {"input_per_1m": 7.0, "output_per_1m": 9.0},
}


def _sequence_config() -> str:
    def flow(d: Mapping[str, float]) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"

    providers = "\n".join(
        f'  {p}: {{kind: openai, api_base: "{{UP}}/{p}/v1", api_key: "${{KEY_{p.upper()}}}"}}' for p in "abcd"
    )
    aliases = "\n".join(
        f"  {name}: {{targets: [{', '.join(f'{p}/{m}' for p, m in targets)}]}}" for name, targets in TARGETS.items()
    )
    pricing = "\n".join(f"  {key}: {flow(p)}" for key, p in PRICING.items())
    return (
        "version: 1\n"
        "defaults:\n"
        "  model: chat\n"
        "  timeout_s: 5\n"
        "  deadline_s: 20\n"
        "  retry: {attempts: 2, backoff_s: 0.1, max_backoff_s: 2}\n"
        f"providers:\n{providers}\n"
        f"aliases:\n{aliases}\n"
        f"pricing:\n{pricing}\n"
    )


SEQUENCE_CONFIG = _sequence_config()


def model_of(alias: str, provider: str) -> str:
    return dict(TARGETS[alias])[provider]


def price_of(provider: str, model: str, usage: tuple[int, int]) -> float | None:
    p = PRICING.get(f"{provider}/{model}")
    if p is None:
        return None
    if "input_per_1m" in p:
        return usage[0] * p["input_per_1m"] / 1e6 + usage[1] * p["output_per_1m"] / 1e6
    return usage[0] * p["input_per_1k"] / 1e3 + usage[1] * p["output_per_1k"] / 1e3


# -- the script -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One request the upstream receives: which provider, its scripted reply, the attempt outcome it must get."""

    provider: str
    reply: Reply
    outcome: str


@dataclass(frozen=True)
class Call:
    """One generate() call: the alias, the requests it makes, its final outcome and what it raises."""

    alias: str
    steps: tuple[Step, ...]
    outcome: str
    raises: type[Exception] | None = None


def ok(usage: tuple[int, int]) -> Reply:
    return Reply(usage=usage, text="fine")


# The upstream's error texts echo the prompt and a key, so a label built from an error message would leak.
LEAKY = f"rejected {PROMPT} for key {KEY_A}"

SCRIPT: tuple[Call, ...] = (
    # 1: rate limited once (Retry-After 0), then answered on the retry
    Call("chat", (
        Step("a", Reply(status=429, headers={"Retry-After": "0"}, error=LEAKY), "rate_limit"),
        Step("a", ok((11, 7)), "success"),
    ), "success"),
    # 2: a fails twice (retries exhausted), falls back to b which answers
    Call("chat", (
        Step("a", Reply(status=503, error=LEAKY), "server_error"),
        Step("a", Reply(status=503, error=LEAKY), "server_error"),
        Step("b", ok((13, 17)), "success"),
    ), "success"),
    # 3: a rejects the request: no retry, no fallback
    Call("chat", (Step("a", Reply(status=400, error=LEAKY), "bad_request"),), "bad_request", ProviderError),
    # 4: every target fails twice
    Call("chat", tuple(
        Step(p, Reply(status=500, error=LEAKY), "server_error") for p in ("a", "a", "b", "b", "c", "c")
    ), "server_error", AllTargetsFailedError),
    # 5: the only target has no key: no request at all
    Call("locked", (), "no_credentials", MissingCredentialsError),
    # 6: answered by a model with no known price
    Call("unpriced", (Step("c", ok((19, 23)), "success"),), "success"),
)


Series = dict[tuple[str, ...], float]


@dataclass
class Expected:
    """Every labelled series the script must produce, keyed by label values in the metric's label order."""

    requests: Counter[tuple[str, ...]] = field(default_factory=Counter)
    attempts: Counter[tuple[str, ...]] = field(default_factory=Counter)
    attempt_counts: Counter[tuple[str, ...]] = field(default_factory=Counter)
    tokens: Counter[tuple[str, ...]] = field(default_factory=Counter)
    cost: dict[tuple[str, ...], float] = field(default_factory=dict)
    cost_unknown: Counter[tuple[str, ...]] = field(default_factory=Counter)
    fallbacks: Counter[tuple[str, ...]] = field(default_factory=Counter)
    skipped: Counter[tuple[str, ...]] = field(default_factory=Counter)
    in_flight: dict[tuple[str, ...], float] = field(default_factory=dict)


def expected_from(script: Sequence[Call]) -> Expected:
    e = Expected()
    for call in script:
        alias = call.alias
        e.requests[alias, call.outcome] += 1
        e.in_flight[(alias,)] = 0.0
        for provider, model in TARGETS[alias]:
            if provider in NO_KEY:
                e.skipped[alias, provider, model, "no_credentials"] += 1
        for prev, step in zip((None, *call.steps), call.steps, strict=False):
            model = model_of(alias, step.provider)
            e.attempts[alias, step.provider, model, step.outcome] += 1
            e.attempt_counts[alias, step.provider, model] += 1
            if prev is not None and prev.provider != step.provider:
                e.fallbacks[alias, prev.provider, step.provider, prev.outcome] += 1
            if step.outcome == "success":
                assert step.reply.usage is not None
                e.tokens[alias, step.provider, model, "input"] += step.reply.usage[0]
                e.tokens[alias, step.provider, model, "output"] += step.reply.usage[1]
                cost = price_of(step.provider, model, step.reply.usage)
                e.cost[alias, step.provider, model] = e.cost.get((alias, step.provider, model), 0.0) + (cost or 0.0)
                if cost is None:
                    e.cost_unknown[alias, step.provider, model] += 1
    return e


def enqueue(up: Upstream, call: Call) -> None:
    for step in call.steps:
        up.enqueue(step.provider, step.reply)


def check_call(up: Upstream, call: Call, attempts: Iterable[Any]) -> None:
    """The router saw what the script says, and the upstream served exactly the scripted replies."""
    assert [(a.provider, a.outcome) for a in attempts] == [(s.provider, s.outcome) for s in call.steps]
    assert all(up.route(p).pending == 0 for p in "abcd")


def run_sync(router: Router, up: Upstream, script: Sequence[Call] = SCRIPT) -> None:
    for call in script:
        enqueue(up, call)
        if call.raises is None:
            res = router.generate(PROMPT, model=call.alias)
            assert res.provider == call.steps[-1].provider
            check_call(up, call, res.attempts)
        else:
            with pytest.raises(call.raises) as info:
                router.generate(PROMPT, model=call.alias)
            check_call(up, call, getattr(info.value, "attempts", ()))


async def run_async(router: Router, up: Upstream, script: Sequence[Call] = SCRIPT) -> None:
    for call in script:
        enqueue(up, call)
        if call.raises is None:
            res = await router.agenerate(PROMPT, model=call.alias)
            assert res.provider == call.steps[-1].provider
            check_call(up, call, res.attempts)
        else:
            with pytest.raises(call.raises) as info:
                await router.agenerate(PROMPT, model=call.alias)
            check_call(up, call, getattr(info.value, "attempts", ()))


# -- reading the exposition -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


@dataclass
class Exposition:
    """Parsed exposition text: family name → type, and every sample (the `_created` ones left out)."""

    text: str
    types: dict[str, str]
    samples: list[Sample]

    @classmethod
    def parse(cls, text: str) -> Exposition:
        types: dict[str, str] = {}
        samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):  # the text format exposes creation times as separate gauges
                continue
            types[family.name] = family.type
            for s in family.samples:
                if not s.name.endswith("_created"):
                    samples.append(Sample(s.name, dict(s.labels), s.value))
        return cls(text, types, samples)

    def series(self, name: str, labels: Sequence[str]) -> Series:
        """Samples called `name`, keyed by the values of `labels`, which must be exactly their label names."""
        out: Series = {}
        for s in self.samples:
            if s.name == name:
                assert set(s.labels) == set(labels), f"{name} has labels {sorted(s.labels)}, expected {sorted(labels)}"
                key = tuple(s.labels[k] for k in labels)
                assert key not in out, f"{name}{key} appears twice"
                out[key] = s.value
        return out

    def histogram(self, name: str, labels: Sequence[str], buckets: Sequence[float]) -> dict[tuple[str, ...], float]:
        """Check every series of histogram `name` (buckets, cumulative, +Inf = _count, _sum > 0); return _count."""
        counts = self.series(f"{name}_count", labels)
        sums = self.series(f"{name}_sum", labels)
        assert set(sums) == set(counts)
        by_series: dict[tuple[str, ...], list[tuple[float, float]]] = {}
        for s in self.samples:
            if s.name == f"{name}_bucket":
                assert set(s.labels) == {*labels, "le"}
                by_series.setdefault(tuple(s.labels[k] for k in labels), []).append((float(s.labels["le"]), s.value))
        assert set(by_series) == set(counts)
        for key, count in counts.items():
            bucket_list = sorted(by_series[key])
            assert [le for le, _ in bucket_list] == [*map(float, buckets), math.inf], key
            values = [v for _, v in bucket_list]
            assert values == sorted(values), f"{name}{key} buckets are not cumulative: {values}"
            assert values[-1] == count, f"{name}{key}: +Inf bucket {values[-1]} != _count {count}"
            assert sums[key] > 0, f"{name}{key}: _sum is {sums[key]}"
        return counts

    def without_durations(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample except histogram buckets and sums (wall times differ between runs); counts stay."""
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for s in self.samples
            if not s.name.endswith(("_bucket", "_sum", "_timestamp_seconds"))
        }


def scrape(registry: CollectorRegistry) -> Exposition:
    return Exposition.parse(generate_latest(registry).decode())


def scrape_http(registry: CollectorRegistry) -> Exposition:
    server, thread = start_metrics_server(port=0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return Exposition.parse(text)


def as_float(counter: Mapping[tuple[str, ...], float]) -> Series:
    return {k: float(v) for k, v in counter.items()}


def assert_sequence(x: Exposition, script: Sequence[Call] = SCRIPT, ns: str = "llm_router") -> None:
    """Every sample of every metric is exactly what `script` implies, and nothing else is there."""
    e = expected_from(script)
    assert x.types == {f"{ns}_{name}": kind for name, kind in METRICS.items()}

    assert x.series(f"{ns}_requests_total", ["alias", "outcome"]) == as_float(e.requests)
    assert x.histogram(f"{ns}_request_duration_seconds", ["alias", "outcome"], DEFAULT_BUCKETS) == as_float(e.requests)

    attempts = x.series(f"{ns}_attempts_total", ["alias", "provider", "model", "outcome"])
    assert attempts == as_float(e.attempts)
    assert {(p, o) for _, p, _, o in attempts} == {(s.provider, s.outcome) for c in script for s in c.steps}
    assert x.histogram(
        f"{ns}_attempt_duration_seconds", ["alias", "provider", "model"], DEFAULT_BUCKETS
    ) == as_float(e.attempt_counts)

    assert x.series(f"{ns}_tokens_total", ["alias", "provider", "model", "kind"]) == as_float(e.tokens)
    cost = x.series(f"{ns}_cost_usd_total", ["alias", "provider", "model"])
    assert set(cost) == set(e.cost)
    for key, usd in e.cost.items():
        assert cost[key] == pytest.approx(usd, rel=1e-9, abs=1e-15), key
    assert x.series(f"{ns}_cost_unknown_total", ["alias", "provider", "model"]) == as_float(e.cost_unknown)
    assert x.series(
        f"{ns}_fallbacks_total", ["alias", "from_provider", "to_provider", "reason"]
    ) == as_float(e.fallbacks)
    assert x.series(f"{ns}_skipped_total", ["alias", "provider", "model", "reason"]) == as_float(e.skipped)
    assert x.series(f"{ns}_in_flight", ["alias"]) == e.in_flight

    per_provider: Counter[str] = Counter()
    for (_, provider, _, _), n in e.attempts.items():
        per_provider[provider] += n
    expected_keys = {(p, key_label(KEY_OF[p])): float(n) for p, n in per_provider.items()}
    assert x.series(f"{ns}_key_requests_total", ["provider", "key"]) == expected_keys
    # No breaker changed state in this sequence, no reload happened, and one config is in force.
    assert x.series(f"{ns}_circuit_state", ["provider", "model"]) == {}
    assert x.series(f"{ns}_circuit_transitions_total", ["provider", "model", "to"]) == {}
    assert x.series(f"{ns}_config_reloads_total", ["result"]) == {}
    # Nothing here streamed.
    assert x.series(f"{ns}_stream_interrupted_total", ["alias", "provider", "model"]) == {}
    assert x.series(f"{ns}_time_to_first_token_seconds_count", ["alias", "provider", "model"]) == {}
    assert list(x.series(f"{ns}_config_info", ["sha256"]).values()) == [1.0]

    # Nothing but the metrics above, with nothing but their histogram series.
    known = {f"{ns}_{n}{suffix}" for n in METRICS for suffix in ("", "_total", "_count", "_sum", "_bucket")}
    assert {s.name for s in x.samples} <= known
    assert_no_leaks(x)


def assert_no_leaks(x: Exposition) -> None:
    for s in x.samples:
        for value in s.labels.values():
            assert PROMPT not in value and "zebra" not in value, (s.name, value)
            assert not any(key in value for key in KEYS), (s.name, value)
    assert "zebra" not in x.text
    assert not any(key in x.text for key in KEYS)


# -- the sequence, sync and async -------------------------------------------------------------------------


def test_script_is_what_the_sequence_needs() -> None:
    e = expected_from(SCRIPT)
    assert {outcome for _, outcome in e.requests} == {"success", "bad_request", "server_error", "no_credentials"}
    assert e.fallbacks and e.skipped and e.cost_unknown and e.cost
    assert any(s.reply.status == 429 for c in SCRIPT for s in c.steps)


def test_sync_sequence_sets_every_metric_exactly(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    router = make_router(SEQUENCE_CONFIG)
    run_sync(router, up)
    assert len(up.history) == sum(len(c.steps) for c in SCRIPT)
    assert all(r.prompt == PROMPT for r in up.history)

    text = scrape(registry)
    assert_sequence(text)

    served = scrape_http(registry)
    assert_sequence(served)
    assert served.without_durations() == text.without_durations()
    assert sorted((s.name, sorted(s.labels.items()), s.value) for s in served.samples) == sorted(
        (s.name, sorted(s.labels.items()), s.value) for s in text.samples
    )


@pytest.mark.asyncio
async def test_async_sequence_sets_every_metric_exactly(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    router = make_router(SEQUENCE_CONFIG)
    await run_async(router, up)
    assert_sequence(scrape(registry))


@pytest.mark.asyncio
async def test_async_records_the_same_samples_as_sync(make_router: MakeRouter, up: Upstream, sleeps: Sleeps) -> None:
    sync_router = make_router(SEQUENCE_CONFIG)
    async_registry = CollectorRegistry()
    async_router = Router(
        sync_router.config, registry=async_registry, sleep=sleeps.sleep, asleep=sleeps.asleep, jitter=lambda: 0.5
    )
    await asyncio.to_thread(run_sync, sync_router, up)
    sync_sleeps = list(sleeps)
    sleeps.clear()
    await run_async(async_router, up)

    sync_samples = scrape(sync_router.metrics.registry).without_durations()
    async_samples = scrape(async_registry).without_durations()
    assert sync_samples == async_samples
    assert len(async_samples) > len(METRICS)
    assert list(sleeps) == sync_sleeps


# -- config: namespace and buckets ------------------------------------------------------------------------

CUSTOM_BUCKETS = (0.5, 1.5, 7.0)


def test_custom_namespace_and_buckets_from_config(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    buckets = ", ".join(map(str, CUSTOM_BUCKETS))
    router = make_router(extra=f"metrics: {{namespace: myns, buckets: [{buckets}]}}")
    usage = (5, 3)
    up.enqueue("a", Reply(usage=usage))
    router.generate(PROMPT, model="single")

    x = scrape(registry)
    assert x.types == {f"myns_{name}": kind for name, kind in METRICS.items()}
    assert not any(s.name.startswith("llm_router") for s in x.samples)
    assert x.series("myns_requests_total", ["alias", "outcome"]) == {("single", "success"): 1.0}
    assert x.histogram("myns_request_duration_seconds", ["alias", "outcome"], CUSTOM_BUCKETS) == {
        ("single", "success"): 1.0
    }
    assert x.histogram("myns_attempt_duration_seconds", ["alias", "provider", "model"], CUSTOM_BUCKETS) == {
        ("single", "a", "model-a"): 1.0
    }
    assert x.series("myns_tokens_total", ["alias", "provider", "model", "kind"]) == {
        ("single", "a", "model-a", "input"): float(usage[0]),
        ("single", "a", "model-a", "output"): float(usage[1]),
    }
    les = {s.labels["le"] for s in x.samples if s.name.endswith("_bucket")}
    assert {float(le) for le in les} == {*CUSTOM_BUCKETS, math.inf}


# -- registries -------------------------------------------------------------------------------------------


def test_routers_on_one_registry_share_metrics_and_separate_registries_stay_apart(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, sleeps: Sleeps
) -> None:
    first = make_router()
    second = make_router()  # same registry: must not raise "Duplicated timeseries"
    other_registry = CollectorRegistry()
    other = Router(first.config, registry=other_registry, sleep=sleeps.sleep, jitter=lambda: 0.5)

    calls = [(first, "chat", (2, 3)), (second, "chat", (5, 7)), (second, "single", (11, 13)), (other, "chat", (17, 19))]
    for router, alias, usage in calls:
        up.enqueue("a", Reply(usage=usage))
        assert router.generate(PROMPT, model=alias).provider == "a"

    for reg, routers in ((registry, {first, second}), (other_registry, {other})):
        mine = [(alias, usage) for router, alias, usage in calls if router in routers]
        x = scrape(reg)
        assert x.series("llm_router_requests_total", ["alias", "outcome"]) == as_float(
            Counter((alias, "success") for alias, _ in mine)
        )
        assert x.series("llm_router_attempts_total", ["alias", "provider", "model", "outcome"]) == as_float(
            Counter((alias, "a", "model-a", "success") for alias, _ in mine)
        )
        tokens: Counter[tuple[str, ...]] = Counter()
        for alias, (i, o) in mine:
            tokens[alias, "a", "model-a", "input"] += i
            tokens[alias, "a", "model-a", "output"] += o
        assert x.series("llm_router_tokens_total", ["alias", "provider", "model", "kind"]) == as_float(tokens)
        assert x.series("llm_router_in_flight", ["alias"]) == {(alias,): 0.0 for alias, _ in mine}

    # A third Router on the shared registry neither fails nor resets what is there.
    before = scrape(registry).without_durations()
    make_router()
    assert scrape(registry).without_durations() == before


# -- in flight --------------------------------------------------------------------------------------------


class Gate:
    """A reply source that holds the request at the upstream until released, so a call stays in flight."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()

    def __call__(self, received: Received) -> Reply:
        self.arrived.set()
        self.release.wait(10)
        return Reply(usage=(1, 1))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def in_flight(registry: CollectorRegistry) -> Series:
    return scrape(registry).series("llm_router_in_flight", ["alias"])


def test_in_flight_is_one_during_a_sync_call_and_zero_after(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    router = make_router()
    gate = Gate()
    up.enqueue("a", gate)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(router.generate, PROMPT, model="single")
        try:
            assert wait_until(lambda: gate.arrived.is_set() or future.done())
            assert not future.done()
            during = in_flight(registry)
        finally:
            gate.release.set()
        assert future.result(timeout=10).provider == "a"
    assert during == {("single",): 1.0}
    assert in_flight(registry) == {("single",): 0.0}
    assert scrape(registry).series("llm_router_requests_total", ["alias", "outcome"]) == {("single", "success"): 1.0}


@pytest.mark.asyncio
async def test_in_flight_async_and_back_to_zero_after_cancel(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    router = make_router()
    held_on_a, held_on_b = Gate(), Gate()
    up.enqueue("a", held_on_a)
    up.enqueue("b", held_on_b)
    to_cancel = asyncio.create_task(router.agenerate(PROMPT, model="single"))
    to_finish = asyncio.create_task(router.agenerate(PROMPT, model="chat", provider="b"))
    try:
        for gate in (held_on_a, held_on_b):
            assert await asyncio.to_thread(gate.arrived.wait, 10)
        during = in_flight(registry)
        to_cancel.cancel()
        with pytest.raises(asyncio.CancelledError):
            await to_cancel
        after_cancel = in_flight(registry)
    finally:
        held_on_a.release.set()
        held_on_b.release.set()
    assert (await asyncio.wait_for(to_finish, 10)).provider == "b"

    assert during == {("single",): 1.0, ("chat",): 1.0}
    assert after_cancel == {("single",): 0.0, ("chat",): 1.0}
    x = scrape(registry)
    assert x.series("llm_router_in_flight", ["alias"]) == {("single",): 0.0, ("chat",): 0.0}
    expected = {("single", "cancelled"): 1.0, ("chat", "success"): 1.0}
    assert x.series("llm_router_requests_total", ["alias", "outcome"]) == expected
    assert x.histogram("llm_router_request_duration_seconds", ["alias", "outcome"], DEFAULT_BUCKETS) == expected
    assert_no_leaks(x)
