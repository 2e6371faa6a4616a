"""The usage ledger over a real SQLite file: one row per call, written off the hot path, never lost; usage queries."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY_A, KEY_B, MakeRouter, standard_config
from prometheus_client import CollectorRegistry, generate_latest

from router import ProviderError, Router, StreamInterruptedError, query_usage
from router.cli import main
from router.config import LedgerConfig
from router.hooks import Call
from router.plugins.ledger import DROP_REASONS, Ledger, Spool, call_row, dead_letter_path, ledger_of, spool_path
from router.plugins.store import CALL_COLUMNS
from router.sandbox import Reply, Upstream
from router.usage import read_calls, render

PRICES = """
pricing:
  a/model-a: {{input_per_1m: 1.0, output_per_1m: 2.0}}
  b/model-b: {{input_per_1m: 3.0, output_per_1m: 5.0}}
  c/model-c: {{input_per_1m: 7.0, output_per_1m: 11.0}}
ledger: {{path: "{path}", flush_interval_s: {interval}{more}}}
"""


def ledger_extra(path: Path, interval: float = 0.05, spool: Path | None = None) -> str:
    return PRICES.format(path=path, interval=interval, more=f', spool_path: "{spool}"' if spool else "")


def rows(path: Path) -> list[dict[str, Any]]:
    return read_calls(LedgerConfig(path=str(path)), since=0)


def the_ledger(r: Router) -> Ledger:
    led = ledger_of(r._hooks.hooks)
    assert led is not None
    return led


def test_every_call_is_recorded_once_with_what_it_used(make_router: MakeRouter, up: Upstream, tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite3"
    r = make_router(extra=ledger_extra(db))
    up.enqueue("a", Reply(text="one", usage=(10, 20)))
    first = r.generate("hi", tags={"tenant": "acme", "user": "u-17"})
    up.enqueue("a", Reply(status=503), Reply(status=503))
    up.enqueue("b", Reply(text="two", usage=(3, 4)))
    second = r.generate("hi", tags={"tenant": "globex"})
    up.enqueue("a", Reply(status=400, error="bad"))
    with pytest.raises(ProviderError):
        r.generate("hi")
    r.close()

    got = rows(db)
    assert [g["outcome"] for g in got] == ["success", "success", "bad_request"]
    assert len({g["id"] for g in got}) == 3
    one, two, bad = got
    assert one["tags"] == {"tenant": "acme", "user": "u-17"}
    assert (one["alias"], one["provider"], one["model"], one["attempts"]) == ("chat", "a", "model-a", 1)
    assert (one["input_tokens"], one["output_tokens"], one["cost_source"]) == (10, 20, "config")
    assert one["cost_nusd"] == round(first.cost_usd * 1e9) == 10 * 1000 + 20 * 2000
    assert one["key_name"].startswith("key-") and one["latency_s"] > 0
    assert (two["provider"], two["attempts"], two["cost_nusd"]) == ("b", 3, round(second.cost_usd * 1e9))
    assert two["failed_cost_nusd"] == 0 and two["tags"] == {"tenant": "globex"}
    assert (bad["provider"], bad["attempts"], bad["cost_nusd"], bad["tags"]) == ("a", 1, 0, {})
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert KEY_A.encode() not in raw and KEY_B.encode() not in raw


@pytest.mark.asyncio
async def test_async_calls_and_streams_are_recorded(make_router: MakeRouter, up: Upstream, tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite3"
    r = make_router(extra=ledger_extra(db))
    up.route("a").set_default(Reply(text="one two three", usage=(5, 6)))
    await asyncio.gather(*(r.agenerate("hi", tags={"tenant": f"t{i}"}) for i in range(3)))
    stream = await r.agenerate("hi", stream=True, tags={"tenant": "s"})
    text = "".join([d async for d in stream])
    sync_stream = r.generate("hi", stream=True, tags={"tenant": "sync-s"})
    assert "".join(sync_stream) == text
    r.close()
    got = {g["tags"]["tenant"]: g for g in rows(db)}
    assert set(got) == {"t0", "t1", "t2", "s", "sync-s"}
    assert all(g["outcome"] == "success" and g["input_tokens"] == 5 and g["output_tokens"] == 6 for g in got.values())


def test_a_stream_cut_after_text_is_billed_as_a_failed_attempt(
    make_router: MakeRouter, up: Upstream, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    r = make_router(extra=ledger_extra(db))
    up.enqueue("a", Reply(text="alpha beta gamma delta", cut_after=2, usage=(8, 9)))
    stream = r.generate("hi", stream=True, tags={"tenant": "acme"})
    with pytest.raises(StreamInterruptedError) as info:
        for _ in stream:
            pass
    r.close()
    (row,) = rows(db)
    assert row["outcome"] == "stream_interrupted"
    assert row["failed_cost_nusd"] == row["cost_nusd"] == round(info.value.cost_usd * 1e9) > 0


def test_tags_never_reach_the_metrics(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    r = make_router(extra=ledger_extra(tmp_path / "l.sqlite3"))
    r.generate("hi", tags={"tenant": "acme-secret-tenant", "user": "u-17"})
    r.close()
    text = generate_latest(registry).decode()
    assert "acme-secret-tenant" not in text and "u-17" not in text
    assert 'alias="chat"' in text


def test_rows_wait_in_the_spool_while_the_database_is_down(
    make_router: MakeRouter, up: Upstream, tmp_path: Path
) -> None:
    db = tmp_path / "not-mounted-yet" / "ledger.sqlite3"  # sqlite cannot open a file in a missing directory
    spool = tmp_path / "spool.jsonl"
    extra = ledger_extra(db, spool=spool)
    r = make_router(extra=extra)
    for i in range(5):
        assert r.generate("hi", tags={"n": str(i)}).text  # the calls never notice
    assert the_ledger(r).flush(10)
    assert spool.stat().st_size > 0 and not db.exists()
    r.close()  # still down at exit: the rows stay in the spool

    db.parent.mkdir()  # the database is back: the next Router using that spool writes them first
    r2 = make_router(extra=extra)
    r2.generate("hi", tags={"n": "5"})
    r2.close()
    assert sorted(int(g["tags"]["n"]) for g in rows(db)) == list(range(6))
    assert spool.stat().st_size == 0


def test_a_line_torn_by_a_crash_does_not_cost_the_rest_of_the_spool(
    make_router: MakeRouter, up: Upstream, tmp_path: Path
) -> None:
    db = tmp_path / "later" / "ledger.sqlite3"
    spool = tmp_path / "spool.jsonl"
    r = make_router(extra=ledger_extra(db, spool=spool))
    r.generate("hi", tags={"n": "0"})
    r.close()
    with spool.open("a") as f:
        f.write('["0123abc", 17')  # a crash in the middle of an append
    db.parent.mkdir()
    r2 = make_router(extra=ledger_extra(db, spool=spool))
    r2.generate("hi", tags={"n": "1"})
    r2.close()
    assert sorted(g["tags"]["n"] for g in rows(db)) == ["0", "1"]


_CHILD = """
import os, sys, time
from router import Router
r = Router.from_yaml(sys.argv[1])
for i in range(int(sys.argv[2])):
    r.generate("hi", tags={"n": str(i)})
if sys.argv[3] == "crash":
    time.sleep(0.6)  # more than flush_interval_s: what came before is written
    print("ready", flush=True)
    time.sleep(60)
print("exiting", flush=True)  # no close(): atexit flushes
"""


def _config_file(tmp_path: Path, up: Upstream, db: Path, interval: float = 0.05) -> Path:
    text = standard_config(extra=ledger_extra(db, interval)).replace("{UP}", up.url)
    for k, v in {"${KEY_A}": KEY_A, "${KEY_B}": KEY_B, "${KEY_C}": "sk-c-0123456789"}.items():
        text = text.replace(k, v)
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "router.yaml"
    path.write_text(text)
    return path


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }


def test_rows_survive_process_exit_and_a_crash_loses_at_most_the_last_window(up: Upstream, tmp_path: Path) -> None:
    up.route("a").set_default(Reply(text="ok", usage=(1, 1)))
    db_exit, db_crash = tmp_path / "exit.sqlite3", tmp_path / "crash.sqlite3"
    # A long interval: at exit, the rows are still queued unless atexit flushes them.
    cfg_exit = _config_file(tmp_path / "e", up, db_exit, interval=30)
    cfg_crash = _config_file(tmp_path / "c", up, db_crash, interval=0.1)
    # Both children at once: each imports litellm, which is most of the time.
    exiting = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(cfg_exit), "7", "exit"], env=_env(), stderr=subprocess.PIPE
    )
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(cfg_crash), "7", "crash"], env=_env(), stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        child.send_signal(signal.SIGKILL)
        _, err = exiting.communicate(timeout=120)
        assert exiting.returncode == 0, err.decode()[-2000:]
    finally:
        child.wait(30)
        if exiting.poll() is None:
            exiting.kill()
    assert len(rows(db_exit)) == 7
    assert len(rows(db_crash)) == 7


def test_usage_sums_agree_with_the_rows(make_router: MakeRouter, up: Upstream, tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite3"
    r = make_router(extra=ledger_extra(db))
    plan = [("acme", "a"), ("acme", "a"), ("acme", "b"), ("globex", "a"), ("globex", "c"), (None, "a")]
    for i, (tenant, route) in enumerate(plan):
        up.enqueue("a", *([Reply(text="x", usage=(i + 1, 2 * i + 1))] if route == "a" else [Reply(status=503)] * 2))
        if route != "a":
            up.enqueue("b", *([Reply(text="y", usage=(i + 3, i + 2))] if route == "b" else [Reply(status=503)] * 2))
        if route == "c":
            up.enqueue("c", Reply(text="z", usage=(i, i)))
        r.generate("hi", tags={"tenant": tenant} if tenant else None)
    r.close()

    got = rows(db)
    grouped = query_usage(r.config, since="1h", by=["tenant", "provider"])
    expect: dict[tuple[Any, ...], list[int]] = {}
    for g in got:
        acc = expect.setdefault((g["tags"].get("tenant"), g["provider"]), [0, 0, 0, 0])
        for i, col in enumerate(("input_tokens", "output_tokens", "cost_nusd")):
            acc[i] += g[col]
        acc[3] += 1
    assert {
        (u.group["tenant"], u.group["provider"]): [u.input_tokens, u.output_tokens, u.cost_nusd, u.calls]
        for u in grouped
    } == expect
    assert len(grouped) == 5
    (everything,) = query_usage(r.config, since="1h")
    assert everything.cost_nusd == sum(g["cost_nusd"] for g in got) and everything.calls == 6
    assert query_usage(r.config, since=time.time() + 10) == []
    table = render(grouped, ["tenant", "provider"])
    assert table.splitlines()[0].split()[:3] == ["tenant", "provider", "calls"]
    assert table.splitlines()[-1].startswith("total")


def test_the_usage_command_prints_table_csv_and_json(
    up: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "ledger.sqlite3"
    cfg = _config_file(tmp_path, up, db)
    r = Router.from_yaml(cfg, registry=CollectorRegistry())
    up.route("a").set_default(Reply(text="ok", usage=(10, 20)))
    for tenant in ("acme", "acme", "globex"):
        r.generate("hi", tags={"tenant": tenant})
    r.close()

    assert main(["usage", "-c", str(cfg), "--since", "24h", "--by", "tenant,provider", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(d["tenant"], d["provider"], d["calls"]) for d in data] == [("acme", "a", 2), ("globex", "a", 1)]
    assert data[0]["cost_usd"] == f"{2 * (10 * 1e-6 + 20 * 2e-6):.9f}"

    assert main(["usage", "-c", str(cfg), "--by", "tenant", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tenant,calls,errors,input_tokens") and lines[1].startswith("acme,2,0,20,40,")

    assert main(["usage", "-c", str(cfg), "--by", "tenant,day"]) == 0
    out = capsys.readouterr().out
    assert "acme" in out and time.strftime("%Y-%m-%d", time.gmtime()) in out

    assert main(["usage", "-c", str(cfg), "--since", "yesterday"]) == 1
    assert "neither a duration" in capsys.readouterr().err

    bare = tmp_path / "bare.yaml"
    bare.write_text(cfg.read_text().split("\nledger:")[0] + "\n")
    assert main(["usage", "-c", str(bare)]) == 1
    assert "has no ledger: section" in capsys.readouterr().err


def test_the_ledger_is_a_config_section(tmp_path: Path) -> None:
    from router import ConfigError, parse_config

    base = textwrap.dedent(
        """
        version: 1
        providers: {a: {kind: openai}}
        aliases: {chat: {targets: [a/m]}}
        """
    )
    assert parse_config(base + "ledger: {}\n").ledger == LedgerConfig()
    assert parse_config(base).ledger is None
    with pytest.raises(ConfigError, match="ledger: give path"):
        parse_config(base + 'ledger: {path: x.db, dsn: "postgresql://u:pw@h/db"}\n')
    cfg = parse_config(base + 'ledger: {dsn: "postgresql://u:hunter2@h/db"}\n')
    assert cfg.ledger is not None and "hunter2" not in repr(cfg.ledger)


# -- tags are checked at the call ------------------------------------------------------------------------------

BAD_TAGS = [
    ({"user": "evil\x00"}, ValueError, "'\\x00' at position 4"),
    ({"user": "line\nbreak"}, ValueError, "'\\n' at position 4"),
    ({"user": "c1\x85"}, ValueError, "control character"),
    ({"user": "half\ud800"}, ValueError, "lone surrogate"),
    ({"tenant\n": "acme"}, ValueError, "tag name 'tenant\\n'"),
    ({"x" * 65: "acme"}, ValueError, "1-64 characters"),
    ({"n" * 5000: "acme"}, ValueError, "...'"),  # a huge name is not echoed whole
    ({7: "acme"}, TypeError, "tag names must be str, not int"),
    ({"user": b"u-17"}, TypeError, "must have a str value, not bytes"),
    ({"user": "x" * 257}, ValueError, "longer than 256 characters"),
]


@pytest.mark.parametrize(("tags", "error", "says"), BAD_TAGS)
def test_bad_tags_are_refused_at_the_call_before_any_request(
    make_router: MakeRouter, up: Upstream, tmp_path: Path, tags: Any, error: type, says: str
) -> None:
    db = tmp_path / "ledger.sqlite3"
    r = make_router(extra=ledger_extra(db))
    with pytest.raises(error) as info:
        r.generate("hi", tags=tags)
    assert says in str(info.value) and len(str(info.value)) < 300
    with pytest.raises(error):
        asyncio.run(r.agenerate("hi", tags=tags))
    r.close()
    assert up.requests("a") == [] and rows(db) == []  # refused before any request: no call to record


# -- one bad row never stops the ledger ------------------------------------------------------------------------


def _row(**changes: Any) -> tuple[Any, ...]:
    """A ledger row as a call would make it, with some columns changed."""
    call = Call.new("chat", [], {}, {}, False)
    call.outcome = "success"
    row = list(call_row(call, None, time.time()))
    for col, value in changes.items():
        row[CALL_COLUMNS.index(col)] = value
    return tuple(row)


def dead_letters(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_row_the_database_refuses_goes_to_the_dead_letter_file_and_the_rest_are_written(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db, spool = tmp_path / "ledger.sqlite3", tmp_path / "spool.jsonl"
    r = make_router(extra=ledger_extra(db, interval=30, spool=spool))  # one batch: rows are written at flush
    led = the_ledger(r)
    for i in range(3):
        r.generate("hi", tags={"n": str(i)})
    poison = _row(alias=None)  # NOT NULL: a row SQLite refuses, as a buggy plugin or an old spool could make
    wrong_shape = _row()[:-2]  # a row of another version's columns
    led.writer.put(poison)
    led.writer.put(wrong_shape)
    for i in range(3, 6):
        r.generate("hi", tags={"n": str(i)})
    assert led.flush(10)
    assert sorted(int(g["tags"]["n"]) for g in rows(db)) == list(range(6))  # the batch was not lost for them
    r.generate("hi", tags={"n": "6"})
    r.close()
    assert sorted(int(g["tags"]["n"]) for g in rows(db)) == list(range(7))  # and the ledger goes on
    assert not spool.exists() or spool.stat().st_size == 0
    dead = dead_letters(dead_letter_path(spool))
    assert len(dead) == 2
    by_id = {d["row"]["id"] if isinstance(d["row"], dict) else d["row"][0]: d for d in dead}
    assert by_id[poison[0]]["reason"].startswith("IntegrityError: NOT NULL constraint failed: llm_calls.alias")
    assert by_id[poison[0]]["row"]["alias"] is None and by_id[poison[0]]["database"] == f"sqlite:{db}"
    assert by_id[wrong_shape[0]]["reason"].startswith("ProgrammingError")
    assert registry.get_sample_value("llm_router_ledger_rows_dropped_total", {"reason": "rejected"}) == 2
    assert registry.get_sample_value("llm_router_ledger_rows_waiting") == 0
    refused = [m for m in caplog.messages if "refused a row" in m]
    assert len(refused) == 1 and str(dead_letter_path(spool)) in refused[0]  # once for the batch, not per row


# -- a spool belongs to one database ---------------------------------------------------------------------------


def test_a_spool_is_named_by_its_database_and_never_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pydantic import SecretStr

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    def pg(dsn: str) -> LedgerConfig:
        return LedgerConfig(dsn=SecretStr(dsn))

    one = spool_path(pg("postgresql://app:pw1@db1.internal:5432/usage"))
    assert one.parent == tmp_path / "state" / "llm-router" and one.name.startswith("ledger-")
    assert one == spool_path(pg("postgresql://app:rotated@db1.internal:5432/usage"))  # a new password: same DB
    assert one == spool_path(pg("host=db1.internal port=5432 dbname=usage user=other"))  # the other DSN form
    others = {
        spool_path(pg(d))
        for d in (
            "postgresql://app:pw1@db2.internal:5432/usage",
            "postgresql://app:pw1@db1.internal:5433/usage",
            "postgresql://app:pw1@db1.internal:5432/billing",
        )
    }
    assert one not in others and len(others) == 3
    assert "pw1" not in str(one) and "db1" not in str(one)
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert spool_path(pg("postgresql://db1.internal/usage")).parent == tmp_path / "home/.local/state/llm-router"
    sqlite = spool_path(LedgerConfig(path="data/usage.sqlite3"))
    assert sqlite == tmp_path / "data" / "usage.sqlite3.spool"  # next to its file, whatever the cwd later
    assert LedgerConfig(path="x").spool_path is None and spool_path(LedgerConfig(spool_path="s")) == Path("s")


def test_a_spool_of_another_database_is_never_replayed_into_this_one(
    make_router: MakeRouter, up: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "shared.spool"  # one spool_path given to two ledgers on different databases
    db1, db2 = tmp_path / "later" / "one.sqlite3", tmp_path / "two.sqlite3"
    r1 = make_router(extra=ledger_extra(db1, spool=spool))
    for i in range(3):
        r1.generate("hi", tags={"db": "one", "n": str(i)})
    r1.close()  # db1's directory is not there yet: its rows wait in the spool
    assert json.loads(spool.read_text().splitlines()[0])["database"] == f"sqlite:{db1}"

    r2 = make_router(extra=ledger_extra(db2, spool=spool))
    for i in range(3):
        r2.generate("hi", tags={"db": "two", "n": str(i)})
    r2.close()
    assert {g["tags"]["db"] for g in rows(db2)} == {"two"} and len(rows(db2)) == 3
    refused = [m for m in caplog.messages if "not written here" in m]
    assert len(refused) == 1 and f"sqlite:{db1}" in refused[0] and f"sqlite:{db2}" in refused[0]

    db1.parent.mkdir()
    r3 = make_router(extra=ledger_extra(db1, spool=spool))  # its own database is back: the rows go there
    r3.generate("hi", tags={"db": "one", "n": "3"})
    r3.close()
    assert sorted(g["tags"]["n"] for g in rows(db1)) == ["0", "1", "2", "3"]
    assert {g["tags"]["db"] for g in rows(db1)} == {"one"}


def test_a_spool_written_before_spools_named_their_database_is_replayed_only_at_the_sqlite_default_place(
    make_router: MakeRouter, up: Upstream, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    r = make_router(extra=ledger_extra(db))
    old = [_row(tags='{"n":"old"}'), _row(tags='{"n":"old"}')]
    r.close()
    default = Path(f"{db}.spool")
    default.write_text("".join(json.dumps(list(x)) + "\n" for x in old))  # no first line naming the database
    r2 = make_router(extra=ledger_extra(db))
    r2.generate("hi", tags={"n": "new"})
    r2.close()
    assert sorted(g["tags"]["n"] for g in rows(db)) == ["new", "old", "old"]

    elsewhere = tmp_path / "explicit.spool"
    elsewhere.write_text("".join(json.dumps(list(x)) + "\n" for x in [_row(tags='{"n":"stray"}')]))
    r3 = make_router(extra=ledger_extra(db, spool=elsewhere))  # could belong to any database: left alone
    r3.generate("hi", tags={"n": "new2"})
    r3.close()
    assert "stray" not in {g["tags"]["n"] for g in rows(db)} and elsewhere.stat().st_size > 0


# -- recovery in the running process ---------------------------------------------------------------------------


def test_a_ledger_directory_deleted_mid_run_is_made_again_and_rows_go_on(
    make_router: MakeRouter, up: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    db = tmp_path / "ledger" / "ledger.sqlite3"
    db.parent.mkdir()
    r = make_router(extra=ledger_extra(db))
    for i in range(3):
        r.generate("hi", tags={"n": str(i)})
    assert the_ledger(r).flush(10) and len(rows(db)) == 3
    shutil.rmtree(db.parent)  # a cleanup job, an operator
    for i in range(3, 8):
        r.generate("hi", tags={"n": str(i)})
    assert the_ledger(r).flush(10)
    r.close()
    assert sorted(int(g["tags"]["n"]) for g in rows(db)) == [3, 4, 5, 6, 7]  # not written into the deleted file
    assert len([m for m in caplog.messages if "deleted or replaced" in m]) == 1


@pytest.mark.parametrize("spool_kind", ["disk_full", "unwritable"])
def test_rows_wait_in_memory_while_neither_database_nor_spool_takes_them(
    make_router: MakeRouter,
    up: Upstream,
    registry: CollectorRegistry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    spool_kind: str,
) -> None:
    db = tmp_path / "not-mounted-yet" / "ledger.sqlite3"
    if spool_kind == "disk_full":
        spool = tmp_path / "spool.jsonl"
        spool.symlink_to("/dev/full")  # every write fails with ENOSPC, from the kernel
    else:
        (tmp_path / "a-file").write_text("")
        spool = tmp_path / "a-file" / "spool.jsonl"  # its directory cannot be made
    r = make_router(extra=ledger_extra(db, spool=spool))
    led = the_ledger(r)
    led.writer.max_memory_rows = 4
    for i in range(6):
        assert r.generate("hi", tags={"n": str(i)}).text  # the calls never notice
        assert led.flush(10)
    assert registry.get_sample_value("llm_router_ledger_rows_waiting") == 4
    assert registry.get_sample_value("llm_router_ledger_rows_dropped_total", {"reason": "queue_full"}) == 2
    assert led.writer.dropped == {"queue_full": 2}
    assert len([m for m in caplog.messages if "cannot spool rows" in m]) == 1  # once, not per batch
    assert len([m for m in caplog.messages if "the most it keeps" in m]) == 1

    db.parent.mkdir()  # the database is back: what waited in memory is written at the next flush
    assert led.flush(10)
    assert registry.get_sample_value("llm_router_ledger_rows_waiting") == 0
    r.generate("hi", tags={"n": "6"})
    r.close()
    assert sorted(int(g["tags"]["n"]) for g in rows(db)) == [0, 1, 2, 3, 6]
    assert any("the database is back" in m for m in caplog.messages)


def test_rows_that_could_be_kept_nowhere_at_close_are_counted(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    r = make_router(extra=ledger_extra(tmp_path / "nowhere" / "l.sqlite3", spool=tmp_path / "a-file" / "spool"))
    for i in range(3):
        r.generate("hi", tags={"n": str(i)})
    r.close()
    assert registry.get_sample_value("llm_router_ledger_rows_dropped_total", {"reason": "closed"}) == 3


def test_the_ledger_metrics_exist_from_the_start(
    make_router: MakeRouter, registry: CollectorRegistry, tmp_path: Path
) -> None:
    r = make_router(extra=ledger_extra(tmp_path / "l.sqlite3"))
    for reason in DROP_REASONS:  # at 0, so that increase() counts the first drop
        assert registry.get_sample_value("llm_router_ledger_rows_dropped_total", {"reason": reason}) == 0
    assert registry.get_sample_value("llm_router_ledger_rows_waiting") == 0
    r.close()


def test_torn_spool_lines_are_counted(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    db, spool = tmp_path / "later" / "ledger.sqlite3", tmp_path / "spool.jsonl"
    r = make_router(extra=ledger_extra(db, spool=spool))
    r.generate("hi", tags={"n": "0"})
    assert the_ledger(r).flush(10)
    assert registry.get_sample_value("llm_router_ledger_rows_waiting") == 1
    with spool.open("a") as f:
        f.write('["0123abc", 17')  # a crash in the middle of an append
    db.parent.mkdir()
    r.generate("hi", tags={"n": "1"})
    r.close()
    assert registry.get_sample_value("llm_router_ledger_rows_dropped_total", {"reason": "torn"}) == 1
    assert sorted(g["tags"]["n"] for g in rows(db)) == ["0", "1"]


def test_a_spool_whose_first_write_was_torn_is_started_again(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    path.write_text('{"llm_router_spool": 1, "datab')  # the disk filled up in the middle of the first line
    spool = Spool(path, "sqlite:/x")
    spool.append([("r1", 1), ("r2", 2)])
    assert json.loads(path.read_text().splitlines()[0]) == {"llm_router_spool": 1, "database": "sqlite:/x"}
    got: list[Any] = []
    assert spool.replay(got.extend, 10) == (2, 0) and got == [("r1", 1), ("r2", 2)]
    path.write_text('["r3", 3')
    assert spool.replay(got.extend, 10) == (0, 1) and path.stat().st_size == 0


def _as_nobody_if_root() -> None:
    """Drop root in this (forked) process: root writes any file, so a read-only one needs another user."""
    if os.geteuid() == 0:
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)


def test_a_sqlite_ledger_that_starts_read_only_is_written_once_writable() -> None:
    import shutil
    import tempfile
    import warnings

    from router.plugins.store import SqliteStore

    work = Path(tempfile.mkdtemp(prefix="llm-router-ro-"))  # not under pytest's 0700 tmp: nobody must reach it
    try:
        work.chmod(0o777)
        db = work / "ledger.sqlite3"
        with SqliteStore(db).transaction():  # the schema exists; then the file is made read-only
            pass
        for f in work.iterdir():
            f.chmod(0o666)
        db.chmod(0o444)
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        with warnings.catch_warnings():  # 3.12+: fork() in a process with threads; the child starts its own
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: a running process with its ledger open while the file is read-only
            code = 3
            try:
                _as_nobody_if_root()
                led = Ledger(LedgerConfig(path=str(db), spool_path=str(work / "spool"), flush_interval_s=30))
                for i in range(3):
                    led.writer.put(_row(id=f"ro-{i}"))
                led.flush(10)
                os.write(to_parent_w, f"{led.writer.written} {led.writer.spooled}\n".encode())
                os.read(to_child_r, 1)  # the file is writable now
                led.writer.put(_row(id="ro-3"))
                led.flush(10)
                os.write(to_parent_w, f"{led.writer.written}\n".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(to_parent_w)
        os.close(to_child_r)
        try:
            with os.fdopen(to_parent_r) as from_child:
                assert from_child.readline().split() == ["0", "3"]  # read-only: every row waits in the spool
                db.chmod(0o666)
                os.write(to_child_w, b"g")
                assert from_child.readline().strip() == "4"  # the same process writes them all once writable
        finally:
            os.close(to_child_w)  # a child still waiting reads the end of the pipe and exits
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert sorted(g["id"] for g in rows(db)) == ["ro-0", "ro-1", "ro-2", "ro-3"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
