"""Ops-driven switching: edit the YAML (or set one env var) and traffic moves, with no restart and no failed call.

Every Router here is made by `Router.from_yaml` on a file in tmp_path whose providers point at the loopback
upstream, so what a reload changed is read back from where the requests went (the upstream's history), from
the `Result`s, and from the config metrics.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY_A, KEY_B, KEY_C, Sleeps
from prometheus_client import CollectorRegistry, generate_latest

from router import AllTargetsFailedError, Result, Router
from router.sandbox import Received, Reply, Upstream

DISABLED = "LLM_ROUTER_DISABLED_PROVIDERS"

# `{chat}` is the alias's target list, `{a_extra}` more keys for provider a, `{serial}` makes each file unique.
TEMPLATE = """\
# config version {serial}
version: 1
defaults:
  model: chat
  timeout_s: 15
  deadline_s: 30
  retry: {{attempts: 2, backoff_s: 0.1, max_backoff_s: 1}}
providers:
  a: {{kind: openai, api_base: "{UP}/a/v1", api_key: "${{KEY_A}}"{a_extra}}}
  b: {{kind: openai, api_base: "{UP}/b/v1", api_key: "${{KEY_B}}"}}
  c: {{kind: openai, api_base: "{UP}/c/v1", api_key: "${{KEY_C}}"}}
aliases:
  chat: {{targets: {chat}}}
"""
# Which (provider, model) pairs each version of the alias may be served by.
A = "[a/model-a]"
B = "[b/model-b]"
A_THEN_B = "[a/model-a, b/model-b]"
SERVES = {A: {("a", "model-a")}, B: {("b", "model-b")}, A_THEN_B: {("a", "model-a"), ("b", "model-b")}}


def render(up: Upstream, chat: str = A_THEN_B, serial: int = 0, a_extra: str = "") -> str:
    return TEMPLATE.format(UP=up.url, chat=chat, serial=serial, a_extra=a_extra)


def write(path: Path, text: str) -> str:
    """Replace the file's content the way an editor does (write aside, rename over); return its sha256."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return hashlib.sha256(text.encode()).hexdigest()


def routes(up: Upstream) -> list[str]:
    return [r.route for r in up.history]


def info(registry: CollectorRegistry, sha: str) -> float | None:
    return registry.get_sample_value("llm_router_config_info", {"sha256": sha})


def reloads(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("llm_router_config_reloads_total", {"result": result}) or 0.0


def last_reload(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("llm_router_config_last_reload_timestamp_seconds")


def skipped(registry: CollectorRegistry, provider: str, model: str, reason: str, alias: str = "chat") -> float:
    labels = {"alias": alias, "provider": provider, "model": model, "reason": reason}
    return registry.get_sample_value("llm_router_skipped_total", labels) or 0.0


def wait_until(cond: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    """Poll `cond` every 20 ms for at most `timeout_s`; whether it became true."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys the config reads, in the process env (from_yaml and reload read os.environ)."""
    for name, value in (("KEY_A", KEY_A), ("KEY_B", KEY_B), ("KEY_C", KEY_C)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(DISABLED, raising=False)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "router.yaml"


@pytest.fixture
def make(env: None, path: Path, registry: CollectorRegistry, sleeps: Sleeps) -> Iterator[Callable[..., Router]]:
    """from_yaml on `path` with the test's registry and recorded sleeps; closes every Router it made."""
    made: list[Router] = []

    def build(**kwargs: Any) -> Router:
        r = Router.from_yaml(path, registry=registry, sleep=sleeps.sleep, asleep=sleeps.asleep, **kwargs)
        made.append(r)
        return r

    yield build
    for r in made:
        r.close()


# -- reload under load ---------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_twenty_reloads_under_two_hundred_calls_in_flight_fail_none(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds, per_round, bad_round = 20, 10, 13
    calls = rounds * per_round
    # Replies wait for the gate, so every call is still in flight when the last reload happens; then they
    # come back spread over 0.2-0.5 s.
    gate = threading.Event()
    draw = random.Random(4)
    delays = [0.2 + 0.3 * draw.random() for _ in range(calls)]
    lock = threading.Lock()

    def held(rec: Received) -> Reply:
        gate.wait(10)
        with lock:
            delay = delays.pop()
        return Reply(delay_s=delay, text=f"{rec.route}:{rec.model}")

    for route in "abc":
        up.set_default(route, held)
    first = write(path, render(up, A, serial=0))
    r = make()
    serves = {first: SERVES[A]}
    in_force = [first]
    stamp = last_reload(registry)
    assert stamp is not None
    bad_text = render(up, "[a/model-a, z/model-z]", serial=bad_round)
    bad_line = next(n for n, line in enumerate(bad_text.splitlines(), 1) if "z/model-z" in line)

    async def call(i: int) -> tuple[str, Result]:
        sha = r.config.sha256  # the config a call starts with is the one in force when it is made
        return sha, await r.agenerate(f"call {i}")

    tasks: list[asyncio.Task[tuple[str, Result]]] = []
    caplog.set_level(logging.ERROR, logger="router")
    for n in range(rounds):
        if n == bad_round:
            bad_sha = write(path, bad_text)
            before = last_reload(registry)
            assert r.reload() is False
            assert r.config.sha256 == in_force[-1]
            assert last_reload(registry) == before
        else:
            chat = (B, A, A_THEN_B)[n % 3]
            sha = write(path, render(up, chat, serial=n + 1))
            assert r.reload() is True
            assert r.config.sha256 == sha
            serves[sha] = SERVES[chat]
            in_force.append(sha)
        tasks += [asyncio.create_task(call(n * per_round + i)) for i in range(per_round)]
        await asyncio.sleep(0.01)  # let this round's calls start on the config just put in force
    assert registry.get_sample_value("llm_router_in_flight", {"alias": "chat"}) == calls
    gate.set()
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=45)

    failures = [x for x in done if isinstance(x, BaseException)]
    assert failures == []
    results = [x for x in done if not isinstance(x, BaseException)]
    assert len(results) == calls
    for sha, res in results:
        assert (res.provider, res.model) in serves[sha], f"served by {res.provider}/{res.model} on config {sha[:8]}"
        assert res.text == f"{res.provider}:{res.model}"
        assert [a.outcome for a in res.attempts] == ["success"]
    # Each call started on one of the configs put in force, and every config saw calls.
    assert {sha for sha, _ in results} == set(in_force) - {first}
    assert len(up.history) == calls
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "chat", "outcome": "success"}) == calls
    assert registry.get_sample_value("llm_router_in_flight", {"alias": "chat"}) == 0

    assert reloads(registry, "success") == rounds - 1
    assert reloads(registry, "error") == 1
    rejected = [rec for rec in caplog.records if rec.levelno == logging.ERROR and str(path) in rec.getMessage()]
    assert len(rejected) == 1
    assert f"{path}:{bad_line}:" in rejected[0].getMessage()
    assert "'z' is not defined" in rejected[0].getMessage()
    # Only the file in force is 1 in config_info; the rejected file never was.
    final = hashlib.sha256(path.read_bytes()).hexdigest()
    assert final == in_force[-1] == r.config.sha256
    assert info(registry, final) == 1
    assert all(info(registry, sha) is None for sha in [*in_force[:-1], bad_sha])
    assert generate_latest(registry).decode().count("llm_router_config_info{") == 1
    assert last_reload(registry) > stamp  # type: ignore[operator]


def test_reloads_from_another_thread_while_threads_call_fail_none(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry
) -> None:
    """The sync path: four threads call in a loop while a fifth reloads 20 times, A and B in turn."""
    for route in "abc":
        up.set_default(route, lambda rec: Reply(delay_s=0.02, text=f"{rec.route}:{rec.model}"))
    versions = [write(path, render(up, A, serial=0))]
    serves = {versions[0]: SERVES[A]}
    r = make()
    assert r.generate("warm up").provider == "a"  # the first call imports litellm; not inside the race
    stop = threading.Event()
    lock = threading.Lock()
    outcomes: list[tuple[int, int, Result | BaseException]] = []

    def work() -> None:
        while not stop.is_set():
            with lock:
                before = len(versions) - 1
            try:
                got: Result | BaseException = r.generate("threaded")
            except BaseException as exc:
                got = exc
            with lock:
                outcomes.append((before, len(versions) - 1, got))

    def finished_since(version: int, count: int) -> bool:
        with lock:
            return sum(1 for before, _, _ in outcomes if before >= version) >= count

    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        for n in range(1, 21):
            chat = B if n % 2 else A
            sha = write(path, render(up, chat, serial=n))
            assert r.reload() is True
            with lock:
                versions.append(sha)
                serves[sha] = SERVES[chat]
            # Two calls made on this version finish before the next reload (bounded wait).
            assert wait_until(functools.partial(finished_since, n, 2), timeout_s=10)
    finally:
        stop.set()
        for w in workers:
            w.join(10)

    assert [x for _, _, x in outcomes if isinstance(x, BaseException)] == []
    assert len(outcomes) >= 40  # two per version at least
    for before, after, res in outcomes:
        assert isinstance(res, Result)
        # The call ran on one of the versions in force while it was being made (the swap happens inside
        # reload(), just before the version is listed here, hence the one after `after`).
        allowed = set().union(*(serves[v] for v in versions[before : after + 2]))
        assert (res.provider, res.model) in allowed
    assert {res.provider for _, _, res in outcomes if isinstance(res, Result)} == {"a", "b"}
    assert reloads(registry, "success") == 20
    assert info(registry, versions[-1]) == 1


def test_invalid_file_is_rejected_and_the_last_good_config_keeps_serving(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = write(path, render(up, B))
    r = make()
    stamp = last_reload(registry)
    # A typo on line 9 (enabled misspelt): a 3 a.m. edit that must not take the router down.
    bad_text = render(up, A, a_extra=", enabeld: false")
    bad_line = next(n for n, line in enumerate(bad_text.splitlines(), 1) if "enabeld" in line)
    bad = write(path, bad_text)
    caplog.set_level(logging.ERROR, logger="router")

    assert r.reload() is False

    message = "\n".join(rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR)
    assert f"{path}:{bad_line}: providers.a.enabeld: unknown key" in message
    assert r.config.sha256 == good
    assert r.generate("still there?").provider == "b"
    assert routes(up) == ["b"]
    assert (reloads(registry, "error"), reloads(registry, "success")) == (1, 0)
    assert (info(registry, good), info(registry, bad)) == (1, None)
    assert last_reload(registry) == stamp

    # The fix goes in: the next reload applies it.
    fixed = write(path, render(up, A))
    assert r.reload() is True
    assert r.generate("fixed").provider == "a"
    assert (info(registry, good), info(registry, fixed)) == (None, 1)
    assert reloads(registry, "success") == 1
    assert last_reload(registry) >= stamp  # type: ignore[operator]


def test_a_reload_is_counted_only_once_its_sha_is_in_force(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape taken between a reload's metric writes never sees the reload counted while the old sha is still
    in force: the count goes up last (under gunicorn, a scrape reads each worker's files at any moment)."""
    old = write(path, render(up, A))
    r = make()
    new = write(path, render(up, B))
    seen: list[tuple[float | None, float | None]] = []
    success = r.metrics.config_reloads.labels("success")
    count = success.inc

    def scrape_then_count(amount: float = 1) -> None:
        seen.append((info(registry, old), info(registry, new)))
        count(amount)

    monkeypatch.setattr(success, "inc", scrape_then_count)

    assert r.reload() is True

    assert seen == [(None, 1.0)]  # what a scrape at the moment of counting sees: only the new sha
    assert reloads(registry, "success") == 1


def test_reload_needs_a_file(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry
) -> None:
    write(path, render(up))
    r = Router(make().config, registry=registry)

    with pytest.raises(RuntimeError, match="from_yaml"):
        r.reload()


def test_a_call_under_way_finishes_on_the_config_it_started_with(
    make: Callable[..., Router], path: Path, up: Upstream
) -> None:
    write(path, render(up, A))
    r = make()
    gate = threading.Event()
    up.enqueue("a", lambda rec: Reply(status=503) if gate.wait(10) else Reply(status=500))
    results: list[Result | BaseException] = []

    def work() -> None:
        try:
            results.append(r.generate("slow"))
        except BaseException as exc:
            results.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    assert wait_until(lambda: len(up.requests("a")) == 1)
    # While the first request is out, the alias moves to b only; the call's retry still goes to a.
    write(path, render(up, B))
    assert r.reload() is True
    gate.set()
    worker.join(10)

    assert [type(x) for x in results] == [Result]
    res = results[0]
    assert isinstance(res, Result)
    assert (res.provider, [a.outcome for a in res.attempts]) == ("a", ["server_error", "success"])
    assert routes(up) == ["a", "a"]
    assert r.generate("next").provider == "b"


# -- watching the file ---------------------------------------------------------------------------------------

def test_watch_picks_up_an_edit_within_two_seconds_and_close_stops_it(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry
) -> None:
    first = write(path, render(up, A))
    before = {t for t in threading.enumerate() if t.name == "llm-router-watch"}
    r = make(watch=True, poll_s=0.1)
    (watcher,) = {t for t in threading.enumerate() if t.name == "llm-router-watch"} - before
    assert r.generate("before").provider == "a"

    second = write(path, render(up, B))

    assert wait_until(lambda: r.config.sha256 == second, timeout_s=2.0)
    res = r.generate("after")
    assert (res.provider, res.model) == ("b", "model-b")
    assert routes(up) == ["a", "b"]
    assert reloads(registry, "success") == 1
    assert (info(registry, first), info(registry, second)) == (None, 1)

    r.close()
    watcher.join(2.0)
    assert not watcher.is_alive()
    write(path, render(up, A, serial=2))
    time.sleep(0.5)  # five poll periods: a live watcher would have reloaded by now
    assert r.config.sha256 == second
    assert r.generate("closed").provider == "b"


def test_watch_rejects_a_bad_edit_then_applies_the_fix(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = write(path, render(up, A))
    r = make(watch=True, poll_s=0.1)
    caplog.set_level(logging.ERROR, logger="router")
    assert r.generate("before").provider == "a"  # the watcher has taken its first look at the file by now

    write(path, render(up, "[a/model-a, b/model-b", serial=1))  # unclosed flow list
    assert wait_until(lambda: reloads(registry, "error") == 1)
    assert r.config.sha256 == good
    # the watcher counts the rejection, then logs it: wait for the log line too
    assert wait_until(
        lambda: any(f"{path}:" in rec.getMessage() and "invalid YAML" in rec.getMessage() for rec in caplog.records)
    )

    fixed = write(path, render(up, B, serial=2))
    assert wait_until(lambda: r.config.sha256 == fixed)
    assert r.generate("fixed").provider == "b"


def test_watch_started_after_an_edit_still_applies_it(
    make: Callable[..., Router], path: Path, up: Upstream
) -> None:
    """The file changed between loading it and watching it: the watcher compares with the config in force."""
    write(path, render(up, A))
    r = make()
    edited = write(path, render(up, B))

    r.watch(0.1)

    assert wait_until(lambda: r.config.sha256 == edited)
    assert r.generate("edited").provider == "b"


def test_sighup_reloads_when_the_handler_is_installed(make: Callable[..., Router], path: Path, up: Upstream) -> None:
    write(path, render(up, A))
    r = make()
    previous = signal.getsignal(signal.SIGHUP)
    try:
        r.install_sighup_handler()
        second = write(path, render(up, B))
        assert r.config.sha256 != second

        os.kill(os.getpid(), signal.SIGHUP)

        assert wait_until(lambda: r.config.sha256 == second)
        assert r.generate("after hup").provider == "b"
        assert routes(up) == ["b"]
    finally:
        signal.signal(signal.SIGHUP, previous)


# -- the emergency switches: LLM_ROUTER_DISABLED_PROVIDERS and enabled: false --------------------------------

def test_disabled_providers_env_takes_effect_on_reload(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sha = write(path, render(up, "[a/model-a, b/model-b, c/model-c]"))
    r = make()
    assert r.generate("before").provider == "a"

    monkeypatch.setenv(DISABLED, "a")
    assert r.generate("set but not reloaded").provider == "a"
    assert r.reload() is True
    results = [r.generate(f"disabled {i}") for i in range(3)]

    assert [x.provider for x in results] == ["b"] * 3
    assert all(x.skipped[0].provider == "a" and x.skipped[0].reason == "disabled" for x in results)
    assert all([a.provider for a in x.attempts] == ["b"] for x in results)
    assert routes(up) == ["a", "a", "b", "b", "b"]
    assert skipped(registry, "a", "model-a", "disabled") == 3
    assert r.config.sha256 == sha  # the file did not change; the env did
    assert "disabled by LLM_ROUTER_DISABLED_PROVIDERS" in r.explain("chat")

    monkeypatch.delenv(DISABLED)
    assert r.reload() is True
    assert r.generate("enabled again").provider == "a"
    assert skipped(registry, "a", "model-a", "disabled") == 3


def test_disabled_providers_env_applies_at_start(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write(path, render(up, "[a/model-a, b/model-b, c/model-c]"))
    monkeypatch.setenv(DISABLED, " a , b ")
    r = make()

    res = r.generate("start")

    assert res.provider == "c"
    assert [(s.provider, s.reason) for s in res.skipped] == [("a", "disabled"), ("b", "disabled")]
    assert routes(up) == ["c"]
    assert skipped(registry, "b", "model-b", "disabled") == 1


def test_disabling_every_target_fails_the_call_without_a_request(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write(path, render(up, A))
    monkeypatch.setenv(DISABLED, "a")
    r = make()

    with pytest.raises(AllTargetsFailedError) as info_:
        r.generate("nowhere to go")

    assert info_.value.attempts == []
    assert "disabled" in str(info_.value)
    assert up.history == []
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "chat", "outcome": "disabled"}) == 1


def test_unknown_name_in_disabled_providers_is_logged(
    make: Callable[..., Router], path: Path, up: Upstream, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write(path, render(up, A))
    monkeypatch.setenv(DISABLED, "aa")
    caplog.set_level(logging.WARNING, logger="router")

    r = make()

    assert any(DISABLED in rec.getMessage() and "aa" in rec.getMessage() for rec in caplog.records)
    assert r.generate("typo").provider == "a"


def test_enabled_false_in_the_yaml_skips_the_provider_from_the_next_reload(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry
) -> None:
    write(path, render(up, "[a/model-a, b/model-b]"))
    r = make()
    assert r.generate("on").provider == "a"

    write(path, render(up, "[a/model-a, b/model-b]", a_extra=", enabled: false"))
    assert r.reload() is True
    res = r.generate("off")

    assert (res.provider, [(s.provider, s.reason) for s in res.skipped]) == ("b", [("a", "disabled")])
    assert routes(up) == ["a", "b"]
    assert skipped(registry, "a", "model-a", "disabled") == 1
    assert "disabled in the config (enabled: false)" in r.explain("chat")

    # And a Router started on that file skips it from its first call.
    fresh = make()
    assert fresh.generate("fresh").provider == "b"
    assert routes(up) == ["a", "b", "b"]


# -- what an operator needs from the text -------------------------------------------------------------------

def test_reload_logs_and_config_metrics_never_show_a_key(
    make: Callable[..., Router], path: Path, up: Upstream, registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write(path, render(up, A))
    caplog.set_level(logging.DEBUG, logger="router")
    r = make()
    write(path, render(up, B, serial=1))
    assert r.reload() is True
    write(path, render(up, B, serial=2).replace("kind: openai", "kind: Open AI", 1))
    assert r.reload() is False

    text = caplog.text + generate_latest(registry).decode() + r.explain()
    for secret in (KEY_A, KEY_B, KEY_C):
        assert secret not in text
    assert "config reloaded from" in caplog.text
