"""Several processes opening one new SQLite ledger at once (the workers of a host on their first write) all get a
working connection: SQLite's switch to WAL takes the file's lock outright, without its busy wait."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from router.plugins.store import SqliteStore

PROCESSES = 8


def _first_write(path: str, barrier: Any, results: Any) -> None:
    store = SqliteStore(path)
    barrier.wait()
    try:
        with store.transaction(lock=True) as cur:
            cur.execute("SELECT COUNT(*) FROM llm_calls")
        results.put("ok")
    except Exception as exc:  # reported to the test, which fails on it
        results.put(f"{type(exc).__name__}: {exc}")
    finally:
        store.close()


# Python 3.12+ warns about fork() with threads running (the session's loopback upstream): the children here only
# open a file and exit.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_workers_opening_a_new_sqlite_ledger_at_once_all_get_it(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    failures: list[str] = []
    for trial in range(12):
        path = str(tmp_path / f"ledger-{trial}.sqlite3")
        barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_first_write, args=(path, barrier, results)) for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        failures += [r for r in (results.get(timeout=10) for _ in procs) if r != "ok"]
        assert os.path.exists(path)
    assert failures == []
