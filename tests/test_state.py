"""Shared health state (`state:`): breakers and benched keys shared through SQLite and a real redis-server.

What one process (or Router) learns, the others act on within a second: they send no request to a target
whose circuit another opened, nor with a key another benched, as the upstream's request log shows. A
memory-backend control proves each test can fail. The store going away never fails a call: it is logged
once, counted, and everything is pushed again once it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeRouter, standard_env
from prometheus_client import CollectorRegistry
from redis_server import RedisServer, free_port, require

from router import ConfigError, Router, parse_config
from router.config import CircuitConfig, StateConfig
from router.health import Admission
from router.sandbox import Reply, Upstream
from router.state import CircuitRecord, RedisBackend, SqliteBackend, redis_where, shared_state

ROOT = Path(__file__).resolve().parents[1]
K1 = "sk-pool-one-1111111111aaaa"
K2 = "sk-pool-two-2222222222bbbb"
PASSWORD = "s3cret-redis-passw0rd"

CONFIG = """
version: 1
defaults:
  model: chat
  timeout_s: 5
  deadline_s: 20
  retry: {{attempts: 1, backoff_s: 0}}
  circuit: {{failure_threshold: 2, failure_ratio: null, cooldown_s: {cooldown}}}
providers:
  a: {{kind: openai, api_base: "{up}/a/v1", api_key: "${{KEY_A}}"}}
  b: {{kind: openai, api_base: "{up}/b/v1", api_key: "${{KEY_B}}"}}
  k: {{kind: openai, api_base: "{up}/k/v1", api_key: [{{name: k1, key: "{k1}"}}, {{name: k2, key: "{k2}"}}]}}
aliases:
  chat: {{targets: [a/model-a, b/model-b]}}
  pooled: {{targets: [k/model-k]}}
state: {state}
"""


def config_text(up: str, state: str, cooldown: float = 60) -> str:
    return CONFIG.format(up=up, state=state, cooldown=cooldown, k1=K1, k2=K2)


def refuse_k1(received: Any) -> Reply:
    """Route k: key k1 is refused (401), any other answers."""
    if K1 in received.headers.get("authorization", ""):
        return Reply(status=401, error="Incorrect API key provided")
    return Reply(text="ok")


def keys_used(up: Upstream) -> list[str]:
    return ["k1" if K1 in r.headers.get("authorization", "") else "k2" for r in up.requests("k")]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    binary = require()
    with RedisServer(binary) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    import redis

    redis_server.start()  # a test may have stopped it
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


def state_yaml(backend: str, tmp_path: Path, redis_url: str | None = None, sync_s: float = 0.1) -> str:
    if backend == "sqlite":
        return f'{{backend: sqlite, path: "{tmp_path / "state.db"}", sync_s: {sync_s}}}'
    if backend == "redis":
        return f'{{backend: redis, url: "{redis_url}", sync_s: {sync_s}}}'
    return "{backend: memory}"


@pytest.fixture(params=["sqlite", "redis"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The state section of a shared backend (both), each on a fresh store."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return state_yaml(request.param, tmp_path, url)


def routers(make_router: MakeRouter, up: Upstream, state: str, n: int = 2, cooldown: float = 60) -> list[Router]:
    text = config_text("{UP}", state, cooldown)
    rs = [make_router(text, real_sleep=True) for _ in range(n)]
    for r in rs:
        if r._state is not None:
            assert r._state.wait_synced(5)
    return rs


# -- config ---------------------------------------------------------------------------------------------------


def test_state_defaults_to_memory_and_starts_no_store(make_router: MakeRouter) -> None:
    r = make_router()
    assert r.config.state.backend == "memory"
    assert r._state is None


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("{backend: sqlite}", "state: backend sqlite needs path"),
        ("{backend: redis}", "state: backend redis needs url"),
        ('{backend: memory, path: "/tmp/x.db"}', "state: path is for backend sqlite, not memory"),
        ("{backend: sqlite, path: /tmp/x.db, sync_s: 0}", "state.sync_s: "),
        ("{backend: etcd}", "state.backend: "),
        ("{backend: sqlite, path: /tmp/x.db, sync: 1}", "state.sync: "),
    ],
)
def test_state_section_errors_name_the_file_line_and_key(state: str, message: str) -> None:
    text = config_text("http://127.0.0.1:1", state)
    with pytest.raises(ConfigError) as err:
        parse_config(text, "svc.yaml", env=standard_env())
    assert f"svc.yaml:{text.splitlines().index('state: ' + state) + 1}: {message}" in str(err.value)


def test_redis_url_comes_from_the_environment_and_its_password_never_shows() -> None:
    text = config_text("http://127.0.0.1:1", '{backend: redis, url: "${REDIS_URL}"}')
    with pytest.raises(ConfigError, match="REDIS_URL is not set"):
        parse_config(text, "svc.yaml", env=standard_env())
    url = f"redis://:{PASSWORD}@10.0.0.7:6380/2"
    cfg = parse_config(text, "svc.yaml", env={**standard_env(), "REDIS_URL": url})
    assert cfg.state.url is not None and cfg.state.url.get_secret_value() == url
    assert PASSWORD not in repr(cfg.state) and PASSWORD not in str(cfg.state)
    assert redis_where(url) == "10.0.0.7:6380/2"
    assert redis_where(f"rediss://user:{PASSWORD}@cache.internal/0") == "cache.internal:6379/0"
    assert redis_where(f"unix://:{PASSWORD}@/run/redis.sock") == "/run/redis.sock"


# -- the stores, two processes' views of one store --------------------------------------------------------------


def store_config(backend: str, tmp_path: Path, redis_url: str | None) -> StateConfig:
    if backend == "sqlite":
        return StateConfig(backend="sqlite", path=str(tmp_path / "s.db"), sync_s=0.05)
    return StateConfig.model_validate({"backend": "redis", "url": redis_url, "sync_s": 0.05})


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_an_open_circuit_a_benched_key_and_a_close_reach_the_other_view(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    cfg = store_config(backend, tmp_path, url)
    a, b = shared_state(cfg), shared_state(cfg)
    circuit = CircuitConfig(failure_threshold=2, failure_ratio=None, cooldown_s=0.3)
    try:
        assert a.wait_synced() and b.wait_synced()
        now = time.monotonic()
        assert a.circuits.record("p/m", circuit, now, True, False) is None
        assert b.wait_synced() and b.circuits.peek("p/m")[0] == "closed"  # one failure opens nothing
        assert a.circuits.record("p/m", circuit, now, True, False) == "open"
        a.keys.bench("p", "k1", now + 30)
        t0 = time.monotonic()
        while b.circuits.peek("p/m")[0] != "open" or b.keys.benched_until("p", "k1") == 0:
            assert time.monotonic() - t0 < 1.0, "not shared within 1 s"
            time.sleep(0.01)
        assert b.circuits.peek("p/m")[0] == "open"
        until = b.circuits.peek("p/m")[1]
        assert until == pytest.approx(now + 0.3, abs=0.05)
        assert b.keys.benched_until("p", "k1") == pytest.approx(now + 30, abs=0.05)
        assert not b.circuits.admit("p/m", circuit, time.monotonic()).allowed
        # the cooldown ends; b's probe succeeds and closes it for a too
        time.sleep(0.35)
        admission = b.circuits.admit("p/m", circuit, time.monotonic())
        assert admission.probe and admission.transition == "half_open"
        assert b.circuits.record("p/m", circuit, time.monotonic(), False, True) == "closed"
        t0 = time.monotonic()
        while a.circuits.peek("p/m")[0] != "closed":
            assert time.monotonic() - t0 < 1.0, "close not shared within 1 s"
            time.sleep(0.01)
    finally:
        a.close()
        b.close()


def test_an_older_change_never_overwrites_a_newer_one(tmp_path: Path, redis_url: str) -> None:
    backends = [
        SqliteBackend(str(tmp_path / "s.db"), "t", 1.0),
        RedisBackend(redis_url, "t", 1.0),
    ]
    for be in backends:
        try:
            be.push({"p/m": CircuitRecord("open", 200.0, 10.0)}, {("p", "k"): 50.0})
            be.push({"p/m": CircuitRecord("closed", 0.0, 5.0)}, {("p", "k"): 40.0})  # older: ignored
            assert be.pull() == ({"p/m": CircuitRecord("open", 200.0, 10.0)}, {("p", "k"): 50.0})
            be.push({"p/m": CircuitRecord("closed", 0.0, 11.0)}, {("p", "k"): 60.0})
            assert be.pull() == ({"p/m": CircuitRecord("closed", 0.0, 11.0)}, {("p", "k"): 60.0})
        finally:
            be.close()


# -- Routers over the loopback upstream --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis"])
def test_a_circuit_opened_by_one_router_is_skipped_by_the_other_within_a_second(
    make_router: MakeRouter, up: Upstream, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    one, other = routers(make_router, up, state_yaml(backend, tmp_path, url))
    try:
        up.set_default("a", Reply(status=503, error="overloaded"))
        assert [one.generate("hi").provider for _ in range(2)] == ["b", "b"]
        assert len(up.requests("a")) == 2
        time.sleep(1.0)
        assert [other.generate("hi").provider for _ in range(3)] == ["b"] * 3
        sent_to_a = len(up.requests("a")) - 2
        # memory: the other Router learns it on its own, paying two failed requests
        assert sent_to_a == (2 if backend == "memory" else 0)
    finally:
        one.close()
        other.close()


@pytest.mark.asyncio
async def test_async_a_circuit_opened_by_one_router_is_skipped_by_the_other(
    make_router: MakeRouter, up: Upstream, shared: str
) -> None:
    one, other = routers(make_router, up, shared)
    try:
        up.set_default("a", Reply(status=503, error="overloaded"))
        assert [(await one.agenerate("hi")).provider for _ in range(2)] == ["b", "b"]
        await asyncio.sleep(1.0)
        assert [(await other.agenerate("hi")).provider for _ in range(3)] == ["b"] * 3
        assert len(up.requests("a")) == 2
    finally:
        one.close()
        other.close()


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis"])
def test_a_key_benched_by_one_router_is_not_used_by_the_other(
    make_router: MakeRouter, up: Upstream, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    one, other = routers(make_router, up, state_yaml(backend, tmp_path, url))
    try:
        up.set_default("k", refuse_k1)
        assert one.generate("hi", model="pooled").provider == "k"
        assert keys_used(up) == ["k1", "k2"]
        time.sleep(1.0)
        for _ in range(3):
            other.generate("hi", model="pooled")
        assert keys_used(up)[2:] == (["k1", "k2", "k2", "k2"] if backend == "memory" else ["k2"] * 3)
    finally:
        one.close()
        other.close()


@pytest.mark.asyncio
async def test_async_a_key_benched_by_one_router_is_not_used_by_the_other(
    make_router: MakeRouter, up: Upstream, shared: str
) -> None:
    one, other = routers(make_router, up, shared)
    try:
        up.set_default("k", refuse_k1)
        await one.agenerate("hi", model="pooled")
        await asyncio.sleep(1.0)
        for _ in range(3):
            await other.agenerate("hi", model="pooled")
        assert keys_used(up) == ["k1", "k2", "k2", "k2", "k2"]
    finally:
        one.close()
        other.close()


def test_a_circuit_learnt_from_the_store_sets_this_processs_state_gauge(
    up: Upstream, tmp_path: Path, redis_url: str
) -> None:
    text = config_text(up.url, state_yaml("redis", tmp_path, redis_url))
    regs = [CollectorRegistry(), CollectorRegistry()]
    one, other = (Router(parse_config(text, "t.yaml", env=standard_env()), registry=reg) for reg in regs)
    try:
        up.set_default("a", Reply(status=503))
        one.generate("hi")
        one.generate("hi")
        labels = {"provider": "a", "model": "model-a"}
        assert regs[0].get_sample_value("llm_router_circuit_state", labels) == 2
        assert other._state is not None and other._state.wait_synced() and other._state.wait_synced()
        assert regs[1].get_sample_value("llm_router_circuit_state", labels) == 2
        # the transition is counted once, where it happened
        assert regs[0].get_sample_value("llm_router_circuit_transitions_total", {**labels, "to": "open"}) == 1
        assert regs[1].get_sample_value("llm_router_circuit_transitions_total", {**labels, "to": "open"}) is None
        assert regs[1].get_sample_value("llm_router_state_store_up", {"backend": "redis"}) == 1
    finally:
        one.close()
        other.close()


# -- the store going away ----------------------------------------------------------------------------------------


def test_a_store_that_answers_shows_up_with_its_error_count_at_zero(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    r = make_router(config_text("{UP}", state_yaml("sqlite", tmp_path)))
    try:
        assert r._state is not None and r._state.wait_synced()
        assert registry.get_sample_value("llm_router_state_store_up", {"backend": "sqlite"}) == 1
        # the series exists before any error, so the first one shows in increase() (the dashboard, the alert)
        assert registry.get_sample_value("llm_router_state_store_errors_total", {"backend": "sqlite"}) == 0
    finally:
        r.close()


def test_an_unreachable_store_fails_no_call_and_is_logged_once_and_counted(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    r = make_router(config_text("{UP}", f'{{backend: redis, url: "{url}", sync_s: 0.05, timeout_s: 0.2}}'))
    try:
        with caplog.at_level(logging.WARNING, logger="router"):
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                assert r.generate("hi").provider == "a"
        errors = registry.get_sample_value("llm_router_state_store_errors_total", {"backend": "redis"})
        assert errors is not None and errors >= 3
        assert registry.get_sample_value("llm_router_state_store_up", {"backend": "redis"}) == 0
        unreachable = [m for m in caplog.messages if "unreachable" in m]
        assert len(unreachable) == 1, caplog.messages
        assert f"redis state store at 127.0.0.1:{port}/0 unreachable" in unreachable[0]
        assert PASSWORD not in caplog.text
    finally:
        r.close()


def test_stopping_redis_mid_load_fails_no_call_and_restarting_it_resyncs(
    up: Upstream, tmp_path: Path, redis_server: RedisServer, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    text = config_text(up.url, state_yaml("redis", tmp_path, redis_url, sync_s=0.05))
    regs = [CollectorRegistry(), CollectorRegistry()]
    one, other = (Router(parse_config(text, "t.yaml", env=standard_env()), registry=reg) for reg in regs)
    failures: list[BaseException] = []
    answered = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                one.generate("hi", model="pooled")
                answered[0] += 1
            except BaseException as exc:
                failures.append(exc)

    up.set_default("k", Reply(text="ok"))
    workers = [threading.Thread(target=load) for _ in range(4)]
    try:
        with caplog.at_level(logging.WARNING, logger="router"):
            for w in workers:
                w.start()
            time.sleep(0.3)
            redis_server.stop()
            time.sleep(0.5)
            # meanwhile provider a fails: `one` opens its circuit with the store down
            up.set_default("a", Reply(status=503))
            assert [one.generate("hi").provider for _ in range(2)] == ["b", "b"]
            time.sleep(0.3)
            assert regs[0].get_sample_value("llm_router_state_store_up", {"backend": "redis"}) == 0
            errors = regs[0].get_sample_value("llm_router_state_store_errors_total", {"backend": "redis"})
            assert errors is not None and errors > 0
            redis_server.start()  # empty: it keeps nothing on disk
            assert one._state is not None and other._state is not None
            assert one._state.wait_synced() and other._state.wait_synced() and other._state.wait_synced()
            stop.set()
            for w in workers:
                w.join()
        assert failures == []
        assert answered[0] > 20
        # the circuit opened during the outage was pushed once Redis was back, and reached the other Router
        seen = len(up.requests("a"))
        assert other.generate("hi").provider == "b"
        assert len(up.requests("a")) == seen == 2
        assert regs[0].get_sample_value("llm_router_state_store_up", {"backend": "redis"}) == 1
        assert sum("unreachable" in m for m in caplog.messages) == 2  # once per Router
    finally:
        stop.set()
        one.close()
        other.close()


# -- several processes ---------------------------------------------------------------------------------------


class Worker:
    """A tests/state_worker.py process with a Router on each config file."""

    def __init__(self, *configs: Path) -> None:
        env = {**os.environ, **standard_env(), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "state_worker.py"), *map(str, configs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"worker exited with {self.proc.wait(5)}"
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_worker_processes_skip_a_target_and_a_key_another_process_found_bad(
    up: Upstream, tmp_path: Path, redis_url: str
) -> None:
    """Two worker processes, each with a Router on SQLite and one on Redis; this process finds provider a down
    and key k1 refused, on one store then the other: the workers send neither a request to a nor one with k1.
    (The memory-backend control of the same steps is test_a_circuit_opened_by_one_router_... above.)"""
    states = [state_yaml("sqlite", tmp_path), state_yaml("redis", tmp_path, redis_url)]
    texts = [textwrap.dedent(config_text(up.url, s)) for s in states]
    configs = []
    for i, text in enumerate(texts):
        configs.append(tmp_path / f"router-{i}.yaml")
        configs[-1].write_text(text)
    up.set_default("a", Reply(status=503, error="overloaded"))
    up.set_default("k", refuse_k1)
    workers = [Worker(*configs) for _ in range(2)]  # they import litellm meanwhile
    try:
        for w in workers:
            w.send("ready")
        assert all(w.reply()["ok"] for w in workers)
        for i, text in enumerate(texts):
            here = Router(parse_config(text, "t.yaml", env=standard_env()), registry=CollectorRegistry())
            try:
                to_a, keys = len(up.requests("a")), len(keys_used(up))
                assert [here.generate("hi").provider for _ in range(2)] == ["b", "b"]
                assert here.generate("hi", model="pooled").provider == "k"
                assert len(up.requests("a")) == to_a + 2 and keys_used(up)[keys:] == ["k1", "k2"]
                time.sleep(1.0)
                for w in workers:
                    w.send(f"call {i} chat 3")
                assert all(w.reply() == {"providers": ["b"] * 3, "errors": []} for w in workers)
                for w in workers:
                    w.send(f"call {i} pooled 2")
                assert all(w.reply() == {"providers": ["k"] * 2, "errors": []} for w in workers)
                assert len(up.requests("a")) == to_a + 2, states[i]
                assert keys_used(up)[keys + 2 :] == ["k2"] * 4, states[i]
            finally:
                here.close()
    finally:
        for w in workers:
            w.close()


FORKED = """
import os, sys, time
from router.config import CircuitConfig, StateConfig
from router.health import Admission
from router.state import shared_state

state = shared_state(StateConfig(backend="sqlite", path=sys.argv[1], sync_s=0.05))
assert state.wait_synced()  # the parent's thread and connection exist before the fork, as under gunicorn --preload
cfg = CircuitConfig(failure_threshold=1, failure_ratio=None, cooldown_s=60)
pid = os.fork()
if pid == 0:  # a worker: its own thread and connection, started on first use
    state.circuits.record("p/m", cfg, time.monotonic(), True, False)
    state.close()
    os._exit(0 if state.up else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
deadline = time.monotonic() + 1.0
while state.circuits.peek("p/m")[0] != "open":
    assert time.monotonic() < deadline, "the forked worker's open circuit did not reach the parent"
    time.sleep(0.01)
state.close()
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_state_made_before_a_fork_syncs_from_the_child(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", FORKED, str(tmp_path / "s.db")], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_explain_shows_the_circuits_other_processes_opened(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(textwrap.dedent(config_text("http://127.0.0.1:9", state_yaml("sqlite", tmp_path))))
    cfg = parse_config(config.read_text(), str(config), env=standard_env())
    elsewhere = shared_state(cfg.state)
    try:
        circuit = CircuitConfig(failure_threshold=1, failure_ratio=None, cooldown_s=600)
        elsewhere.circuits.record("a/model-a", circuit, time.monotonic(), True, False)
        assert elsewhere.wait_synced()
    finally:
        elsewhere.close()
    code = "import sys, router.cli; sys.exit(router.cli.main(sys.argv[1:]))"
    env = {**os.environ, **standard_env(), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", code, "explain", str(config), "chat"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"1\. a/model-a .*\n +SKIPPED: circuit open for another 59\d\.\ds", proc.stdout), proc.stdout
    assert re.search(r"2\. b/model-b .*\n +key from", proc.stdout), proc.stdout


def test_a_reload_keeps_the_store_in_force_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(textwrap.dedent(config_text("http://127.0.0.1:9", state_yaml("sqlite", tmp_path))))
    for name, value in standard_env().items():
        monkeypatch.setenv(name, value)
    r = Router.from_yaml(config, registry=CollectorRegistry())
    try:
        state = r._state
        assert state is not None and state.backend == "sqlite"
        config.write_text(textwrap.dedent(config_text("http://127.0.0.1:9", "{backend: memory}")))
        with caplog.at_level(logging.WARNING, logger="router"):
            assert r.reload()
        assert r._state is state and r._circuits is state.circuits
        assert "the state section changes at restart only; keeping state.backend sqlite" in caplog.text
    finally:
        r.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_after_the_cooldown_one_process_probes_for_all(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    cfg = store_config(backend, tmp_path, url)
    views = [shared_state(cfg) for _ in range(3)]
    # A cooldown long enough that a loaded machine cannot let it run out before every view has seen it.
    circuit = CircuitConfig(failure_threshold=1, failure_ratio=None, cooldown_s=1.5)
    try:
        assert views[0].circuits.record("p/m", circuit, time.monotonic(), True, False) == "open"
        t0 = time.monotonic()
        while any(v.circuits.peek("p/m")[0] != "open" for v in views[1:]):
            assert time.monotonic() - t0 < 1.0, "open not shared within 1 s"
            time.sleep(0.01)
        time.sleep(max(0.0, t0 + 1.55 - time.monotonic()))
        admissions = [v.circuits.admit("p/m", circuit, time.monotonic()) for v in views[::-1]]
        assert [a.probe for a in admissions] == [True, False, False]  # the first to ask probes, for everyone
        assert not any(a.allowed for a in admissions[1:])
        assert admissions[1].open_until == pytest.approx(time.monotonic() + 1.5, abs=0.3)
        # its probe succeeds: every process closes it
        assert views[2].circuits.record("p/m", circuit, time.monotonic(), False, True) == "closed"
        t0 = time.monotonic()
        while any(v.circuits.peek("p/m")[0] != "closed" for v in views[:2]):
            assert time.monotonic() - t0 < 1.0, "close not shared within 1 s"
            time.sleep(0.01)
        assert all(v.circuits.admit("p/m", circuit, time.monotonic()) == Admission(True) for v in views)
    finally:
        for v in views:
            v.close()


def test_a_probe_whose_lease_ran_out_is_claimed_by_another(tmp_path: Path) -> None:
    cfg = store_config("sqlite", tmp_path, None)
    a, b = shared_state(cfg), shared_state(cfg)
    circuit = CircuitConfig(failure_threshold=1, failure_ratio=None, cooldown_s=0.2)
    try:
        a.circuits.record("p/m", circuit, time.monotonic(), True, False)
        assert b.wait_synced() and b.wait_synced()
        time.sleep(0.25)
        assert a.circuits.admit("p/m", circuit, time.monotonic()).probe  # a's probe goes out, never to report back
        assert not b.circuits.admit("p/m", circuit, time.monotonic()).allowed
        time.sleep(0.25)
        assert b.circuits.admit("p/m", circuit, time.monotonic()).probe
    finally:
        a.close()
        b.close()
