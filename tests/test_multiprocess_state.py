"""Shared health state under real gunicorn: the examples/ apps with 4 workers (sync workers for the Django app,
uvicorn workers for the FastAPI one) on `state: {backend: sqlite}` and `{backend: redis}` (a real
redis-server), calling the loopback upstream of this test process.

A provider that fails through one worker is skipped by all the others within a second: the upstream's request
log shows no request to it from any worker after that. (The control, the same steps on the memory backend, is
in tests/test_multiprocess.py: there each worker keeps sending until it has found out on its own.) Stopping
redis-server under load fails no call; the outage shows in the aggregated /metrics, and once redis is back
(empty) the workers push what they learnt meanwhile and act on it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from gunicorn_server import APPS, GUNICORN, WORKERS, Gunicorn, fail_until_open, grew, opened, spread, value
from redis_server import RedisServer, require

from router.sandbox import Reply, Upstream

CONFIG = """
version: 1
defaults:
  model: chat
  timeout_s: 30
  deadline_s: 60
  retry: {{attempts: 1, backoff_s: 0}}
  circuit: {{failure_threshold: 2, failure_ratio: null, cooldown_s: 600}}
providers:
  a: {{kind: openai, api_base: "{up}/ms-a/v1", api_key: "${{KEY_A}}"}}
  b: {{kind: openai, api_base: "{up}/ms-b/v1", api_key: "${{KEY_A}}"}}
  c:
    kind: openai
    api_base: "{up}/ms-c/v1"
    api_key: "${{KEY_A}}"
    circuit: {{failure_threshold: 1, failure_ratio: null, cooldown_s: 600}}
  d:
    kind: openai
    api_base: "{up}/ms-d/v1"
    api_key: "${{KEY_A}}"
    circuit: {{failure_threshold: 1, failure_ratio: null, cooldown_s: 600}}
aliases:
  chat: {{targets: [a/model-a, b/model-b]}}
  other: {{targets: [c/model-c, b/model-b]}}
  more: {{targets: [d/model-d, b/model-b]}}
  steady: {{targets: [b/model-b]}}
{more}
state: STATE
"""
BACKENDS = ["sqlite", "redis"]  # the memory control: tests/test_multiprocess.py
SERVERS = [f"{app}-{backend}" for app in APPS for backend in BACKENDS]
# The propagation promised: a verdict reaches every worker within sync_s (0.25 s by default) and one exchange.
WITHIN_S = 1.0


class Served(Gunicorn):
    """Gunicorn on one of the example apps with one state backend."""

    def __init__(self, name: str, workdir: Path, up: Upstream, state: str) -> None:
        app, self.backend = name.split("-")
        self.prefix = f"ms-{app}"  # the state section's prefix: one app's run never sees the other's state
        state = state.replace("PREFIX", self.prefix)
        super().__init__(*APPS[app], workdir, up, CONFIG.replace("STATE", state.replace("{", "{{").replace("}", "}}")))

    def log_lines(self, text: str) -> int:
        self.log.flush()
        return sum(text in line for line in (self.workdir / "gunicorn.log").read_text(errors="replace").splitlines())


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[RedisServer]:
    binary = require()
    with RedisServer(binary) as server:
        yield server


@pytest.fixture(scope="module", params=SERVERS)
def server(
    request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """Gunicorn on one app ("wsgi" or "asgi") and one shared state backend ("sqlite" or "redis")."""
    if not GUNICORN.exists():
        pytest.fail(f"{GUNICORN} is missing: `make install` installs gunicorn with the dev extra")
    backend = request.param.split("-")[1]
    workdir = tmp_path_factory.mktemp(f"gunicorn-{request.param}")
    if backend == "sqlite":
        state = f'{{backend: sqlite, path: "{workdir / "state.db"}", prefix: PREFIX}}'
    else:
        redis: RedisServer = request.getfixturevalue("redis_proc")
        state = f'{{backend: redis, url: "{redis.url}", prefix: PREFIX}}'
    g = Served(request.param, workdir, upstream, state)
    try:
        g.start()
        with ThreadPoolExecutor(2 * WORKERS) as pool:
            list(pool.map(lambda i: g.generate(f"warm {i}", model="steady"), range(2 * WORKERS)))
        yield g
    finally:
        g.stop()


def test_a_provider_failing_through_one_worker_is_skipped_by_all_the_others(server: Served, up: Upstream) -> None:
    before = server.scrape()
    assert opened(before, "a") == 0
    n = fail_until_open(server, up, "ms-a", "chat", "a")
    mark = time.time()
    sent_before = len(up.requests("ms-a"))
    assert sent_before >= 2
    time.sleep(WITHIN_S)  # the time the other workers are given to learn it: what is under test
    answers = spread(server, "after", "chat")
    assert {a["provider"] for a in answers} == {"b"}

    after = server.scrape()
    late = [r for r in up.requests("ms-a") if r.time > mark]
    skipped = grew(after, before, "llm_router_skipped_total", alias="chat", provider="a", reason="circuit_open")
    assert late == [], f"{len(late)} requests to a after its circuit opened in another worker"
    assert skipped == len(answers)  # every call after the mark, in every worker
    assert opened(after, "a") == 1  # counted where it opened; the others learnt it
    # every call answered (by b), every request to a counted as an attempt
    assert grew(after, before, "llm_router_requests_total", alias="chat", outcome="success") == n + len(answers)
    assert grew(after, before, "llm_router_attempts_total", alias="chat", provider="a") == len(up.requests("ms-a"))


def wait_for(what: str, ok: Any, server: Served, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n{server.output()}"
        time.sleep(0.05)


@pytest.mark.parametrize("server", [s for s in SERVERS if s.endswith("-redis")], indirect=True)
def test_stopping_redis_mid_load_fails_no_call_and_the_workers_resync(
    server: Served, up: Upstream, redis_proc: RedisServer
) -> None:
    import redis

    store = redis.Redis.from_url(redis_proc.url, decode_responses=True)
    answered: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                answered.append(server.generate(f"load {n}.{i}", model="steady")["worker"])
            except BaseException as exc:  # an HTTP error (a 502: the router raised) or a broken connection
                failures.append(exc)
            i += 1

    circuits = f"{server.prefix}:circuits"

    def in_store(key: str) -> bool:
        return "open" in (store.hget(circuits, key) or "")

    before = server.scrape()
    assert value(before, "llm_router_state_store_up", backend="redis") == 1
    # Before the outage provider d fails, once: the worker that sees it opens d's circuit and shares it.
    up.set_default("ms-d", Reply(status=503, error="overloaded"))
    assert server.generate("d fails", model="more")["provider"] == "b"
    wait_for("d's circuit in redis", lambda: in_store("d/model-d"), server)
    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(WORKERS)]
    try:
        for t in threads:
            t.start()
        wait_for("load under way", lambda: len(answered) >= 20, server)
        redis_proc.stop()
        down = server.wait_metrics(lambda s: value(s, "llm_router_state_store_up", backend="redis") == 0)
        assert value(down, "llm_router_state_store_up", backend="redis") == 0
        assert grew(down, before, "llm_router_state_store_errors_total", backend="redis") > 0
        # During it provider c fails, once: the worker that sees it opens c's circuit with the store down.
        up.set_default("ms-c", Reply(status=503, error="overloaded"))
        assert server.generate("c fails", model="other")["provider"] == "b"
        during = len(answered)
        wait_for("load during the outage", lambda: len(answered) >= during + 20, server)
        # Every worker's sync thread has met the outage (each logs it once) before the store comes back.
        wait_for("every worker saw the outage", lambda: server.log_lines("unreachable") == WORKERS, server)

        redis_proc.start()  # empty: it keeps nothing on disk
        # state_store_up is the minimum over the live workers: 1 once every one has exchanged with it again
        back = server.wait_metrics(lambda s: value(s, "llm_router_state_store_up", backend="redis") == 1)
        assert value(back, "llm_router_state_store_up", backend="redis") == 1, server.output()
        stop.set()
        for t in threads:
            t.join(60)
        assert failures == []
        assert len(answered) > during + 20 and set(answered) == set(server.workers())
        errors = grew(back, before, "llm_router_state_store_errors_total", backend="redis")
        assert errors >= WORKERS  # at least one failed exchange per worker
        assert server.log_lines("unreachable") == WORKERS  # each logs the outage once...
        assert server.log_lines("reachable again; state resynchronised") == WORKERS  # ...and its end

        # Back, the store is pushed everything again: d's circuit (from before the outage) and c's (from during it).
        wait_for("c's and d's circuits in redis", lambda: in_store("c/model-c") and in_store("d/model-d"), server)
        # So a worker that starts now learns both from it, and the others have taken c's: none sends to c or d.
        killed = server.workers()[0]
        os.kill(killed, signal.SIGKILL)
        server.wait_workers(frozenset([killed]))
        time.sleep(WITHIN_S)
        for model in ("other", "more"):
            assert {a["provider"] for a in spread(server, "after the outage", model)} == {"b"}
        assert len(up.requests("ms-c")) == len(up.requests("ms-d")) == 1
        after = server.scrape()
        assert opened(after, "c") == opened(after, "d") == 1
        assert value(after, "llm_router_in_flight") == 0
    finally:
        stop.set()
        redis_proc.start()
        store.close()
