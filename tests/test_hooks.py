"""The call-life seam (`router.hooks`): what hooks see, in what order, over the real loopback upstream."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest
from conftest import MakeRouter
from prometheus_client import CollectorRegistry

from router import AllTargetsFailedError, ProviderError, Result, RouterError, Usage
from router.config import Target
from router.hooks import AttemptReport, Call, Hook, check_tags
from router.sandbox import Reply, Upstream


class Recorder(Hook):
    """Logs every event it is given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.threads: list[str] = []

    def call_started(self, call: Call) -> Result | None:
        self.events.append(("call_started", (call.alias, dict(call.tags), call.stream)))
        self.threads.append(threading.current_thread().name)
        return None

    def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
        assert "api_key" not in request
        self.events.append(("before_attempt", target.key))

    def attempt_finished(self, call: Call, report: AttemptReport) -> None:
        self.events.append(("attempt_finished", (report.target.key, report.attempt.outcome, report.cost_usd)))

    def call_finished(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        self.events.append(("call_finished", (call.outcome, result is not None, type(error).__name__)))

    def names(self) -> list[str]:
        return [e[0] for e in self.events]


class Refuse(Hook):
    class Refused(RouterError):
        outcome = "refused_by_test"

    def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
        raise self.Refused(f"no requests to {target.key}")


class Broken(Hook):
    def call_started(self, call: Call) -> Result | None:
        raise ZeroDivisionError("a plugin bug")

    def attempt_finished(self, call: Call, report: AttemptReport) -> None:
        raise RuntimeError("another plugin bug")


PRICED = """
pricing:
  a/model-a: {input_per_1m: 1.0, output_per_1m: 2.0}
"""


def test_a_fallback_is_seen_attempt_by_attempt(make_router: MakeRouter, up: Upstream) -> None:
    rec = Recorder()
    r = make_router(extra=PRICED, hooks=[rec])
    up.enqueue("a", Reply(status=503), Reply(status=503))
    up.enqueue("b", Reply(text="hello", usage=(3, 4)))
    res = r.generate("hi", tags={"tenant": "acme"})
    assert res.provider == "b"
    assert rec.events == [
        ("call_started", ("chat", {"tenant": "acme"}, False)),
        ("before_attempt", "a/model-a"),
        ("attempt_finished", ("a/model-a", "server_error", None)),
        ("before_attempt", "a/model-a"),
        ("attempt_finished", ("a/model-a", "server_error", None)),
        ("before_attempt", "b/model-b"),
        ("attempt_finished", ("b/model-b", "success", res.cost_usd)),
        ("call_finished", ("success", True, "NoneType")),
    ]


def test_a_billed_answer_reports_its_cost(make_router: MakeRouter, up: Upstream) -> None:
    rec = Recorder()
    r = make_router(extra=PRICED, hooks=[rec])
    up.enqueue("a", Reply(text="hello", usage=(1000, 500)))
    res = r.generate("hi")
    assert res.cost_usd == pytest.approx(1000 * 1e-6 + 500 * 2e-6)
    assert ("attempt_finished", ("a/model-a", "success", pytest.approx(0.002))) in rec.events


def test_a_failed_call_ends_with_its_error(make_router: MakeRouter, up: Upstream) -> None:
    rec = Recorder()
    r = make_router(hooks=[rec])
    up.enqueue("a", Reply(status=400, error="bad"))
    with pytest.raises(ProviderError):
        r.generate("hi", model="single")
    assert rec.events[-1] == ("call_finished", ("bad_request", False, "ProviderError"))


@pytest.mark.asyncio
async def test_async_stream_is_seen_to_its_end(make_router: MakeRouter, up: Upstream) -> None:
    rec = Recorder()
    r = make_router(hooks=[rec])
    up.enqueue("a", Reply(text="one two three", usage=(2, 3)))
    stream = await r.agenerate("hi", model="single", stream=True)
    text = "".join([d async for d in stream])
    assert text == "one two three"
    assert rec.names() == ["call_started", "before_attempt", "attempt_finished", "call_finished"]
    assert rec.events[-1] == ("call_finished", ("success", True, "NoneType"))


def test_a_stream_closed_early_is_cancelled(make_router: MakeRouter, up: Upstream) -> None:
    rec = Recorder()
    r = make_router(hooks=[rec])
    up.enqueue("a", Reply(text="one two three four five six", usage=(2, 6)))
    stream = r.generate("hi", model="single", stream=True)
    next(iter(stream))
    stream.close()
    assert rec.events[-2][1][:2] == ("a/model-a", "cancelled")
    assert rec.events[-2][1][2] is not None  # what was streamed is billed
    assert rec.events[-1] == ("call_finished", ("cancelled", False, "NoneType"))


def test_a_hook_can_refuse_before_any_request(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    rec = Recorder()
    r = make_router(hooks=[Refuse(), rec])
    with pytest.raises(Refuse.Refused):
        r.generate("hi")
    assert up.requests("a") == []
    assert rec.events[-1] == ("call_finished", ("refused_by_test", False, "Refused"))
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "chat", "outcome": "refused_by_test"}) == 1


def test_a_broken_hook_fails_no_call(make_router: MakeRouter, up: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    r = make_router(hooks=[Broken(), rec])
    up.enqueue("a", Reply(text="fine"), Reply(text="fine"))
    with caplog.at_level(logging.ERROR, logger="router"):
        assert r.generate("hi").text == "fine"
        assert r.generate("hi").text == "fine"
    assert rec.names().count("call_finished") == 2
    logged = [m for m in caplog.messages if "hook Broken" in m]
    assert len(logged) == 2  # once per method, not once per call


@pytest.mark.asyncio
async def test_blocking_hooks_run_off_the_event_loop(make_router: MakeRouter, up: Upstream) -> None:
    class Slow(Recorder):
        blocking = True

    rec = Slow()
    r = make_router(hooks=[rec])
    up.enqueue("a", Reply(text="x"))
    await r.agenerate("hi", model="single")
    assert rec.threads and rec.threads[0] != threading.current_thread().name
    assert asyncio.get_running_loop() is not None


def test_no_request_when_a_hook_answers(make_router: MakeRouter, up: Upstream) -> None:
    canned = Result(
        "canned",
        "chat",
        "a",
        "model-a",
        usage=Usage(),
        cost_usd=0.0,
        cost_source="config",
        latency_s=0.0,
        attempts=(),
    )

    class Answer(Hook):
        def call_started(self, call: Call) -> Result | None:
            return canned

    rec = Recorder()
    r = make_router(hooks=[Answer(), rec])
    assert r.generate("hi") is canned
    assert up.requests("a") == []
    assert rec.events[-1] == ("call_finished", ("success", True, "NoneType"))


@pytest.mark.parametrize(
    ("tags", "error"),
    [
        ({"tenant": 7}, TypeError),
        ({"bad name": "x"}, ValueError),
        ({"t": "x" * 257}, ValueError),
        ({f"t{i}": "x" for i in range(33)}, ValueError),
        (["tenant"], TypeError),
    ],
)
def test_bad_tags_are_refused_before_any_request(make_router: MakeRouter, up: Upstream, tags: Any, error: type) -> None:
    r = make_router()
    with pytest.raises(error):
        r.generate("hi", tags=tags)
    assert up.requests("a") == []


def test_good_tags_pass() -> None:
    assert check_tags({"tenant": "acme", "user.id": "u-17"}) == {"tenant": "acme", "user.id": "u-17"}
    assert check_tags(None) == {}


def test_all_failed_reaches_call_finished(make_router: MakeRouter, up: Upstream) -> None:
    rec = Recorder()
    r = make_router(hooks=[rec])
    for route in "abc":
        up.enqueue(route, Reply(status=503), Reply(status=503))
    with pytest.raises(AllTargetsFailedError):
        r.generate("hi")
    assert rec.names().count("attempt_finished") == 6
    assert rec.events[-1][1][0] == "server_error"


class _Threads(Hook):
    """Records the thread each after-hook ran in."""

    def __init__(self) -> None:
        self.ran_in: list[tuple[str, str]] = []

    def attempt_finished(self, call: Call, report: AttemptReport) -> None:
        self.ran_in.append(("attempt_finished", threading.current_thread().name))

    def call_finished(self, call: Call, result: Any, error: BaseException | None) -> None:
        self.ran_in.append(("call_finished", threading.current_thread().name))


def test_the_after_hooks_of_a_dropped_stream_never_run_in_the_collecting_thread(
    make_router: MakeRouter, up: Upstream
) -> None:
    watch = _Threads()
    r = make_router(hooks=[watch])
    up.enqueue("a", Reply(text="one two three four five six seven eight nine ten"))
    stream = r.generate("hi", model="single", stream=True)
    next(stream)
    del stream
    gc.collect()  # the stream is collected here, in this thread
    end = time.monotonic() + 3
    while len(watch.ran_in) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    assert [name for name, _ in watch.ran_in] == ["attempt_finished", "call_finished"]
    assert all(thread != threading.current_thread().name for _, thread in watch.ran_in), watch.ran_in
