"""Metrics across worker processes: the examples/ apps under real gunicorn with 4 workers (sync workers for the
Django app, uvicorn workers for the FastAPI one), PROMETHEUS_MULTIPROC_DIR set, calling the loopback upstream
of this test process. /metrics, whichever worker answers it, serves the sum over all of them; killed workers
lose no counts and leave no in-flight calls behind; a reload that reached every worker shows only its sha256.

Without the variable nothing changes: the rest of the suite runs in one process without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY_A, MakeRouter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import router
from router.metrics import RouterMetrics
from router.sandbox import Reply, Upstream

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).parent / "gunicorn"
WORKERS = 4
APPS = {
    "wsgi": ("examples.django_app:application", "sync"),
    "asgi": ("examples.fastapi_app:app", "uvicorn_worker.UvicornWorker"),
}
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
aliases:
  chat: {{targets: [a/model-a]}}
  slow: {{targets: [slow/model-s]}}
  flaky: {{targets: [flaky/model-f]}}
{more}
pricing:
  a/model-a: {{input_per_1m: 1.0, output_per_1m: 2.0}}
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Exposition text as {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def grew(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(ls) for (n, ls), _ in samples.items() if n == name]


class Gunicorn:
    """A real gunicorn master with WORKERS workers serving one of the example apps on a loopback socket."""

    def __init__(self, app: str, worker_class: str, workdir: Path, up: Upstream) -> None:
        self.app, self.worker_class, self.workdir = app, worker_class, workdir
        self.mp_dir = workdir / "metrics"
        self.config = workdir / "router.yaml"
        self.write_config(up.url)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.set_inheritable(True)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.master_metrics_port = probe.getsockname()[1]
        probe.close()
        self.log = open(workdir / "gunicorn.log", "wb")  # noqa: SIM115  (closed in stop())
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, up_url: str, more: str = "") -> str:
        text = CONFIG.format(up=up_url, more=more)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)
        return hashlib.sha256(text.encode()).hexdigest()

    def start(self) -> None:
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(self.mp_dir),
            "LLM_ROUTER_CONFIG": str(self.config),
            "LLM_ROUTER_WATCH": "1",
            "LLM_ROUTER_METRICS_PORT": str(self.master_metrics_port),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "KEY_A": KEY_A,
        }
        fd = self.sock.fileno()
        self.proc = subprocess.Popen(
            [
                str(GUNICORN),
                "-c",
                "examples/gunicorn.conf.py",
                "--workers",
                str(WORKERS),
                "--worker-class",
                self.worker_class,
                "--bind",
                f"fd://{fd}",
                "--timeout",
                "120",
                "--no-control-socket",
                self.app,
            ],
            cwd=ROOT,
            env=env,
            pass_fds=(fd,),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_workers()

    def workers(self) -> list[int]:
        assert self.proc is not None
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def wait_workers(self, old: frozenset[int] = frozenset(), timeout: float = 60) -> list[int]:
        """Wait for WORKERS workers not in `old` that have built their Router (their config is in the files)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited:\n{self.output()}")
            pids = self.workers()
            if (
                len(pids) == WORKERS
                and not old & set(pids)
                and all((self.mp_dir / f"gauge_livemax_{p}.db").exists() for p in pids)
            ):
                return pids
            time.sleep(0.1)
        raise AssertionError(f"{WORKERS} workers did not come up in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.workdir / "gunicorn.log").read_text(errors="replace")[-4000:]

    def generate(self, prompt: str, model: str = "chat") -> dict[str, Any]:
        body = json.dumps({"prompt": prompt, "model": model}).encode()
        req = urllib.request.Request(f"{self.url}/generate", body, {"Content-Type": "application/json"})
        return json.loads(self._get(req))  # type: ignore[no-any-return]

    def refused(self, prompt: str, model: str) -> dict[str, Any]:
        """A call the app answers 502: the router raised (the error's type and message)."""
        body = json.dumps({"prompt": prompt, "model": model}).encode()
        req = urllib.request.Request(f"{self.url}/generate", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=90)
        assert exc.value.code == 502
        return json.loads(exc.value.read())  # type: ignore[no-any-return]

    def scrape(self, url: str | None = None) -> Samples:
        return parse(self._get(urllib.request.Request(url or f"{self.url}/metrics")).decode())

    def _get(self, req: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(req, timeout=90) as resp:
                return resp.read()  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{req.full_url}: {exc.code} {exc.read()[:2000]!r}\n{self.output()}") from None

    def wait_metrics(self, ok: Callable[[Samples], bool], timeout: float = 20) -> Samples:
        deadline = time.monotonic() + timeout
        while True:
            samples = self.scrape()
            if ok(samples) or time.monotonic() > deadline:
                return samples
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        self.log.close()


@pytest.fixture(scope="module", params=list(APPS))
def server(
    request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    if not GUNICORN.exists():
        pytest.fail(f"{GUNICORN} is missing: `make install` installs gunicorn with the dev extra")
    app, worker_class = APPS[request.param]
    g = Gunicorn(app, worker_class, tmp_path_factory.mktemp(f"gunicorn-{request.param}"), upstream)
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
