"""Every call ends by its deadline, whatever the upstream does; a sync stream let go frees its thread and socket.

The upstream misbehaves on purpose (`Reply.trickle_s`, `stall_s`, `hang`): a body trickled one byte every half
second resets every socket timeout, so only a wall-clock bound on the whole attempt ends such a call. Each call
runs under a watchdog, so that a call that would run on (127-146 s, before) fails the test at once instead.

SLACK_S: how far past its deadline a call may end here. The bound is a timer on the event loop that fires at the
deadline itself, and what follows is waking the waiting thread and unwinding the call: 1-10 ms measured on an
idle machine, under 60 ms on these 2 cores shared with five busy engineers (load average 7). 0.5 s leaves room
for a scheduler that does not run us for a while, and is still far below the failure it guards (minutes).

The tests marked BOTH_ENGINES hold the direct engine (router/engines/direct.py) to the same promises.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import BOTH_ENGINES, MakeRouter
from prometheus_client import CollectorRegistry

from router import DeadlineExceededError, Router, StreamInterruptedError
from router.sandbox import Reply, Upstream

SLACK_S = 0.5
HOSTILE = {
    "trickled": Reply(trickle_s=0.5),  # headers, then the JSON body one byte every 0.5 s
    "silent": Reply(stall_s=30),  # headers, then nothing
    "unanswered": Reply(hang=True),  # the request read, then no answer at all
}
MODES = ("sync", "async")

CONFIG = """
version: 1
defaults:
  model: chat
  timeout_s: {timeout_s}
  deadline_s: 20
  retry: {{attempts: {attempts}, backoff_s: 0.1, max_backoff_s: 1}}
providers:
  a: {{kind: openai, api_base: "{{UP}}/a/v1", api_key: "${{KEY_A}}"}}
  b: {{kind: openai, api_base: "{{UP}}/b/v1", api_key: "${{KEY_B}}"}}
aliases:
  chat: {{targets: [a/model-a, b/model-b]}}
  single: {{targets: [a/model-a]}}
"""


def run_call(mode: str, r: Router, limit: float, **kwargs: Any) -> tuple[float, BaseException | None]:
    """Run generate() (or agenerate()) with a watchdog: how long it took, and what it raised. A call still running
    after `limit` seconds fails the test."""
    if mode == "async":

        async def call() -> Any:
            return await asyncio.wait_for(r.agenerate(**kwargs), limit)

        t0 = time.monotonic()
        try:
            asyncio.run(call())
        except asyncio.TimeoutError:
            pytest.fail(f"agenerate({kwargs}) still running after {limit:g}s")
        except Exception as exc:
            return time.monotonic() - t0, exc
        return time.monotonic() - t0, None

    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            r.generate(**kwargs)
        except Exception as exc:
            out["error"] = exc
        out["took"] = time.monotonic() - t0

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        pytest.fail(f"generate({kwargs}) still running after {limit:g}s")
    return out["took"], out.get("error")


def eventually(check: Callable[[], bool], within_s: float) -> bool:
    """Whether `check()` holds within `within_s` seconds (polled)."""
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("behaviour", list(HOSTILE))
def test_a_plain_call_ends_by_its_deadline_whatever_the_upstream_does(
    make_router: MakeRouter, up: Upstream, mode: str, behaviour: str
) -> None:
    r = make_router()  # chat: a → b → c, timeout_s 5, deadline_s 20
    r.generate("warm up")  # connection pools, litellm's first-call work: not the deadline's business
    up.reset()
    up.enqueue("a", HOSTILE[behaviour])
    timeout = 2.0 if behaviour == "trickled" else 1.0
    connections = up.open_connections

    took, err = run_call(mode, r, timeout + SLACK_S + 1, prompt="hello", timeout=timeout)

    assert isinstance(err, DeadlineExceededError), err
    assert err.deadline_s == timeout
    assert [(a.provider, a.outcome) for a in err.attempts] == [("a", "timeout")]
    assert "no complete answer within" in (err.attempts[0].error or "")
    assert took < timeout + SLACK_S
    assert [q.route for q in up.history] == ["a"]  # the deadline ran out before b could be asked
    # the abandoned request's connection is closed, not left reading what the upstream still sends
    assert eventually(lambda: up.open_connections <= connections, 1.0), (up.open_connections, connections)


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_retries_and_backoff_stop_at_the_deadline(make_router: MakeRouter, up: Upstream, mode: str) -> None:
    # Each attempt may take 0.8 s and a timeout is retried up to 5 times: the third try gets what is left of 2 s.
    r = make_router(CONFIG.format(timeout_s=0.8, attempts=5), real_sleep=True)
    r.generate("warm up")
    up.reset()
    up.set_default("a", HOSTILE["trickled"])
    started = time.time()  # the upstream logs arrivals in wall-clock time

    took, err = run_call(mode, r, 2 + SLACK_S + 1, prompt="hello", timeout=2)

    assert isinstance(err, DeadlineExceededError), err
    outcomes = [(a.provider, a.outcome) for a in err.attempts]
    assert len(outcomes) >= 2 and set(outcomes) == {("a", "timeout")}, outcomes
    assert took < 2 + SLACK_S
    arrivals = [q.time - started for q in up.history]
    assert [q.route for q in up.history] == ["a"] * len(outcomes)
    assert max(arrivals) < 2.0, arrivals  # no retry started past the deadline


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_a_last_target_cut_at_the_deadline_raises_deadline_exceeded(
    make_router: MakeRouter, up: Upstream, mode: str
) -> None:
    # Nothing to fall back to: the attempt timed out because the call's time ran out, and the error says so.
    r = make_router(CONFIG.format(timeout_s=5, attempts=2))
    r.generate("warm up", model="single")
    up.enqueue("a", HOSTILE["trickled"])

    took, err = run_call(mode, r, 1 + SLACK_S + 1, prompt="hello", model="single", timeout=1)

    assert isinstance(err, DeadlineExceededError), err
    assert [(a.provider, a.outcome) for a in err.attempts] == [("a", "timeout")]
    assert took < 1 + SLACK_S


def sse(*texts: str) -> list[bytes]:
    """An OpenAI chat stream of these deltas, then a stop and [DONE], one SSE event per item."""

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "model-a", "choices": [choice]}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    return [event({"role": "assistant", "content": t}) for t in texts] + [event({}, "stop"), b"data: [DONE]\n\n"]


def router_threads() -> list[threading.Thread]:
    """Live threads, but the background loop's executor: a pool of at most min(32, cpus + 4) threads that litellm
    prepares async requests in, whose size depends on how busy it once was, never on the streams open now."""
    return [t for t in threading.enumerate() if not t.name.startswith("asyncio_")]


STREAMS = 40


@pytest.fixture
def silent_streams(make_router: MakeRouter, up: Upstream) -> Iterator[Router]:
    """A router whose route a sends first text, then nothing for 30 s (unless the client goes away)."""
    r = make_router()
    up.set_default("a", Reply(raw_stream=sse("Hi", " there"), chunk_delays=[0, 30]))
    connections = up.open_connections
    for _ in range(2):  # the background loop, the closer thread, connection pools: started before counting
        with r.generate("warm up", model="single", stream=True) as s:
            assert next(s) == "Hi"
    assert eventually(lambda: up.open_connections <= connections, 1.0)  # the warm-up's streams are gone
    yield r


@BOTH_ENGINES
@pytest.mark.parametrize("how", ["closed", "dropped"])
def test_sync_streams_let_go_on_a_silent_upstream_free_their_threads_and_sockets(
    silent_streams: Router, up: Upstream, registry: CollectorRegistry, how: str
) -> None:
    r = silent_streams
    threads, connections = len(router_threads()), up.open_connections

    streams = [r.generate("hello", model="single", stream=True) for _ in range(STREAMS)]
    assert [next(s) for s in streams] == ["Hi"] * STREAMS
    assert up.open_connections >= STREAMS  # each stream holds a connection, mid-answer
    if how == "closed":
        for s in streams:
            s.close()
    streams.clear()  # "dropped": the last reference to each stream goes, nobody closes it
    let_go = time.monotonic()

    assert eventually(lambda: up.open_connections <= connections, 1.0), (up.open_connections, connections)
    assert eventually(lambda: len(router_threads()) <= threads, 1.0), [t.name for t in router_threads()]
    assert time.monotonic() - let_go < 1.0 + SLACK_S
    labels = {"alias": "single", "provider": "a", "model": "model-a", "outcome": "cancelled"}
    assert registry.get_sample_value("llm_router_attempts_total", labels) == STREAMS + 2  # + the warm-up's


@BOTH_ENGINES
def test_a_sync_stream_read_through_the_loop_still_ends_at_its_idle_limit(
    make_router: MakeRouter, up: Upstream
) -> None:
    # The same silent upstream, read on: the stream's idle limit (timeout_s: 1 here) ends it, and closes it.
    with make_router().generate("warm up", model="single", stream=True) as s:  # litellm's first stream: slow
        assert "".join(s)
    r = make_router(CONFIG.format(timeout_s=1, attempts=1))
    up.set_default("a", Reply(raw_stream=sse("Hi", " there"), chunk_delays=[0, 30]))
    connections = up.open_connections
    got: list[str] = []
    t0 = time.monotonic()

    with pytest.raises(StreamInterruptedError):
        for delta in r.generate("hello", model="single", stream=True):
            got.append(delta)

    assert got == ["Hi"]
    assert time.monotonic() - t0 < 1 + SLACK_S
    assert eventually(lambda: up.open_connections <= connections, 1.0)
