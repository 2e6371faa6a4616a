"""Hedged requests over the real loopback upstream: when a hedge goes out, who wins, what is counted.

Slow answers are scripted with `Reply(delay_s=...)` (the upstream waits before its headers), far longer than
the hedge delay, so a test that passes by the slow answer arriving would take seconds and fail its time bound.
Sync and async run the same scenarios (`mode`); the tests marked BOTH_ENGINES run on the direct engine too.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from conftest import BOTH_ENGINES, MakeRouter, standard_config, standard_env
from prometheus_client import CollectorRegistry

from router import (
    AllTargetsFailedError,
    Attempt,
    ConfigError,
    DeadlineExceededError,
    ProviderError,
    Result,
    Router,
    Target,
    parse_config,
)
from router.background import background_loop
from router.errors import RouterError, StreamInterruptedError
from router.hedge import MIN_SAMPLES, Latencies
from router.hooks import AttemptReport, Call, Hook, Reroute
from router.sandbox import Reply, Upstream

SLOW = 3.0  # seconds: an answer that a hedge must beat
HEDGE_AFTER = 0.2
PRICE_B = (1.0, 4.0)
CONFIG = standard_config(
    aliases=f"""
    hedged: {{targets: [a/model-a, b/model-b], hedge: {{after_s: {HEDGE_AFTER}}}}}
    wide: {{targets: [a/model-a, b/model-b, c/model-c], hedge: {{after_s: {HEDGE_AFTER}, max_extra: 2}}}}
    narrow: {{targets: [a/model-a, b/model-b, c/model-c], hedge: {{after_s: {HEDGE_AFTER}}}}}
    solo: {{targets: [a/model-a], hedge: {{after_s: {HEDGE_AFTER}}}}}
    pct: {{targets: [a/model-a, b/model-b], hedge: {{after_percentile: 90}}}}
    cutter: {{targets: [a/model-a, b/model-b], hedge: {{after_s: 0.02}}}}
    patient: {{targets: [a/model-a, b/model-b], hedge: {{after_s: {SLOW / 2}}}}}
    idle:
      targets: [a/model-a, {{provider: b, model: model-b, stream_idle_timeout_s: 0.5}}]
      hedge: {{after_s: {HEDGE_AFTER}}}
    """,
    extra=f"""
    pricing:
      b/model-b: {{input_per_1m: {PRICE_B[0]}, output_per_1m: {PRICE_B[1]}}}
    """,
)
MODES = ["sync", "async"]


@pytest.fixture
def r(make_router: MakeRouter) -> Router:
    return make_router(CONFIG)


@pytest.fixture(scope="module", autouse=True)
def _warm(upstream: Upstream) -> None:
    """litellm imports its async path on first use (a second or more): pay that before the timed tests."""
    cfg = parse_config(CONFIG.replace("{UP}", upstream.url), "warm.yaml", env=standard_env())
    warm = Router(cfg, registry=CollectorRegistry())
    for mode in MODES:
        upstream.enqueue("a", Reply(text="warm", delay_s=0.3))
        upstream.enqueue("b", Reply(text="warm"))
        call(warm, mode, "hedged")
    upstream.reset()


def call(r: Router, mode: str, model: str, **kw: Any) -> Result:
    """One generate() or agenerate() call; a stream is read to its end and its Result returned."""
    if mode == "sync":
        res = r.generate("hi", model=model, **kw)
        if kw.get("stream"):
            text = "".join(res)
            assert text == res.result.text
            return res.result  # type: ignore[no-any-return]
        return res  # type: ignore[no-any-return]

    async def run() -> Result:
        res = await r.agenerate("hi", model=model, **kw)
        if kw.get("stream"):
            text = "".join([d async for d in res])
            assert text == res.result.text
            return res.result  # type: ignore[no-any-return]
        assert not requests_running(asyncio.all_tasks())  # the losers were cancelled, not left to finish
        return res  # type: ignore[no-any-return]

    return asyncio.run(run())


def trail(attempts: Sequence[Attempt]) -> list[tuple[str, str]]:
    return sorted((a.provider, a.outcome) for a in attempts)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def requests_running(tasks: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """The racers' request tasks among `tasks` (litellm's own logging tasks aside): an engine's
    `acomplete`/`aopen_stream` (`LiteLLMEngine.acomplete`, `DirectEngine.aopen_stream`, ...)."""
    names = ("acomplete", "aopen_stream", "_on.<locals>.run")
    return [
        t
        for t in tasks
        if not t.done() and t.get_coro().__qualname__.endswith(names)  # type: ignore[union-attr]
    ]


def no_request_left_running() -> bool:
    """The sync racer's loop runs no request any more: the loser was cancelled, not left to finish."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if not requests_running(asyncio.all_tasks(background_loop())):
            return True
        time.sleep(0.02)
    return False


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_a_slow_first_target_is_hedged_and_the_hedge_wins(
    r: Router, up: Upstream, registry: CollectorRegistry, mode: str
) -> None:
    up.enqueue("a", Reply(text="slow a", delay_s=SLOW))
    up.enqueue("b", Reply(text="quick b", usage=(10, 20)))
    t0 = time.monotonic()
    res = call(r, mode, "hedged")
    took = time.monotonic() - t0
    assert (res.text, res.provider) == ("quick b", "b")
    assert HEDGE_AFTER <= took < SLOW / 2
    assert trail(res.attempts) == [("a", "cancelled"), ("b", "success")]
    assert res.cost_usd == pytest.approx((10 * PRICE_B[0] + 20 * PRICE_B[1]) / 1e6)
    assert (len(up.requests("a")), len(up.requests("b"))) == (1, 1)
    assert sample(registry, "llm_router_hedges_total", alias="hedged", provider="b", model="model-b") == 1
    assert sample(registry, "llm_router_hedge_wins_total", alias="hedged", provider="b", model="model-b") == 1
    for provider, model, outcome in [("a", "model-a", "cancelled"), ("b", "model-b", "success")]:
        labels = {"alias": "hedged", "provider": provider, "model": model, "outcome": outcome}
        assert sample(registry, "llm_router_attempts_total", **labels) == 1
    assert sample(registry, "llm_router_cost_usd_total", alias="hedged", provider="b", model="model-b") > 0
    assert sample(registry, "llm_router_requests_total", alias="hedged", outcome="success") == 1
    assert sample(registry, "llm_router_in_flight", alias="hedged") == 0
    if mode == "sync":
        assert no_request_left_running()


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_a_quick_answer_sends_no_hedge(r: Router, up: Upstream, registry: CollectorRegistry, mode: str) -> None:
    up.enqueue("a", Reply(text="quick a"))
    res = call(r, mode, "patient")  # a hedge delay that a loaded test machine does not reach by accident
    assert (res.provider, trail(res.attempts)) == ("a", [("a", "success")])
    assert up.requests("b") == []
    assert sample(registry, "llm_router_hedges_total", alias="patient", provider="b", model="model-b") == 0


@pytest.mark.parametrize("mode", MODES)
def test_max_extra_hedges_go_out_one_delay_apart(
    r: Router, up: Upstream, registry: CollectorRegistry, mode: str
) -> None:
    up.enqueue("a", Reply(text="slow a", delay_s=SLOW))
    up.enqueue("b", Reply(text="slow b", delay_s=SLOW))
    up.enqueue("c", Reply(text="quick c"))
    res = call(r, mode, "wide")
    assert res.provider == "c"
    assert trail(res.attempts) == [("a", "cancelled"), ("b", "cancelled"), ("c", "success")]
    # Arrival times at the upstream: a loaded machine may delay the first request's arrival more than the next's.
    sent_at = {rec.route: rec.time for rec in up.history}
    assert sent_at["b"] - sent_at["a"] >= HEDGE_AFTER * 0.5 and sent_at["c"] - sent_at["b"] >= HEDGE_AFTER * 0.5
    assert sample(registry, "llm_router_hedges_total", alias="wide", provider="c", model="model-c") == 1


@pytest.mark.parametrize("mode", MODES)
def test_no_more_than_max_extra_requests(r: Router, up: Upstream, registry: CollectorRegistry, mode: str) -> None:
    up.enqueue("a", Reply(text="a after all", delay_s=1.0))
    up.enqueue("b", Reply(text="slower b", delay_s=SLOW))
    res = call(r, mode, "narrow")
    assert (res.provider, res.text) == ("a", "a after all")
    assert up.requests("c") == []
    assert trail(res.attempts) == [("a", "success"), ("b", "cancelled")]
    assert sample(registry, "llm_router_hedge_wins_total", alias="narrow", provider="b", model="model-b") == 0


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_a_failed_hedge_leaves_the_first_request_racing(r: Router, up: Upstream, mode: str) -> None:
    up.enqueue("a", Reply(text="a after all", delay_s=0.8))
    up.enqueue("b", Reply(status=503))
    res = call(r, mode, "hedged")
    assert res.provider == "a"
    assert trail(res.attempts) == [("a", "success"), ("b", "server_error")]


@pytest.mark.parametrize("mode", MODES)
def test_a_fast_failure_falls_back_as_usual(r: Router, up: Upstream, registry: CollectorRegistry, mode: str) -> None:
    up.enqueue("a", Reply(status=503))
    up.enqueue("b", Reply(text="from b"))
    res = call(r, mode, "hedged")
    assert res.provider == "b" and trail(res.attempts) == [("a", "server_error"), ("b", "success")]
    assert sample(registry, "llm_router_hedges_total", alias="hedged", provider="b", model="model-b") == 0
    labels = {"alias": "hedged", "from_provider": "a", "to_provider": "b", "reason": "server_error"}
    assert sample(registry, "llm_router_fallbacks_total", **labels) == 1


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_every_raced_request_failing_falls_back_to_the_rest(r: Router, up: Upstream, mode: str) -> None:
    up.enqueue("a", Reply(status=503, delay_s=0.5))
    up.enqueue("b", Reply(status=503))
    up.enqueue("c", Reply(text="from c"))
    res = call(r, mode, "narrow")
    assert res.provider == "c"
    assert trail(res.attempts) == [("a", "server_error"), ("b", "server_error"), ("c", "success")]


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_a_refused_request_in_the_race_stops_the_call(r: Router, up: Upstream, mode: str) -> None:
    up.enqueue("a", Reply(text="slow a", delay_s=SLOW))
    up.enqueue("b", Reply(status=400, error="bad request"))
    t0 = time.monotonic()
    with pytest.raises(ProviderError) as err:
        call(r, mode, "hedged")
    assert time.monotonic() - t0 < SLOW / 2
    assert trail(err.value.attempts) == [("a", "cancelled"), ("b", "bad_request")]
    assert err.value.outcome == "bad_request"  # the call's outcome is the refusal, not the cancelled request


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_the_deadline_cancels_the_race(r: Router, up: Upstream, registry: CollectorRegistry, mode: str) -> None:
    up.enqueue("a", Reply(text="slow a", delay_s=SLOW))
    up.enqueue("b", Reply(text="slow b", delay_s=SLOW))
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError) as err:
        call(r, mode, "hedged", timeout=0.6)
    assert time.monotonic() - t0 < SLOW / 2
    assert isinstance(err.value, AllTargetsFailedError)
    assert trail(err.value.attempts) == [("a", "timeout"), ("b", "timeout")]  # cut by the deadline
    assert sample(registry, "llm_router_requests_total", alias="hedged", outcome="timeout") == 1
    if mode == "sync":
        assert no_request_left_running()


@pytest.mark.parametrize("mode", MODES)
def test_a_lone_target_is_hedged_on_itself(r: Router, up: Upstream, mode: str) -> None:
    up.enqueue("a", Reply(text="slow", delay_s=SLOW), Reply(text="second try"))
    res = call(r, mode, "solo")
    assert res.text == "second try"
    assert trail(res.attempts) == [("a", "cancelled"), ("a", "success")]
    assert len(up.requests("a")) == 2


@pytest.mark.parametrize("mode", MODES)
def test_a_lost_race_with_no_target_left_is_retried(r: Router, up: Upstream, sleeps: list[float], mode: str) -> None:
    up.enqueue("a", Reply(status=503), Reply(text="on retry"))
    res = call(r, mode, "solo")
    assert res.text == "on retry"
    assert trail(res.attempts) == [("a", "server_error"), ("a", "success")]
    assert len(sleeps) == 1  # the usual backoff


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_a_stream_is_hedged_until_its_first_text(
    r: Router, up: Upstream, registry: CollectorRegistry, mode: str
) -> None:
    up.enqueue("a", Reply(text="slow stream from a", delay_s=SLOW))
    up.enqueue("b", Reply(text="quick stream from b", usage=(10, 20)))
    t0 = time.monotonic()
    res = call(r, mode, "hedged", stream=True)
    assert time.monotonic() - t0 < SLOW / 2
    assert (res.text, res.provider) == ("quick stream from b", "b")
    assert trail(res.attempts) == [("a", "cancelled"), ("b", "success")]
    assert res.cost_usd > 0
    assert sample(registry, "llm_router_hedge_wins_total", alias="hedged", provider="b", model="model-b") == 1
    assert sample(registry, "llm_router_in_flight", alias="hedged") == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_that_sends_text_soon_is_not_hedged(r: Router, up: Upstream, mode: str) -> None:
    up.enqueue("a", Reply(text="a streams at once"))
    res = call(r, mode, "patient", stream=True)
    assert (res.provider, up.requests("b")) == ("a", [])


def test_a_percentile_hedge_waits_for_enough_latencies(r: Router, up: Upstream, registry: CollectorRegistry) -> None:
    up.enqueue("a", Reply(text="slowish", delay_s=0.6))
    res = r.generate("hi", model="pct")
    assert res.provider == "a", res.attempts  # no after_s and no latencies yet: no hedge
    assert up.requests("b") == []
    up.set_default("a", Reply(text="quick"))  # not queued: a warm-up call may itself be hedged
    for _ in range(MIN_SAMPLES):
        r.generate("hi", model="pct")
    up.set_default("a", Reply(text="slow a", delay_s=SLOW))
    up.enqueue("b", Reply(text="quick b"))
    t0 = time.monotonic()
    res = r.generate("hi", model="pct")
    took = time.monotonic() - t0
    assert res.provider == "b", res.attempts
    assert took < SLOW / 2
    assert sample(registry, "llm_router_hedges_total", alias="pct", provider="b", model="model-b") == 1


def test_a_percentile_hedge_learns_from_its_own_alias_and_from_answers_only(
    r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    # Another alias races the same target and cuts it off after 20 ms, MIN_SAMPLES times: those are neither this
    # alias's latencies nor answers, so they must not time this alias's hedges.
    up.set_default("a", Reply(text="slow a", delay_s=0.5))
    up.set_default("b", Reply(text="quick b"))
    for _ in range(MIN_SAMPLES + 5):
        assert r.generate("hi", model="cutter").provider == "b"
    up.set_default("a", Reply(text="a, in its usual time", delay_s=0.3))
    before = len(up.requests("b"))
    res = r.generate("hi", model="pct")
    assert res.provider == "a", res.attempts  # no latencies of its own yet, and no after_s: no hedge
    assert len(up.requests("b")) == before
    assert sample(registry, "llm_router_hedges_total", alias="pct", provider="b", model="model-b") == 0


def test_latency_percentiles_by_nearest_rank() -> None:
    seen = Latencies()
    for i in range(1, MIN_SAMPLES):
        seen.add("a/m", False, i / 100)
    assert seen.percentile("a/m", False, 90) is None  # too few yet
    seen.add("a/m", False, MIN_SAMPLES / 100)
    assert seen.percentile("a/m", False, 90) == pytest.approx(0.18)
    assert seen.percentile("a/m", False, 50) == pytest.approx(0.10)
    assert seen.percentile("a/m", True, 50) is None  # streams are timed apart


def test_a_hedge_needs_a_delay() -> None:
    text = standard_config(aliases="x: {targets: [a/model-a], hedge: {max_extra: 2}}").replace("{UP}", "http://h")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "test.yaml", env={})
    assert "aliases.x.hedge: give after_s or after_percentile" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(text.replace("max_extra: 2", "after_percentile: 100"), "test.yaml", env={})
    assert "aliases.x.hedge.after_percentile" in str(err.value)


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_a_hedged_stream_closed_early_is_cancelled(
    r: Router, up: Upstream, registry: CollectorRegistry, mode: str
) -> None:
    up.enqueue("a", Reply(text="slow stream from a", delay_s=SLOW))
    up.enqueue("b", Reply(text="one two three four five six seven eight nine ten", usage=(10, 20)))

    async def run() -> None:
        stream = await r.agenerate("hi", model="hedged", stream=True)
        await stream.__anext__()
        await stream.aclose()

    if mode == "sync":
        stream = r.generate("hi", model="hedged", stream=True)
        next(stream)
        stream.close()
        assert no_request_left_running()
    else:
        asyncio.run(run())
    for provider, model in [("a", "model-a"), ("b", "model-b")]:
        labels = {"alias": "hedged", "provider": provider, "model": model, "outcome": "cancelled"}
        assert sample(registry, "llm_router_attempts_total", **labels) == 1
    assert sample(registry, "llm_router_requests_total", alias="hedged", outcome="cancelled") == 1
    assert sample(registry, "llm_router_cost_usd_total", alias="hedged", provider="b", model="model-b") > 0
    assert sample(registry, "llm_router_in_flight", alias="hedged") == 0


def test_a_forked_worker_gets_its_own_background_loop() -> None:
    parent = background_loop()
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns about forking a process with threads: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: a new loop whose thread runs
        try:
            loop = background_loop()
            fut = asyncio.run_coroutine_threadsafe(asyncio.sleep(0, result=b"ok"), loop)
            ok = loop is not parent and fut.result(timeout=5) == b"ok"
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)
    assert got == b"1"
    assert background_loop() is parent


# -- the race and main's attempt loop: stream limits, content filter, key names, reroutes -------------------------


def sse(*texts: str) -> list[bytes]:
    """An OpenAI chat stream of these deltas, then a stop and [DONE], one SSE event per item."""

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "model-b", "choices": [choice]}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    return [event({"role": "assistant", "content": t}) for t in texts] + [event({}, "stop"), b"data: [DONE]\n\n"]


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_a_winning_hedged_stream_keeps_its_idle_limit(r: Router, up: Upstream, mode: str) -> None:
    up.enqueue("a", Reply(text="slow stream from a", delay_s=SLOW))
    # b's first text comes at once, then nothing for 3 s: its stream_idle_timeout_s (0.5) must cut it
    up.enqueue("b", Reply(raw_stream=sse("A", " car", " is", " here"), chunk_delays=[0, 0, 3.0, 0, 0, 0]))
    deltas: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(StreamInterruptedError) as info:
        if mode == "sync":
            for d in r.generate("hi", model="idle", stream=True):
                deltas.append(d)
        else:

            async def read() -> None:
                async for d in await r.agenerate("hi", model="idle", stream=True):
                    deltas.append(d)

            asyncio.run(read())
    assert time.monotonic() - t0 < SLOW - 0.2
    assert "".join(deltas) == "A car" == info.value.text
    assert trail(info.value.attempts) == [("a", "cancelled"), ("b", "stream_interrupted")]
    assert "no text for 0.5s" in (info.value.attempts[-1].error or "")


CONTENT_FILTERED = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": "model-b",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5},
}


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_a_content_filtered_answer_in_the_race_is_a_failure(
    r: Router, up: Upstream, registry: CollectorRegistry, mode: str
) -> None:
    up.enqueue("a", Reply(text="slow a", delay_s=SLOW))
    up.enqueue("b", Reply(json=CONTENT_FILTERED))
    t0 = time.monotonic()
    with pytest.raises(ProviderError) as err:  # content_filter is not fallen back from by default
        call(r, mode, "hedged")
    assert time.monotonic() - t0 < SLOW / 2
    assert trail(err.value.attempts) == [("a", "cancelled"), ("b", "content_filter")]
    assert err.value.outcome == "content_filter"
    labels = {"alias": "hedged", "provider": "b", "model": "model-b", "outcome": "content_filter"}
    assert sample(registry, "llm_router_attempts_total", **labels) == 1
    assert sample(registry, "llm_router_hedge_wins_total", alias="hedged", provider="b", model="model-b") == 0


class Watch(Hook):
    """Records the key name each request goes out with and the attempt reports; reroutes a hedge to b if asked."""

    def __init__(self, reroute_b_to: str | None = None) -> None:
        self.keys: list[tuple[str, str | None]] = []
        self.reports: list[AttemptReport] = []
        self.reroute_b_to = reroute_b_to
        self.rerouted: list[str | None] = []

    def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
        self.keys.append((target.provider, call.key_name))
        if self.reroute_b_to and target.provider == "b" and call.rerouted_to is None:
            raise Reroute(self.reroute_b_to, RouterError("b is over budget"))

    def attempt_finished(self, call: Call, report: AttemptReport) -> None:
        self.reports.append(report)

    def call_finished(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        self.rerouted.append(call.rerouted_to)


@pytest.mark.parametrize("mode", MODES)
def test_raced_requests_tell_hooks_their_key_and_what_answered(
    make_router: MakeRouter, up: Upstream, mode: str
) -> None:
    watch = Watch()
    r = make_router(CONFIG, hooks=[watch])
    up.enqueue("a", Reply(text="slow a", delay_s=SLOW))
    up.enqueue("b", Reply(text="quick b"))
    res = call(r, mode, "hedged")
    assert res.provider == "b"
    assert [p for p, _ in watch.keys] == ["a", "b"]
    assert all(name is not None and name.startswith("key-") for _, name in watch.keys)
    (won,) = [rep for rep in watch.reports if rep.attempt.outcome == "success"]
    assert (won.target.provider, won.response_model, won.finish_reason) == ("b", "model-b", "stop")


@pytest.mark.parametrize("mode", MODES)
def test_a_reroute_raised_for_a_hedge_cancels_the_race_and_re_plans(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, mode: str
) -> None:
    watch = Watch(reroute_b_to="single")
    r = make_router(CONFIG, hooks=[watch])
    up.enqueue("a", Reply(text="slow a", delay_s=SLOW), Reply(text="a, rerouted"))
    t0 = time.monotonic()
    res = call(r, mode, "hedged")
    assert time.monotonic() - t0 < SLOW / 2
    assert (res.text, res.provider) == ("a, rerouted", "a")
    assert trail(res.attempts) == [("a", "cancelled"), ("a", "success")]  # the race's request counted, cancelled
    assert up.requests("b") == [] and len(up.requests("a")) == 2
    assert watch.rerouted == ["single"]
    assert sample(registry, "llm_router_hedges_total", alias="hedged", provider="b", model="model-b") == 0
    if mode == "sync":
        assert no_request_left_running()


@pytest.mark.parametrize("mode", MODES)
def test_a_call_rerouted_from_a_race_races_again_on_its_new_alias(
    make_router: MakeRouter, up: Upstream, mode: str
) -> None:
    r = make_router(CONFIG, hooks=[Watch(reroute_b_to="solo")])  # solo: a alone, hedged on itself
    up.enqueue("a", Reply(text="slow a", delay_s=SLOW), Reply(text="slow again", delay_s=SLOW), Reply(text="hedge"))
    t0 = time.monotonic()
    res = call(r, mode, "hedged")
    assert time.monotonic() - t0 < SLOW / 2
    assert res.text == "hedge"
    assert [a.outcome for a in res.attempts] == ["cancelled", "cancelled", "success"]
