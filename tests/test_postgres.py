"""The fleet path: the ledger and budgets on a real PostgreSQL (tests/pg_server.py), restarted under load."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import MakeRouter
from pg_server import PgServer, pg_dsn, pg_server  # noqa: F401  (fixtures)
from prometheus_client import CollectorRegistry
from test_budgets import budget_spent, check_fleet, run_fleet
from test_ledger import PRICES

from router import BudgetExceededError, DeadlineExceededError, query_usage
from router.config import LedgerConfig
from router.hooks import Call, Hook
from router.plugins.ledger import call_row, dead_letter_path, ledger_of
from router.plugins.store import CALL_COLUMNS, PostgresStore
from router.sandbox import Reply, Upstream
from router.usage import read_calls


def pg_extra(dsn: str, spool: Path | None, budgets: str = "") -> str:
    text = PRICES.format(path="", interval=0.05, more=f', spool_path: "{spool}"' if spool else "")
    return text.replace('path: "", ', f'dsn: "{dsn}", ') + budgets


def test_rows_and_usage_on_postgres(make_router: MakeRouter, up: Upstream, pg_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    r = make_router(extra=pg_extra(pg_dsn, tmp_path / "spool"))
    up.route("a").set_default(Reply(text="ok", usage=(10, 20)))
    for tenant in ("acme", "acme", "globex"):
        r.generate("hi", tags={"tenant": tenant, "user": "u-1"})
    r.close()
    got = read_calls(LedgerConfig(dsn=pg_dsn), since=0)  # type: ignore[arg-type]
    assert [g["tags"]["tenant"] for g in got] == ["acme", "acme", "globex"]
    usage = query_usage(r.config, since="1h", by=["tenant", "day"])
    assert [(u.group["tenant"], u.calls, u.cost_nusd) for u in usage] == [
        ("acme", 2, sum(g["cost_nusd"] for g in got[:2])),
        ("globex", 1, got[2]["cost_nusd"]),
    ]
    assert usage[0].group["day"] == time.strftime("%Y-%m-%d", time.gmtime())


def test_a_postgres_restart_under_load_loses_no_row(
    make_router: MakeRouter,
    up: Upstream,
    pg_server: PgServer,  # noqa: F811
    pg_dsn: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    r = make_router(extra=pg_extra(pg_dsn, tmp_path / "spool"))
    ledger = ledger_of(r._hooks.hooks)
    assert ledger is not None
    up.route("a").set_default(Reply(text="ok", usage=(1, 1)))
    r.generate("warm-up", tags={"worker": "w", "n": "0"})  # litellm is imported before the load starts
    made: list[str] = ["w-0"]
    failures: list[BaseException] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                r.generate("hi", tags={"worker": str(worker), "n": str(i)})
                made.append(f"{worker}-{i}")
            except BaseException as exc:  # a call must never fail because the ledger is down
                failures.append(exc)
            i += 1
            time.sleep(0.005)

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        before = len(made)
        pg_server.stop()
        time.sleep(6.5)  # longer than the store's 5 s wait for a connection: batches go to the spool
        during = len(made) - before
        pg_server.start()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        if not pg_server_running(pg_server):
            pg_server.start()
    deadline = time.monotonic() + 30
    while ledger.writer.spool.pending() and time.monotonic() < deadline:  # the pool reconnects with a backoff
        ledger.flush(10)
        time.sleep(0.2)
    r.close()
    assert failures == []
    assert during > 0  # calls went on while the database was down
    assert ledger.writer.spooled > 0  # and their rows waited in the spool
    got = read_calls(LedgerConfig(dsn=pg_dsn), since=0)  # type: ignore[arg-type]
    assert sorted(f"{g['tags']['worker']}-{g['tags']['n']}" for g in got) == sorted(made)


def pg_server_running(server: PgServer) -> bool:
    try:
        import psycopg

        psycopg.connect(server.dsn, connect_timeout=2).close()
        return True
    except Exception:
        return False


def test_a_postgres_budget_refuses_when_spent(
    make_router: MakeRouter,
    up: Upstream,
    pg_dsn: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    budgets = "budgets:\n  - {name: chat, alias: chat, period: day, limit_usd: 0.0002}\n"
    r = make_router(extra=pg_extra(pg_dsn, tmp_path / "spool", budgets))
    up.route("a").set_default(Reply(text="ok", usage=(10, 20)))  # $0.00005, the worst case at max_tokens=20 too
    answered = 0
    with pytest.raises(BudgetExceededError) as info:
        while answered < 10:
            r.generate("hi", max_tokens=20)
            answered += 1
    r.close()
    assert 1 <= answered <= 4 and info.value.budget == "chat"
    assert budget_spent(PostgresStore(pg_dsn)) <= 200_000


def test_fifty_calls_from_three_processes_never_overspend_a_postgres_budget(
    up: Upstream,
    pg_dsn: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    results = run_fleet(tmp_path, up, f'{{dsn: "{pg_dsn}", flush_interval_s: 0.05, spool_path: "{tmp_path}/spool"}}')
    rows = read_calls(LedgerConfig(dsn=pg_dsn), since=0)  # type: ignore[arg-type]
    assert len(rows) == 50
    check_fleet(results, up, sum(r["cost_nusd"] for r in rows))
    assert budget_spent(PostgresStore(pg_dsn)) == sum(r["cost_nusd"] for r in rows)


# -- the ledger never stops for one row, and a spool belongs to one database --------------------------------


class Corrupt(Hook):
    """A buggy plugin: it puts a NUL into the tags of calls tagged poison, after the router checked them."""

    def call_started(self, call: Call) -> None:
        if "poison" in call.tags:
            call.tags = {**call.tags, "user": "evil\x00"}


def pg_rows(dsn: str) -> list[dict[str, Any]]:
    return read_calls(LedgerConfig(dsn=dsn), since=0)  # type: ignore[arg-type]


def test_rows_postgres_refuses_are_dead_lettered_and_the_rest_written(
    make_router: MakeRouter,
    up: Upstream,
    registry: CollectorRegistry,
    pg_dsn: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    r = make_router(
        extra=pg_extra(pg_dsn, spool).replace("flush_interval_s: 0.05", "flush_interval_s: 30"), hooks=[Corrupt()]
    )
    led = ledger_of(r._hooks.hooks)
    assert led is not None
    up.route("a").set_default(Reply(text="ok", usage=(1, 1)))
    for i in range(3):
        r.generate("hi", tags={"n": str(i)})
    r.generate("hi", tags={"n": "poison", "poison": "1"})  # JSON text with \u0000: PostgreSQL refuses it
    led.writer.put(_row(provider="nul\x00here"))  # refused by psycopg before it is sent
    led.writer.put(_row(model="half\ud800"))  # not UTF-8
    led.writer.put(_row(id=base64.b64encode(os.urandom(9000)).decode()))  # too large for the primary key's index
    for i in range(3, 6):
        r.generate("hi", tags={"n": str(i)})
    assert led.flush(20)  # all of it one batch
    r.generate("hi", tags={"n": "6"})  # and the ledger goes on
    r.close()
    assert sorted(g["tags"]["n"] for g in pg_rows(pg_dsn)) == [str(i) for i in range(7)]
    dead = [json.loads(line) for line in dead_letter_path(spool).read_text().splitlines()]
    reasons = sorted(d["reason"].split(":")[0] for d in dead)
    assert reasons == ["DataError", "ProgramLimitExceeded", "UnicodeEncodeError", "UntranslatableCharacter"], reasons
    poisoned = next(d for d in dead if d["reason"].startswith("Untranslatable"))
    assert json.loads(poisoned["row"]["tags"]) == {"n": "poison", "poison": "1", "user": "evil\x00"}
    assert registry.get_sample_value("llm_router_ledger_rows_dropped_total", {"reason": "rejected"}) == 4
    assert not spool.exists() or spool.stat().st_size == 0


def _row(**changes: Any) -> tuple[Any, ...]:
    call = Call.new("chat", [], {}, {}, False)
    call.outcome = "success"
    row = list(call_row(call, None, time.time()))
    for col, value in changes.items():
        row[CALL_COLUMNS.index(col)] = value
    return tuple(row)


def test_a_database_that_becomes_reachable_gets_its_spooled_rows_and_no_other_database_does(
    make_router: MakeRouter,
    up: Upstream,
    pg_server: PgServer,  # noqa: F811
    pg_dsn: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # the old default spool was ./llm-router-ledger.spool, shared by every database
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    up.route("a").set_default(Reply(text="ok", usage=(1, 1)))
    later = "t_later_" + uuid.uuid4().hex[:8]
    dsn_later = pg_server.dsn_of(later)  # no such database yet: unreachable
    r1 = make_router(extra=pg_extra(dsn_later, None), hooks=[Corrupt()])
    led1 = ledger_of(r1._hooks.hooks)
    assert led1 is not None
    for i in range(3):
        r1.generate("hi", tags={"db": "later", "n": str(i)})
    r1.generate("hi", tags={"db": "later", "n": "poison", "poison": "1"})
    assert led1.flush(20)
    assert led1.writer.spool.pending() and led1.writer.written == 0
    assert led1.writer.spool.path.parent == tmp_path / "state" / "llm-router"

    r2 = make_router(extra=pg_extra(pg_dsn, None))  # another database, reachable, in the same directory
    r2.generate("hi", tags={"db": "other", "n": "0"})
    r2.close()
    assert [g["tags"]["db"] for g in pg_rows(pg_dsn)] == ["other"]  # none of the other database's rows

    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {later}")
    r1.generate("hi", tags={"db": "later", "n": "3"})
    deadline = time.monotonic() + 30  # the pool reconnects with a backoff
    while len(pg_rows_or_none(dsn_later)) < 4 and time.monotonic() < deadline:
        led1.flush(10)
        time.sleep(0.2)
    r1.close()
    assert sorted(g["tags"]["n"] for g in pg_rows(dsn_later)) == ["0", "1", "2", "3"]  # what waited, and after
    assert led1.writer.rejected == 1 and not led1.writer.spool.pending()


def pg_rows_or_none(dsn: str) -> list[dict[str, Any]]:
    try:
        return pg_rows(dsn)
    except Exception:
        return []


def test_a_database_that_starts_read_only_gets_every_row_once_writable(
    make_router: MakeRouter,
    up: Upstream,
    registry: CollectorRegistry,
    pg_server: PgServer,  # noqa: F811
    pg_dsn: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    name = pg_dsn.rsplit("/", 1)[1]
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:  # a standby, or a maintenance window
        conn.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    up.route("a").set_default(Reply(text="ok", usage=(1, 1)))
    r = make_router(extra=pg_extra(pg_dsn, tmp_path / "spool"))
    led = ledger_of(r._hooks.hooks)
    assert led is not None
    for i in range(3):
        r.generate("hi", tags={"n": str(i)})
    assert led.flush(20) and led.writer.written == 0
    assert registry.get_sample_value("llm_router_ledger_rows_waiting") == 3
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = off")
    r.generate("hi", tags={"n": "3"})
    deadline = time.monotonic() + 20
    while led.writer.written < 4 and time.monotonic() < deadline:
        led.flush(10)
        time.sleep(0.1)
    assert registry.get_sample_value("llm_router_ledger_rows_waiting") == 0
    r.close()
    assert sorted(g["tags"]["n"] for g in pg_rows(pg_dsn)) == ["0", "1", "2", "3"]


# -- a budget never holds a call past its deadline ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_budget_waiting_on_a_held_postgres_lock_ends_by_the_deadline(
    make_router: MakeRouter,
    up: Upstream,
    pg_dsn: str,  # noqa: F811
    tmp_path: Path,
    mode: str,
) -> None:
    budgets = "budgets:\n  - {name: chat, alias: chat, period: day, limit_usd: 1}\n"
    r = make_router(extra=pg_extra(pg_dsn, tmp_path / "spool", budgets))
    up.route("a").set_default(Reply(text="ok", usage=(10, 20)))
    r.generate("hi", max_tokens=20)
    locker = psycopg.connect(pg_dsn, autocommit=True)
    locker.execute("SELECT pg_advisory_lock(7220104)")  # another replica's budget transaction, stuck
    release = threading.Timer(15, locker.close)  # never hang the suite, whatever the code does
    release.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            if mode == "sync":
                r.generate("hi", max_tokens=20, timeout=1)
            else:
                asyncio.run(r.agenerate("hi", max_tokens=20, timeout=1))
        took = time.monotonic() - t0
    finally:
        release.cancel()
        locker.close()
    assert 0.9 < took < 1.5, took
    assert len(up.requests("a")) == 1
    assert r.generate("hi", max_tokens=20).text == "ok"  # released: calls go through again
    r.close()
