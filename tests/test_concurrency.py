"""Many calls at once, through real litellm and the loopback upstream: every call answered, nothing lost.

Scripted failures are consumed by whichever request comes first, so the tests check invariants that hold
for every interleaving: each call succeeds, the upstream saw exactly the attempts the results report, each
scripted failure shows up as exactly one failed attempt, and the request counter matches the calls made.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest
from conftest import MakeRouter, Sleeps
from prometheus_client import CollectorRegistry

from router import Result
from router.sandbox import Reply, Upstream


def check_all_answered(results: list[Result], up: Upstream, failures: int) -> None:
    """Every result succeeded and the upstream history accounts for exactly their attempts."""
    assert all(r.attempts[-1].outcome == "success" for r in results)
    outcomes = Counter(a.outcome for r in results for a in r.attempts)
    assert outcomes["success"] == len(results)
    assert sum(outcomes.values()) - outcomes["success"] == failures
    assert len(up.history) == sum(len(r.attempts) for r in results)
    by_route = Counter(a.provider for r in results for a in r.attempts)
    assert by_route == Counter(rec.route for rec in up.history)


@pytest.mark.asyncio
async def test_fifty_concurrent_agenerate_calls_all_succeed(
    make_router: MakeRouter, up: Upstream, sleeps: Sleeps, registry: CollectorRegistry
) -> None:
    r = make_router()
    calls, failures = 50, 10
    up.enqueue("a", *[Reply(status=503)] * failures)

    results = await asyncio.gather(*(r.agenerate(f"question {i}") for i in range(calls)))

    assert [res.text for res in results] == [f"[simulated] question {i}" for i in range(calls)]
    check_all_answered(results, up, failures)
    assert all(a.outcome in ("server_error", "success") for res in results for a in res.attempts)
    assert up.route("a").pending == 0
    assert len(sleeps) == sum(len(res.attempts) - 1 - res.fallbacks for res in results)  # one per retry
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "chat", "outcome": "success"}) == calls
    assert registry.get_sample_value("llm_router_in_flight", {"alias": "chat"}) == 0


def test_eight_threads_calling_generate_all_succeed(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    r = make_router()
    threads, per_thread, failures = 8, 10, 6
    up.enqueue("a", *[Reply(status=429, headers={"Retry-After": "0"})] * failures)
    results: list[Result] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        try:
            for i in range(per_thread):
                res = r.generate(f"thread {n} call {i}")
                with lock:
                    results.append(res)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)

    assert errors == []
    assert len(results) == threads * per_thread
    assert sorted(res.text for res in results) == sorted(
        f"[simulated] thread {n} call {i}" for n in range(threads) for i in range(per_thread)
    )
    check_all_answered(results, up, failures)
    assert registry.get_sample_value(
        "llm_router_requests_total", {"alias": "chat", "outcome": "success"}
    ) == threads * per_thread
    assert registry.get_sample_value("llm_router_in_flight", {"alias": "chat"}) == 0
