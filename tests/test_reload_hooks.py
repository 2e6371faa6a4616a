"""Hooks follow reload: an edit of `budgets:`, a cache's `ttl_s` or `ledger:` in the YAML applies to the next call,
under calls in flight; a hook whose own settings did not change is kept (and its connection with it); what a
replaced hook held is closed once no call uses it.

Every Router here is made by `Router.from_yaml` on a file in tmp_path whose providers point at the loopback
upstream; spend is read back from the real SQLite ledger and refusals from the calls themselves.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY_A, KEY_B, KEY_C
from prometheus_client import CollectorRegistry

from router import BudgetExceededError, Router
from router.config import LedgerConfig
from router.plugins.budgets import Budgets
from router.plugins.cache import CacheHook
from router.plugins.ledger import Ledger
from router.sandbox import Reply, Upstream
from router.usage import read_calls

TEMPLATE = """\
# version {serial}
version: 1
defaults: {{model: chat, timeout_s: 5, deadline_s: 10, retry: {{attempts: 1}}}}
providers:
  a: {{kind: openai, api_base: "{UP}/a/v1", api_key: "${{KEY_A}}"}}
aliases:
  chat: {{targets: [a/model-a]{cache}}}
pricing:
  a/model-a: {{input_per_1m: 0, output_per_1m: 1000}}
ledger: {{path: "{db}", flush_interval_s: 0.05}}
{budgets}
"""
CALL_USD = 0.1  # 100 output tokens (max_tokens) at $1000/1M


def render(up: Upstream, db: Path, serial: int, limit: float | None = None, ttl: float | None = None) -> str:
    budgets = f"budgets:\n  - {{name: all, period: day, limit_usd: {limit}}}" if limit is not None else ""
    cache = f", cache: {{ttl_s: {ttl}}}" if ttl is not None else ""
    return TEMPLATE.format(UP=up.url, db=db, serial=serial, budgets=budgets, cache=cache)


def write(path: Path, text: str) -> None:
    """Replace the file's content the way an editor does (write aside, rename over)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_until(cond: Callable[[], bool], timeout_s: float = 3.0) -> float | None:
    """Poll `cond` every 10 ms for at most `timeout_s`; when it became true (monotonic), or None."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return time.monotonic()
        time.sleep(0.01)
    return None


def of(r: Router, kind: type[Any]) -> Any:
    found = [h for h in r._hooks.hooks if isinstance(h, kind)]
    return found[0] if found else None


def threads_named(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name == name and t.is_alive())


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("KEY_A", KEY_A), ("KEY_B", KEY_B), ("KEY_C", KEY_C)):
        monkeypatch.setenv(name, value)


@pytest.fixture
def made(env: None) -> Iterator[list[Router]]:
    routers: list[Router] = []
    yield routers
    for r in routers:
        r.close()


def test_a_budget_limit_edited_in_the_yaml_applies_within_a_second_to_a_watching_router_under_load(
    up: Upstream, tmp_path: Path, made: list[Router]
) -> None:
    up.route("a").set_default(Reply(text="ok", usage=(5, 100), delay_s=0.01))
    path, db = tmp_path / "router.yaml", tmp_path / "ledger.sqlite3"
    write(path, render(up, db, 0, limit=1000.0))
    r = Router.from_yaml(path, registry=CollectorRegistry(), watch=True, poll_s=0.1)
    made.append(r)
    first = of(r, Budgets)
    store_key = next(k for k in r._pool._items if isinstance(k, tuple) and k[0] == "ledger-store")
    store = r._pool._items[store_key][0]

    outcomes: collections.deque[tuple[float, str]] = collections.deque()
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                r.generate("hi", max_tokens=100)
                outcomes.append((time.monotonic(), "ok"))
            except BudgetExceededError:
                outcomes.append((time.monotonic(), "refused"))
            except Exception as exc:  # anything else fails the test below
                outcomes.append((time.monotonic(), f"error: {exc!r}"))

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: sum(o == "ok" for _, o in outcomes) >= 8, timeout_s=20)
        # Lowered below what is already spent: every call from the next is refused.
        lowered_at = time.monotonic()
        write(path, render(up, db, 1, limit=0.05))
        refused_at = wait_until(lambda: any(o == "refused" for _, o in outcomes))
        assert refused_at is not None, "the lowered budget never refused a call"
        assert refused_at - lowered_at < 1.0
        time.sleep(0.3)
        settled = time.monotonic()
        time.sleep(0.2)
        assert [o for at, o in outcomes if at > settled] and all(o == "refused" for at, o in outcomes if at > settled)
        # Raised again: calls pass within a second.
        raised_at = time.monotonic()
        write(path, render(up, db, 2, limit=1000.0))
        passed_at = wait_until(lambda: any(o == "ok" and at > raised_at for at, o in outcomes))
        assert passed_at is not None and passed_at - raised_at < 1.0
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not [o for _, o in outcomes if o.startswith("error")]
    # A new Budgets hook follows each edit, on the same connection to the same database.
    assert of(r, Budgets) is not first
    assert r._pool._items[store_key][0] is store
    # The replaced hooks' settle threads stop once their calls have ended: one Budgets is left running.
    assert wait_until(lambda: threads_named("llm-router-budgets") == 1) is not None


def test_a_budget_reload_releases_no_hold_and_loses_no_spend(up: Upstream, tmp_path: Path, made: list[Router]) -> None:
    up.route("a").set_default(Reply(text="ok", usage=(5, 100), delay_s=0.05))
    path, db = tmp_path / "router.yaml", tmp_path / "ledger.sqlite3"
    write(path, render(up, db, 0, limit=1000.0))
    r = Router.from_yaml(path, registry=CollectorRegistry())
    made.append(r)
    results: list[Any] = []

    def call() -> None:
        results.append(r.generate("hi", max_tokens=100))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.02)  # the calls are in flight, holding reservations under the first Budgets hook
    write(path, render(up, db, 1, limit=999.0))
    assert r.reload()
    for t in threads:
        t.join(10)
    assert len(results) == 8
    spent = of(r, Budgets).store.spent("all", "", _today())
    assert spent == 8 * int(CALL_USD * 1e9)  # every call settled at its cost, none left reserved


def _today() -> int:
    from router.plugins.budgets import period_bounds

    return period_bounds("day", time.time())[0]


def test_a_cache_ttl_edited_in_the_yaml_applies_to_the_next_answer_on_the_same_store(
    up: Upstream, tmp_path: Path, made: list[Router]
) -> None:
    up.route("a").set_default(Reply(text="fresh", usage=(5, 10)))
    path, db = tmp_path / "router.yaml", tmp_path / "ledger.sqlite3"
    write(path, render(up, db, 0, ttl=3600))
    r = Router.from_yaml(path, registry=CollectorRegistry())
    made.append(r)
    cache = of(r, CacheHook)
    assert not r.generate("one").cached and r.generate("one").cached

    write(path, render(up, db, 1, ttl=0.3))
    assert r.reload()
    assert of(r, CacheHook) is cache  # the cache: section did not change: same hook, same store
    assert not r.generate("two").cached and r.generate("two").cached
    time.sleep(0.4)
    assert not r.generate("two").cached  # stored under the new TTL, so it expired
    assert r.generate("one").cached  # stored under the old TTL: still served

    write(path, render(up, db, 2))  # no alias caches any more: no cache hook at all
    assert r.reload()
    assert of(r, CacheHook) is None
    assert not r.generate("one").cached


def test_a_ledger_edited_in_the_yaml_writes_the_next_calls_to_the_new_database_and_closes_the_old(
    up: Upstream, tmp_path: Path, made: list[Router]
) -> None:
    up.route("a").set_default(Reply(text="ok", usage=(5, 10), delay_s=0.2))
    path, first_db, second_db = tmp_path / "router.yaml", tmp_path / "one.sqlite3", tmp_path / "two.sqlite3"
    write(path, render(up, first_db, 0))
    r = Router.from_yaml(path, registry=CollectorRegistry())
    made.append(r)
    first = of(r, Ledger)
    in_flight = threading.Thread(target=lambda: r.generate("started before the edit"))
    in_flight.start()
    time.sleep(0.05)
    write(path, render(up, second_db, 1))
    assert r.reload()
    second = of(r, Ledger)
    assert second is not first
    assert threads_named("llm-router-ledger") == 2  # a call that started on the first is still running
    r.generate("started after the edit")
    in_flight.join(10)
    # The first writer is closed (flushed, its thread ended) once that call ended.
    assert wait_until(lambda: threads_named("llm-router-ledger") == 1) is not None
    second.flush()
    assert len(read_calls(LedgerConfig(path=str(first_db)))) == 1
    assert len(read_calls(LedgerConfig(path=str(second_db)))) == 1
