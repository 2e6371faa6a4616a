"""Metrics across worker processes: the examples/ apps under real gunicorn with 4 workers (sync workers for the
Django app, uvicorn workers for the FastAPI one), PROMETHEUS_MULTIPROC_DIR set, calling the loopback upstream
of this test process. /metrics, whichever worker answers it, serves the sum over all of them; killed workers
lose no counts and leave no in-flight calls behind; a reload that reached every worker shows only its sha256.
Without `state:` (the memory backend) each worker finds a failing provider on its own: the control of
tests/test_multiprocess_state.py, where the workers share that through SQLite or Redis.

Without the variable nothing changes: the rest of the suite runs in one process without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import MakeRouter
from gunicorn_server import (
    APPS,
    GUNICORN,
    ROOT,
    WORKERS,
    Gunicorn,
    Samples,
    fail_until_open,
    grew,
    opened,
    series,
    spread,
    value,
)
from prometheus_client import CollectorRegistry

import router
from router.metrics import RouterMetrics
from router.sandbox import Reply, Upstream

CONFIG = """
version: 1
defaults: {{model: chat, timeout_s: 30, deadline_s: 60, retry: {{attempts: 1}}}}
providers:
  a: {{kind: openai, api_base: "{up}/mp-a/v1", api_key: "${{KEY_A}}"}}
  slow: {{kind: openai, api_base: "{up}/mp-slow/v1", api_key: "${{KEY_A}}"}}
  flaky:
    kind: openai
    api_base: "{up}/mp-flaky/v1"
    api_key: "${{KEY_A}}"
    circuit: {{failure_threshold: 1, cooldown_s: 600}}
  down:
    kind: openai
    api_base: "{up}/mp-down/v1"
    api_key: "${{KEY_A}}"
    circuit: {{failure_threshold: 2, failure_ratio: null, cooldown_s: 600}}
aliases:
  chat: {{targets: [a/model-a]}}
  fallback: {{targets: [down/model-d, a/model-a]}}
  slow: {{targets: [slow/model-s]}}
  flaky: {{targets: [flaky/model-f]}}
{more}
pricing:
  a/model-a: {{input_per_1m: 1.0, output_per_1m: 2.0}}
"""


@pytest.fixture(scope="module", params=list(APPS))
def server(
    request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    if not GUNICORN.exists():
        pytest.fail(f"{GUNICORN} is missing: `make install` installs gunicorn with the dev extra")
    app, worker_class = APPS[request.param]
    g = Gunicorn(app, worker_class, tmp_path_factory.mktemp(f"gunicorn-{request.param}"), upstream, CONFIG)
    try:
        g.start()
        # Every worker's first call imports LiteLLM: pay for it here, and on all workers at once.
        with ThreadPoolExecutor(2 * WORKERS) as pool:
            list(pool.map(lambda i: g.generate(f"warm {i}"), range(2 * WORKERS)))
        yield g
    finally:
        g.stop()


def test_calls_spread_over_workers_add_up_exactly(server: Gunicorn, up: Upstream) -> None:
    before = server.scrape()
    n = 40
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: server.generate(f"question {i}"), range(n)))
    assert len({a["worker"] for a in answers}) >= 2, "the calls did not spread over the workers"
    assert set(server.workers()) >= {a["worker"] for a in answers}

    after = server.scrape()
    master = server.scrape(f"http://127.0.0.1:{server.master_metrics_port}/metrics")  # the master's own server
    for samples in (after, master):
        assert grew(samples, before, "llm_router_requests_total", alias="chat", outcome="success") == n
        assert grew(samples, before, "llm_router_attempts_total", alias="chat", provider="a", outcome="success") == n
        assert grew(samples, before, "llm_router_request_duration_seconds_count", alias="chat", outcome="success") == n
        assert grew(samples, before, "llm_router_request_duration_seconds_bucket", alias="chat", le="+Inf") == n
        cost = grew(samples, before, "llm_router_cost_usd_total", alias="chat")
        assert cost == pytest.approx(sum(a["cost_usd"] for a in answers)) and cost > 0
        assert value(samples, "llm_router_in_flight", alias="chat") == 0
        assert value(samples, "llm_router_worker_processes") == WORKERS
    assert len(up.requests("mp-a")) == n


def _slow_calls(server: Gunicorn, k: int) -> tuple[list[threading.Thread], list[BaseException]]:
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            server.generate(f"slow {i}", model="slow")
        except (urllib.error.URLError, ConnectionError, OSError) as exc:  # the worker was killed under it
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    return threads, errors


def test_in_flight_sums_the_calls_under_way_in_all_workers(server: Gunicorn, up: Upstream) -> None:
    up.set_default("mp-slow", Reply(delay_s=2.0))
    threads, errors = _slow_calls(server, 2)
    during = server.wait_metrics(lambda s: value(s, "llm_router_in_flight", alias="slow") == 2)
    assert value(during, "llm_router_in_flight", alias="slow") == 2
    for t in threads:
        t.join(30)
    assert errors == []
    after = server.scrape()
    assert value(after, "llm_router_in_flight", alias="slow") == 0


def test_killed_workers_lose_no_counts_and_leave_no_in_flight(server: Gunicorn, up: Upstream) -> None:
    for i in range(8):
        server.generate(f"before {i}")
    up.enqueue("mp-flaky", Reply(status=503))
    assert server.refused("fails once", "flaky")["error"] == "AllTargetsFailedError"
    flaky = {"provider": "flaky", "model": "model-f"}
    before = server.scrape()
    assert value(before, "llm_router_circuit_state", **flaky) == 2  # open in the worker that saw it fail
    up.set_default("mp-slow", Reply(delay_s=15.0))
    threads, errors = _slow_calls(server, 2)
    during = server.wait_metrics(lambda s: value(s, "llm_router_in_flight", alias="slow") == 2)
    assert value(during, "llm_router_in_flight", alias="slow") == 2

    old = server.workers()
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    server.wait_workers(frozenset(old))
    for t in threads:
        t.join(30)
    assert len(errors) == 2  # both calls died with their workers: never answered, so never counted

    after = server.scrape()
    assert value(after, "llm_router_worker_processes") == WORKERS  # the new ones; the killed ones marked dead
    assert value(after, "llm_router_in_flight") == 0
    assert [ls for ls in series(after, "llm_router_circuit_state") if ls["provider"] == "flaky"] == []  # died with it
    assert value(after, "llm_router_circuit_transitions_total", to="open", **flaky) == 1  # counted for good
    for name in ("llm_router_requests_total", "llm_router_attempts_total", "llm_router_request_duration_seconds_count"):
        assert value(after, name, alias="chat") == value(before, name, alias="chat") > 0
    for i in range(8):
        server.generate(f"after {i}")
    again = server.scrape()
    assert (
        value(again, "llm_router_requests_total", alias="chat")
        == value(before, "llm_router_requests_total", alias="chat") + 8
    )


def test_a_reload_that_reached_every_worker_shows_only_the_new_sha(server: Gunicorn, up: Upstream) -> None:
    start = server.scrape()
    shas = [ls["sha256"] for ls in series(start, "llm_router_config_info")]
    assert len(shas) == 1
    old_sha = shas[0]
    reloads = value(start, "llm_router_config_reloads_total", result="success")
    edited = time.time()
    new_sha = server.write_config(up.url, more=f"  extra: {{targets: [a/model-a], params: {{seed: {int(edited)}}}}}")
    assert new_sha != old_sha

    def reloaded(s: Samples) -> bool:
        return value(s, "llm_router_config_reloads_total", result="success") - reloads == WORKERS

    after = server.wait_metrics(reloaded)
    assert reloaded(after), f"not every worker reloaded:\n{server.output()}"
    assert series(after, "llm_router_config_info") == [{"sha256": new_sha}]
    assert value(after, "llm_router_config_info", sha256=new_sha) == 1
    assert value(after, "llm_router_config_last_reload_timestamp_seconds") >= edited - 1  # every worker's is
    assert server.generate("on the new config", model="extra")["provider"] == "a"


def test_without_a_shared_store_each_worker_finds_a_failing_provider_on_its_own(server: Gunicorn, up: Upstream) -> None:
    """The control of tests/test_multiprocess_state.py's test on sqlite and redis: the same steps on the memory
    backend (this config has no `state:`). Every worker sends down's requests until it has seen them fail."""
    before = server.scrape()
    fail_until_open(server, up, "mp-down", "fallback", "down")
    mark = time.time()
    time.sleep(1.0)  # what the shared backends are given to share the verdict
    answers = spread(server, "after", "fallback")
    assert {a["provider"] for a in answers} == {"a"}
    after = server.scrape()
    late = [r for r in up.requests("mp-down") if r.time > mark]
    assert late, "the other workers sent no request to down: the shared-state test could not fail"
    assert len(up.requests("mp-down")) >= 2 * WORKERS  # failure_threshold in each (more in an async one)
    assert opened(after, "down") - opened(before, "down") == WORKERS  # each opened its own
    skipped = grew(after, before, "llm_router_skipped_total", alias="fallback", provider="down", reason="circuit_open")
    assert skipped == len(answers) - len(late)


# -- stopping -------------------------------------------------------------------------------------------------

STOP_CONFIG = """
version: 1
defaults: {{model: chat, timeout_s: 30, deadline_s: 60, retry: {{attempts: 1}}}}
providers:
  a: {{kind: openai, api_base: "{up}/mp-stop/v1", api_key: "${{KEY_A}}"}}
aliases:
  chat: {{targets: [a/model-a]}}
{more}
pricing:
  a/model-a: {{input_per_1m: 1.0, output_per_1m: 2.0}}
ledger: {{path: "LEDGER", flush_interval_s: 600}}
"""
# SIGTERM to the master's exit with the example config: measured 0.3-0.4 s on two busy cores (3-6 s before
# preload() froze the inherited heap and worker_exit skipped its teardown; a bare gunicorn app: 0.12 s). The
# promise is 2 s; the slack is for a loaded CI machine, not for the shutdown itself.
STOP_WITHIN_S = 2.0
STOP_SLACK_S = 0.5


def ledger_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'llm_calls'").fetchone():
            return 0
        return int(db.execute("SELECT count(*) FROM llm_calls").fetchone()[0])


def test_sync_workers_stop_within_two_seconds_of_sigterm_losing_no_call(up: Upstream, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    g = Gunicorn(APPS["wsgi"][0], "sync", tmp_path, up, STOP_CONFIG.replace("LEDGER", str(ledger)), workers=2)
    try:
        g.start()
        warm = 4
        for i in range(warm):
            assert g.generate(f"warm {i}")["provider"] == "a"
        # Two calls under way when the signal comes, one in each worker (a sync worker serves one at a time).
        up.enqueue("mp-stop", Reply(text="late answer", delay_s=0.4), Reply(text="late answer", delay_s=0.4))
        answers: list[dict[str, object]] = []
        calls = [threading.Thread(target=lambda i=i: answers.append(g.generate(f"in flight {i}"))) for i in (1, 2)]
        for t in calls:
            t.start()
        deadline = time.monotonic() + 10
        while len(up.requests("mp-stop")) < warm + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(up.requests("mp-stop")) == warm + 2, g.output()
        assert ledger_rows(ledger) == 0  # flushed every 600 s: only the exit can have written the rows

        assert g.proc is not None
        t0 = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        code = g.proc.wait(30)
        took = time.monotonic() - t0

        for t in calls:
            t.join(10)
        assert [a["text"] for a in answers] == ["late answer", "late answer"]  # answered, not cut off
        assert len({a["worker"] for a in answers}) == 2
        assert took < STOP_WITHIN_S + STOP_SLACK_S, f"gunicorn took {took:.2f}s to stop:\n{g.output()}"
        assert code == 0 and "exited with code" not in g.output(), g.output()
        # every call's row, written by the workers on their way out
        spooled = sorted(p.name for p in tmp_path.iterdir() if "spool" in p.name or "dead" in p.name)
        assert ledger_rows(ledger) == warm + 2, f"spool files: {spooled}\n{g.output()}"
    finally:
        g.stop()


def test_exit_worker_runs_the_atexit_handlers_and_keeps_the_exit_code(tmp_path: Path) -> None:
    """router.exit_worker() in a `finally` while SystemExit(3) propagates: the handlers run, the code stays 3;
    with a non-daemon thread alive it leaves the exit to the interpreter, which waits for the thread."""
    script = """
import atexit, sys, threading, time
import router
atexit.register(lambda: open(sys.argv[1], "a").write("atexit ran\\n"))
if sys.argv[2] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), open(sys.argv[1], "a").write("thread done\\n"))).start()
try:
    sys.exit(3)
finally:
    router.exit_worker()
    open(sys.argv[1], "a").write("fell through to the interpreter\\n")
"""
    for case, lines in (
        ("plain", ["atexit ran"]),
        ("thread", ["fell through to the interpreter", "thread done", "atexit ran"]),
    ):
        out = tmp_path / f"{case}.txt"
        done = subprocess.run([sys.executable, "-c", script, str(out), case], cwd=ROOT, timeout=60)
        assert done.returncode == 3
        assert out.read_text().splitlines() == lines


# -- in this process, without multiprocess mode -------------------------------------------------------------


def test_metrics_registry_is_the_default_routers_without_the_variable(
    make_router: MakeRouter, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    r = make_router()
    router.set_default_router(r)
    try:
        assert router.metrics_registry() is registry
        router.mark_process_dead(os.getpid())  # nothing to mark: a no-op
        r.generate("hi")
        assert registry.get_sample_value("llm_router_requests_total", {"alias": "chat", "outcome": "success"}) == 1
    finally:
        router.set_default_router(None)


def test_a_variable_set_too_late_is_reported_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # prometheus_client picks its value class at import: this process imported it without the variable.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "mp"))
    monkeypatch.setattr("router.metrics._warned_late_env", False)
    reg = CollectorRegistry()
    with caplog.at_level(logging.WARNING, logger="router"):
        m = RouterMetrics(reg)
    assert not m.multiprocess
    assert "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported" in caplog.text
    m.config_in_force("new", "old", 1.0)
    m.config_in_force("newer", "new", 2.0)
    assert reg.get_sample_value("llm_router_config_info", {"sha256": "newer"}) == 1
    assert reg.get_sample_value("llm_router_config_info", {"sha256": "new"}) is None
    assert not (tmp_path / "mp").exists()


# -- the aggregation rules, on prometheus_client's real files, with two workers simulated in this process ----


@pytest.fixture
def as_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], None]]:
    """as_worker(pid): what is recorded from now on goes to worker `pid`'s files, as after a fork to it."""
    from prometheus_client import values

    pid = [0]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: pid[0]))

    def switch(to: int) -> None:
        pid[0] = to

    yield switch
    values.close_all_multiprocess_files()


def test_the_aggregate_sums_counts_of_all_and_gauges_of_live_workers(
    as_worker: Callable[[int], None], tmp_path: Path
) -> None:
    as_worker(1001)
    w1 = RouterMetrics(CollectorRegistry())
    assert w1.multiprocess
    w1.config_in_force("sha-old", None, 100.0)
    for _ in range(5):
        w1.request_started("chat")
        w1.request_finished("chat", "success", 0.2)
    w1.request_started("chat")
    w1.request_started("chat")  # two calls under way when it dies
    w1.circuit("a", "model-a", "open", 2, True)

    as_worker(1002)  # another worker, started later, then reloaded
    w2 = RouterMetrics(CollectorRegistry())
    w2.config_in_force("sha-old", None, 200.0)
    for _ in range(3):
        w2.request_started("chat")
        w2.request_finished("chat", "success", 0.2)
    w2.request_started("chat")
    w2.config_in_force("sha-new", "sha-old", 300.0)
    time.sleep(0.01)
    w2.circuit("a", "model-a", "closed", 0, True)  # its probe closed the circuit after the other worker opened it

    reg = router.metrics_registry()
    get = reg.get_sample_value
    assert get("llm_router_requests_total", {"alias": "chat", "outcome": "success"}) == 8
    assert get("llm_router_request_duration_seconds_count", {"alias": "chat", "outcome": "success"}) == 8
    assert get("llm_router_in_flight", {"alias": "chat"}) == 3
    assert get("llm_router_worker_processes") == 2
    assert get("llm_router_circuit_state", {"provider": "a", "model": "model-a"}) == 0  # the state recorded last
    assert get("llm_router_config_info", {"sha256": "sha-old"}) == 1  # worker 1001 still has it in force
    assert get("llm_router_config_info", {"sha256": "sha-new"}) == 1
    assert get("llm_router_config_last_reload_timestamp_seconds") == 100  # not every worker has reloaded since

    router.mark_process_dead(1001)
    assert get("llm_router_requests_total", {"alias": "chat", "outcome": "success"}) == 8  # its counts stay
    assert get("llm_router_circuit_transitions_total", {"provider": "a", "model": "model-a", "to": "open"}) == 1
    assert get("llm_router_in_flight", {"alias": "chat"}) == 1  # its calls under way went with it
    assert get("llm_router_worker_processes") == 1
    assert get("llm_router_config_info", {"sha256": "sha-old"}) is None  # no live worker has it in force
    assert get("llm_router_config_info", {"sha256": "sha-new"}) == 1
    assert get("llm_router_config_last_reload_timestamp_seconds") == 300
    router.mark_process_dead(1001)  # twice: nothing left to drop
    assert sorted(p.name for p in tmp_path.glob("*_1001.db")) == ["counter_1001.db", "histogram_1001.db"]
