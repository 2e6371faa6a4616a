"""The fleet path: the ledger and budgets on a real PostgreSQL (tests/pg_server.py), restarted under load."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import MakeRouter
from pg_server import PgServer, pg_dsn, pg_server  # noqa: F401  (fixtures)
from test_budgets import budget_spent, check_fleet, run_fleet
from test_ledger import PRICES

from router import BudgetExceededError, query_usage
from router.config import LedgerConfig
from router.plugins.ledger import ledger_of
from router.plugins.store import PostgresStore
from router.sandbox import Reply, Upstream
from router.usage import read_calls


def pg_extra(dsn: str, spool: Path, budgets: str = "") -> str:
    text = PRICES.format(path="", interval=0.05, more=f', spool_path: "{spool}"')
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
