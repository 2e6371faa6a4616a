"""Spend budgets over a real SQLite ledger: refused before any request, atomic across threads and processes."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY_A, KEY_B, KEY_C, MakeRouter, standard_config
from prometheus_client import CollectorRegistry

from router import BudgetExceededError, ConfigError, DeadlineExceededError, parse_config
from router.config import BudgetConfig, LedgerConfig, Target
from router.hooks import Call, Hook, Reroute
from router.plugins.budgets import Budgets, input_token_bound, output_token_bound, period_bounds, scope_of
from router.plugins.ledger import ledger_of
from router.plugins.store import SqliteStore, Store
from router.sandbox import Reply, Upstream
from router.usage import read_calls

# Every call to chat costs exactly its worst case: 100 output tokens (= max_tokens) at $1000/1M = $0.10.
PRICED = """
pricing:
  a/model-a: {{input_per_1m: 0, output_per_1m: 1000}}
  b/model-b: {{input_per_1m: 0, output_per_1m: 1000}}
  c/model-c: {{input_per_1m: 0, output_per_1m: 10}}
ledger: {{path: "{db}", flush_interval_s: 0.05}}
budgets:
{budgets}
"""
CALL = 0.1


def extra(db: Path, *budgets: str) -> str:
    return PRICED.format(db=db, budgets="\n".join(f"  - {b}" for b in budgets))


def answer(up: Upstream, route: str = "a", delay: float = 0.0) -> None:
    up.route(route).set_default(Reply(text="ok", usage=(5, 100), delay_s=delay))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


def test_periods_are_calendar_aligned_in_utc() -> None:
    def at(*parts: int) -> float:
        return datetime(*parts, tzinfo=timezone.utc).timestamp()  # type: ignore[misc]

    assert period_bounds("hour", at(2026, 12, 2, 16, 59, 59)) == (at(2026, 12, 2, 16), at(2026, 12, 2, 17))
    assert period_bounds("day", at(2026, 12, 31, 23, 30)) == (at(2026, 12, 31), at(2027, 1, 1))
    assert period_bounds("month", at(2028, 2, 15)) == (at(2028, 2, 1), at(2028, 3, 1))  # a leap February
    assert period_bounds("month", at(2026, 12, 1)) == (at(2026, 12, 1), at(2027, 1, 1))


def test_scopes_match_alias_provider_key_and_tags() -> None:
    t = Target("openai", "gpt-x", "openai", None, (), {}, 5.0, {})

    def b(**kw: Any) -> BudgetConfig:
        return BudgetConfig(name="b", period="day", limit_usd=1, **kw)

    tags = {"tenant": "acme", "user": "u-1"}
    assert scope_of(b(), "chat", t, None, {}) == ""
    assert scope_of(b(alias="chat"), "chat", t, None, tags) == ""
    assert scope_of(b(alias="other"), "chat", t, None, tags) is None
    assert scope_of(b(provider="openai"), "chat", t, None, tags) == ""
    assert scope_of(b(provider="anthropic"), "chat", t, None, tags) is None
    assert scope_of(b(key="team-a"), "chat", t, "team-a", tags) == ""
    assert scope_of(b(key="team-a"), "chat", t, "team-b", tags) is None
    assert scope_of(b(tags={"tenant": "acme"}), "chat", t, None, tags) == ""
    assert scope_of(b(tags={"tenant": "globex"}), "chat", t, None, tags) is None
    assert scope_of(b(per_tag="tenant"), "chat", t, None, tags) == "acme"
    assert scope_of(b(per_tag="tenant"), "chat", t, None, {}) is None


def test_the_worst_case_bounds_the_tokens() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, 世界"}]
    assert input_token_bound(messages) >= len("Be brief.") + len("Héllo, 世界".encode())
    assert output_token_bound({"max_tokens": 50}, 8192) == 50
    assert output_token_bound({"max_completion_tokens": 70}, None) == 70
    assert output_token_bound({}, 8192) == 8192
    assert output_token_bound({}, None) == 4096


def test_a_spent_budget_refuses_before_any_request(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, db: Path
) -> None:
    r = make_router(extra=extra(db, "{name: chat-month, alias: chat, period: month, limit_usd: 0.3}"))
    answer(up)
    for _ in range(3):
        assert r.generate("hi", max_tokens=100).cost_usd == pytest.approx(CALL)
    with pytest.raises(BudgetExceededError) as info:
        r.generate("hi", max_tokens=100)
    e = info.value
    assert (e.budget, e.spent_usd, e.limit_usd, e.reason) == ("chat-month", pytest.approx(0.3), 0.3, "limit")
    assert e.resets_at == datetime.fromtimestamp(period_bounds("month", e.resets_at.timestamp() - 1)[1], timezone.utc)
    assert e.resets_at.day == 1 and e.resets_at.tzinfo is not None and "resets at" in str(e)
    assert len(up.requests("a")) == 3  # the refused call sent nothing
    assert r.generate("hi", model="single", max_tokens=100).text == "ok"  # another alias: out of scope
    r.close()
    labels = {"budget": "chat-month", "reason": "limit"}
    assert registry.get_sample_value("llm_router_budget_rejections_total", labels) == 1
    assert registry.get_sample_value("llm_router_budget_remaining_usd", {"budget": "chat-month"}) == pytest.approx(0)
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "chat", "outcome": "budget_exceeded"}) == 1
    assert [g["outcome"] for g in read_calls(LedgerConfig(path=str(db)), since=0)].count("budget_exceeded") == 1


def test_the_hold_settles_to_the_real_cost(make_router: MakeRouter, up: Upstream, db: Path) -> None:
    r = make_router(extra=extra(db, "{name: all, period: day, limit_usd: 0.25}"))
    up.route("a").set_default(Reply(text="ok", usage=(5, 10)))  # $0.01 each, though $0.10 is held
    answered = 0
    with pytest.raises(BudgetExceededError) as info:
        while answered < 100:
            r.generate("hi", max_tokens=100)
            answered += 1
    assert answered == 16  # calls go on while spent + 0.10 fits in 0.25: up to 0.15 spent, then one more
    assert info.value.spent_usd == pytest.approx(0.16)
    assert r.generate("hi", max_tokens=5).text == "ok"  # a smaller worst case still fits
    r.close()


def test_a_failed_attempt_that_was_not_billed_gives_its_hold_back(
    make_router: MakeRouter, up: Upstream, db: Path
) -> None:
    r = make_router(extra=extra(db, "{name: all, period: day, limit_usd: 0.1}"))
    up.enqueue("a", Reply(status=503), Reply(status=503))
    answer(up, "b")
    assert r.generate("hi", max_tokens=100).provider == "b"  # three holds of $0.10 in turn, one billed
    with pytest.raises(BudgetExceededError):
        r.generate("hi", max_tokens=100)
    r.close()


def test_a_reached_budget_can_fall_back_to_a_cheaper_alias(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, db: Path
) -> None:
    budget = "{name: chat-day, alias: chat, period: day, limit_usd: 0.2, fallback: cheap}"
    r = make_router(standard_config(aliases="cheap: {targets: [c/model-c]}", extra=extra(db, budget)))
    answer(up)
    answer(up, "c")
    got = [r.generate("hi", max_tokens=100, tags={"tenant": "acme"}) for _ in range(4)]
    assert [g.provider for g in got] == ["a", "a", "c", "c"]
    assert got[2].cost_usd == pytest.approx(0.001)
    r.close()
    ledger = read_calls(LedgerConfig(path=str(db)), since=0)
    assert [g["rerouted_to"] for g in ledger] == [None, None, "cheap", "cheap"]
    assert (
        registry.get_sample_value("llm_router_budget_rejections_total", {"budget": "chat-day", "reason": "limit"}) == 2
    )


def test_each_value_of_a_tag_has_its_own_limit(make_router: MakeRouter, up: Upstream, db: Path) -> None:
    r = make_router(extra=extra(db, "{name: per-tenant, per_tag: tenant, period: hour, limit_usd: 0.1}"))
    answer(up)
    r.generate("hi", max_tokens=100, tags={"tenant": "acme"})
    with pytest.raises(BudgetExceededError) as info:
        r.generate("hi", max_tokens=100, tags={"tenant": "acme"})
    assert info.value.scope_value == "acme" and "(acme)" in str(info.value)
    r.generate("hi", max_tokens=100, tags={"tenant": "globex"})
    r.generate("hi", max_tokens=100)  # no tenant tag: not in the scope of a per-tenant budget
    r.close()


def test_an_unpriced_target_is_refused_unless_the_budget_allows_it(
    make_router: MakeRouter, up: Upstream, db: Path, tmp_path: Path
) -> None:
    up.route("a").set_default(Reply(text="ok", usage=(5, 5)))
    text = standard_config(extra=f'ledger: {{path: "{db}"}}\nbudgets:\n  - {{name: all, period: day, limit_usd: 1}}\n')
    r = make_router(text)
    with pytest.raises(BudgetExceededError) as info:
        r.generate("hi", model="single")
    assert info.value.reason == "unpriced" and "a/model-a" in str(info.value) and not up.requests("a")
    r.close()
    r2 = make_router(text.replace("limit_usd: 1}", "limit_usd: 1, unpriced: allow}"))
    assert r2.generate("hi", model="single").text == "ok"
    r2.close()


def test_a_budget_whose_database_is_down_refuses_unless_told_otherwise(
    make_router: MakeRouter, up: Upstream, tmp_path: Path
) -> None:
    answer(up)
    gone = tmp_path / "no-such-dir" / "ledger.sqlite3"
    r = make_router(extra=extra(gone, "{name: all, period: day, limit_usd: 1}"))
    with pytest.raises(BudgetExceededError) as info:
        r.generate("hi", max_tokens=100)
    assert info.value.reason == "unavailable" and not up.requests("a")
    r.close()
    r2 = make_router(extra=extra(gone, "{name: all, period: day, limit_usd: 1, if_unavailable: allow}"))
    assert r2.generate("hi", max_tokens=100).text == "ok"
    r2.close()


@pytest.mark.asyncio
async def test_concurrent_async_calls_never_overspend(make_router: MakeRouter, up: Upstream, db: Path) -> None:
    r = make_router(extra=extra(db, "{name: all, period: month, limit_usd: 0.5}"))
    answer(up, delay=0.2)
    got = await asyncio.gather(*(r.agenerate("hi", max_tokens=100) for _ in range(20)), return_exceptions=True)
    ok = [g for g in got if not isinstance(g, BaseException)]
    assert len(ok) == 5
    assert all(isinstance(g, BudgetExceededError) for g in got if isinstance(g, BaseException))
    assert len(up.requests("a")) == 5
    r.close()


def test_concurrent_threads_never_overspend(make_router: MakeRouter, up: Upstream, db: Path) -> None:
    r = make_router(extra=extra(db, "{name: all, period: month, limit_usd: 0.5}"))
    answer(up, delay=0.2)
    results: list[Any] = []

    def one() -> None:
        try:
            results.append(r.generate("hi", max_tokens=100))
        except BudgetExceededError as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for x in results if not isinstance(x, BudgetExceededError)) == 5
    r.close()


def test_budgets_are_checked_at_load() -> None:
    base = standard_config(extra="ledger: {}\nbudgets:\n{b}\n").replace("{UP}", "http://127.0.0.1:9")

    def problems(*items: str) -> str:
        with pytest.raises(ConfigError) as info:
            parse_config(base.replace("{b}", "\n".join(f"  - {i}" for i in items)), "t.yaml", env={})
        return str(info.value)

    assert "alias 'caht' is not defined" in problems("{name: x, alias: caht, period: day, limit_usd: 1}")
    assert "fallback: alias 'nope'" in problems("{name: x, period: day, limit_usd: 1, fallback: nope}")
    assert "used twice" in problems("{name: x, period: day, limit_usd: 1}", "{name: x, period: day, limit_usd: 2}")
    assert "period" in problems("{name: x, period: week, limit_usd: 1}")
    assert "no provider has a key named" in problems("{name: x, key: team-z, period: day, limit_usd: 1}")
    with pytest.raises(ConfigError, match="add a ledger: section"):
        text = standard_config(extra="budgets: [{name: x, period: day, limit_usd: 1}]")
        parse_config(text.replace("{UP}", "http://127.0.0.1:9"), env={})


# -- several processes ----------------------------------------------------------------------------------------

_WORKER = """
import json, os, sys, threading, time
from router import Router, BudgetExceededError
r = Router.from_yaml(sys.argv[1])
n, go = int(sys.argv[2]), sys.argv[3]
out = []
def one():
    try:
        res = r.generate("hi", max_tokens=100)
        out.append(("ok", res.cost_usd))
    except BudgetExceededError as exc:
        out.append(("refused", exc.reason))
    except Exception as exc:
        out.append(("error", repr(exc)))
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
threads = [threading.Thread(target=one) for _ in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
r.close()
print(json.dumps(out), flush=True)
"""


def _write_config(tmp_path: Path, up: Upstream, ledger: str) -> Path:
    text = standard_config(
        extra=f"""
pricing:
  a/model-a: {{input_per_1m: 0, output_per_1m: 1000}}
ledger: {ledger}
budgets:
  - {{name: fleet, alias: chat, period: month, limit_usd: 1.0}}
"""
    ).replace("{UP}", up.url)
    for k, v in {"${KEY_A}": KEY_A, "${KEY_B}": KEY_B, "${KEY_C}": KEY_C}.items():
        text = text.replace(k, v)
    path = tmp_path / "router.yaml"
    path.write_text(text)
    return path


def run_fleet(tmp_path: Path, up: Upstream, ledger: str, processes: int = 3, calls: int = 50) -> list[Any]:
    """`calls` concurrent calls from `processes` processes against a budget worth 10 calls."""
    answer(up, delay=0.3)
    cfg = _write_config(tmp_path, up, ledger)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    shares = [calls // processes + (1 if i < calls % processes else 0) for i in range(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(cfg), str(n), str(go)], env=env, stdout=subprocess.PIPE, text=True
        )
        for n in shares
    ]
    try:
        for p in procs:  # every worker has imported litellm and opened the database: start them together
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0
            results += json.loads(out.strip().splitlines()[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def check_fleet(results: list[Any], up: Upstream, spent_nusd: int) -> None:
    assert len(results) == 50
    ok = [r for r in results if r[0] == "ok"]
    assert [r for r in results if r[0] not in ("ok", "refused")] == []
    assert len(ok) == 10  # the worst case is the real cost here, so exactly the 10 that fit get through
    assert {r[1] for r in results if r[0] == "refused"} == {"limit"}
    assert len(up.requests("a")) == len(ok)  # refused calls sent nothing
    assert spent_nusd == len(ok) * 100_000_000 <= 1_000_000_000  # recorded spend never exceeds the limit


def test_fifty_calls_from_three_processes_never_overspend_a_sqlite_budget(up: Upstream, tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite3"
    results = run_fleet(tmp_path, up, f'{{path: "{db}", flush_interval_s: 0.05}}')
    rows = read_calls(LedgerConfig(path=str(db)), since=0)
    assert len(rows) == 50
    check_fleet(results, up, sum(r["cost_nusd"] for r in rows))
    assert budget_spent(SqliteStore(db)) == sum(r["cost_nusd"] for r in rows)


def budget_spent(store: Store) -> int:
    """What the budgets' own table says was spent, in nano-USD."""
    try:
        with store.transaction() as cur:
            row = cur.execute("SELECT COALESCE(SUM(spent_nusd), 0) FROM llm_budget_spend").fetchone()
    finally:
        store.close()
    assert row is not None
    return int(row[0])


class RerouteOnce(Hook):
    """A user hook on the seam: move every call off alias `chat` (to `single`)."""

    def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
        if target.provider == "a" and (call.rerouted_to or call.alias) == "chat":
            raise Reroute("single", BudgetExceededError("seam", 0, 0, datetime.now(timezone.utc)))
        if call.rerouted_to == "single":
            raise Reroute("chat", BudgetExceededError("second", 0, 0, datetime.now(timezone.utc)))


def test_a_reroute_re_plans_the_call_once(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(hooks=[RerouteOnce()])
    answer(up, "a")
    with pytest.raises(BudgetExceededError) as info:  # rerouted to single, whose hook asks again: refused
        r.generate("hi")
    assert info.value.budget == "second" and not up.requests("a")


def test_a_key_budget_counts_only_that_key(make_router: MakeRouter, up: Upstream, db: Path) -> None:
    text = standard_config(extra=extra(db, "{name: team-a, key: team-a, period: day, limit_usd: 0.1}")).replace(
        'api_key: "${KEY_A}"', 'api_key: [{name: team-a, key: "${KEY_A}"}, {name: team-b, key: "${KEY_B}"}]'
    )
    r = make_router(text)
    answer(up)
    r.generate("hi", model="single", key="team-a", max_tokens=100)
    with pytest.raises(BudgetExceededError):
        r.generate("hi", model="single", key="team-a", max_tokens=100)
    assert r.generate("hi", model="single", key="team-b", max_tokens=100).text == "ok"
    r.close()


@pytest.mark.asyncio
async def test_async_streams_reserve_and_settle_too(make_router: MakeRouter, up: Upstream, db: Path) -> None:
    r = make_router(extra=extra(db, "{name: all, period: day, limit_usd: 0.2}"))
    answer(up)
    for _ in range(2):
        stream = await r.agenerate("hi", stream=True, max_tokens=100)
        assert "".join([d async for d in stream]) == "ok"
        assert stream.result is not None and stream.result.cost_usd == pytest.approx(CALL)
    with pytest.raises(BudgetExceededError):
        await r.agenerate("hi", stream=True, max_tokens=100)
    assert len(up.requests("a")) == 2
    r.close()


# -- hedged races: several requests of one call in flight at once --------------------------------------------


def holds_left(store: Store) -> int:
    try:
        with store.transaction() as cur:
            row = cur.execute("SELECT COUNT(*) FROM llm_budget_holds").fetchone()
    finally:
        store.close()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_each_raced_request_holds_and_settles_its_own_cost(
    make_router: MakeRouter, up: Upstream, db: Path, mode: str
) -> None:
    text = standard_config(
        aliases="hedged: {targets: [a/model-a, b/model-b], hedge: {after_s: 0.2}}",
        extra=extra(db, "{name: all, period: day, limit_usd: 10}"),
    )
    r = make_router(text)
    up.enqueue("a", Reply(text="slow a", usage=(5, 100), delay_s=3.0))
    up.enqueue("b", Reply(text="quick b", usage=(5, 10)))  # $0.01, though $0.10 is held for each request
    res = (
        r.generate("hi", model="hedged", max_tokens=100)
        if mode == "sync"
        else asyncio.run(r.agenerate("hi", model="hedged", max_tokens=100))
    )
    assert res.provider == "b" and sorted(a.outcome for a in res.attempts) == ["cancelled", "success"]
    r.close()
    assert budget_spent(SqliteStore(db)) == round(res.cost_usd * 1e9) == 10 * 1000 * 1000  # b's, not 0, not a hold
    assert holds_left(SqliteStore(db)) == 0


# -- holds never leak, waits never outlast the deadline ------------------------------------------------------


def _lock_exclusively(db: Path) -> sqlite3.Connection:
    """Another process's writer holding the budget database's lock (BEGIN EXCLUSIVE) until it commits."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def _spend_rows(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM llm_budget_spend").fetchone()[0])
    finally:
        conn.close()


def test_a_call_cancelled_while_its_reservation_is_made_gives_the_hold_back(
    make_router: MakeRouter, up: Upstream, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = make_router(extra=extra(db, "{name: all, period: day, limit_usd: 1}"))
    answer(up)
    r.generate("hi", max_tokens=100)  # the schema exists, litellm is imported
    budgets = next(h for h in r._hooks.hooks if isinstance(h, Budgets))
    budgets.store.flush()
    locker = _lock_exclusively(db)  # the reservation waits in its thread

    async def cancel_mid_reservation() -> None:
        task = asyncio.create_task(r.agenerate("hi", max_tokens=100))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        locker.execute("COMMIT")  # the reservation goes through in its thread, after the call ended

    try:
        asyncio.run(cancel_mid_reservation())  # returns once the executor's threads are done: the reservation too
    finally:
        if locker.in_transaction:
            locker.execute("COMMIT")
        locker.close()
    assert not [m for m in caplog.messages if "budgets:" in m]  # the reservation was made, and did not fail
    budgets.store.flush()
    assert holds_left(SqliteStore(db)) == 0  # given back at once, not after HOLD_TTL_S
    assert len(up.requests("a")) == 1
    for _ in range(9):  # the whole dollar is still there: nine more calls fit
        r.generate("hi", max_tokens=100)
    r.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_locked_budget_database_holds_a_call_no_longer_than_its_deadline(
    make_router: MakeRouter,
    up: Upstream,
    registry: CollectorRegistry,
    db: Path,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    r = make_router(extra=extra(db, "{name: all, period: day, limit_usd: 1}"))
    answer(up)
    r.generate("hi", max_tokens=100)
    locker = _lock_exclusively(db)
    took = []
    try:
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceededError) as info:
                if mode == "sync":
                    r.generate("hi", max_tokens=100, timeout=1)
                else:
                    asyncio.run(r.agenerate("hi", max_tokens=100, timeout=1))
            took.append(time.monotonic() - t0)
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert all(0.9 < t < 1.5 for t in took), took  # not SQLite's 30 s busy wait
    assert info.value.deadline_s == pytest.approx(1, abs=0.05) and info.value.outcome == "timeout"
    assert len(up.requests("a")) == 1  # nothing was sent unchecked
    assert registry.get_sample_value("llm_router_budget_rejections_total", {"budget": "all", "reason": "deadline"}) == 2
    assert len([m for m in caplog.messages if "what was left of a call's deadline" in m]) == 1  # once
    assert r.generate("hi", max_tokens=100).text == "ok"  # unlocked: calls go through again
    r.close()


def test_budgets_reopen_a_database_file_deleted_mid_run(
    make_router: MakeRouter, up: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    db = tmp_path / "data" / "ledger.sqlite3"
    db.parent.mkdir()
    r = make_router(extra=extra(db, "{name: all, period: day, limit_usd: 0.25}"))
    answer(up)
    r.generate("hi", max_tokens=100)
    r.generate("hi", max_tokens=100)
    ledger = ledger_of(r._hooks.hooks)
    assert ledger is not None and ledger.flush(10)  # both have the file open
    shutil.rmtree(db.parent)  # $0.20 of $0.25 spent, in the file now gone
    r.generate("hi", max_tokens=100)  # a new, empty file: the budget starts again there
    r.close()
    assert budget_spent(SqliteStore(db)) == 100_000_000  # the new file holds it, not the deleted one
    assert len([m for m in caplog.messages if "deleted or replaced" in m]) == 2  # the ledger's and the budgets'
