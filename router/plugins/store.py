"""The ledger's database: a SQLite file (stdlib `sqlite3`) or PostgreSQL (`psycopg` 3 with `psycopg_pool`).

The ledger (`router.plugins.ledger`), the budgets (`router.plugins.budgets`) and the usage query
(`router.usage`) write the same SQL through `Store.transaction()`; the two dialects differ only in placeholders,
the JSON type of `tags`, how a transaction takes its lock, and how a tag is read in a query.
psycopg is imported only for a `dsn:`.

Money is stored as integer nano-USD (1e-9 USD), so sums are exact and a budget's comparison never drifts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import LedgerConfig

log = logging.getLogger("router")

NUSD = 1_000_000_000  # nano-USD per USD


def to_nusd(usd: float) -> int:
    """USD as integer nano-USD."""
    return round(usd * NUSD)


CALL_COLUMNS = (
    "id",
    "ts",
    "alias",
    "provider",
    "model",
    "key_name",
    "tags",
    "input_tokens",
    "output_tokens",
    "cost_nusd",
    "failed_cost_nusd",
    "cost_source",
    "latency_s",
    "outcome",
    "attempts",
    "rerouted_to",
    "shadow_of",
    "agreement",
    "agreement_kind",
)
# Columns added since the first schema, with their SQL type: added to an older database when it is opened, and
# left NULL in rows written before (a spooled row of an older version is padded with NULLs).
ADDED_COLUMNS = (
    ("shadow_of", "TEXT"),  # a shadow request's row: the id of the primary call it shadowed
    ("agreement", "DOUBLE PRECISION"),  # a shadow's agreement with the primary's answer, 0 to 1
    ("agreement_kind", "TEXT"),  # how it was measured: parsed (structured output), tools, or text
)
OLDER_ROW_LENGTHS = (len(CALL_COLUMNS) - len(ADDED_COLUMNS),)  # the rows of the versions before those columns

_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_calls (
    id TEXT PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    alias TEXT NOT NULL,
    provider TEXT,
    model TEXT,
    key_name TEXT,
    tags {json} NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cost_nusd BIGINT NOT NULL,
    failed_cost_nusd BIGINT NOT NULL,
    cost_source TEXT,
    latency_s DOUBLE PRECISION NOT NULL,
    outcome TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    rerouted_to TEXT,
    shadow_of TEXT,
    agreement DOUBLE PRECISION,
    agreement_kind TEXT
);
CREATE INDEX IF NOT EXISTS llm_calls_ts ON llm_calls (ts);
CREATE TABLE IF NOT EXISTS llm_budget_spend (
    budget TEXT NOT NULL,
    scope TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    spent_nusd BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (budget, scope, period_start)
);
CREATE TABLE IF NOT EXISTS llm_budget_holds (
    id TEXT PRIMARY KEY,
    budget TEXT NOT NULL,
    scope TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    amount_nusd BIGINT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS llm_budget_holds_period ON llm_budget_holds (budget, scope, period_start);
"""


def _migrate_sqlite(conn: sqlite3.Connection) -> None:
    """Add the columns an older version's database lacks (SQLite has no ADD COLUMN IF NOT EXISTS)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(llm_calls)")}
    for name, kind in ADDED_COLUMNS:
        if name not in have:
            try:
                conn.execute(f"ALTER TABLE llm_calls ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as exc:  # another process added it meanwhile
                if "duplicate column" not in str(exc):
                    raise


class Store:
    """One connection (SQLite) or a small pool (PostgreSQL) to the ledger's database; thread-safe."""

    dialect = "sqlite"

    def transaction(
        self, lock: bool = False, timeout: float | None = None
    ) -> contextlib.AbstractContextManager[Cursor]:
        """A transaction, committed when the block ends (rolled back on error); `lock`: serialise writers now;
        `timeout`: the most it may wait for the connection and the database's locks (default: the store's)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection(s)."""

    def tag_expr(self) -> str:
        """SQL reading the tag named by the next parameter from `tags`."""
        raise NotImplementedError

    def time_expr(self, fmt: str) -> str:
        """SQL formatting `ts` (unix seconds) as UTC text: fmt is 'day' or 'hour'."""
        raise NotImplementedError

    def tag_names_sql(self) -> str:
        """SQL selecting the tag names the calls of [?, ?) carry, each once, in order."""
        raise NotImplementedError

    def insert_calls(self, rows: Sequence[Sequence[Any]]) -> None:
        """Insert ledger rows (in CALL_COLUMNS order; a row an older version spooled gets NULL in the columns added
        since); a row whose id is already there is left as it is. A row of any other shape is refused."""
        cols = ", ".join(CALL_COLUMNS)
        marks = ", ".join(self._json_mark if c == "tags" else "?" for c in CALL_COLUMNS)
        n = len(CALL_COLUMNS)
        rows = [(*r, *(None,) * (n - len(r))) if len(r) in OLDER_ROW_LENGTHS else r for r in rows]
        with self.transaction() as cur:
            cur.executemany(f"INSERT INTO llm_calls ({cols}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING", rows)

    _json_mark = "?"


class Cursor:
    """The DB-API cursor both dialects hand out, with `?` placeholders."""

    def __init__(self, raw: Any, pg: bool) -> None:
        self._raw = raw
        self._pg = pg

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement."""
        self._raw.execute(_pg(sql) if self._pg else sql, params)
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement per row."""
        self._raw.executemany(_pg(sql) if self._pg else sql, rows)

    def fetchall(self) -> list[tuple[Any, ...]]:
        """Every row of the last statement."""
        return [tuple(r) for r in self._raw.fetchall()]

    def fetchone(self) -> tuple[Any, ...] | None:
        """The next row of the last statement."""
        r = self._raw.fetchone()
        return None if r is None else tuple(r)


def _pg(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


# SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN: the connection, not the data, is at fault. A file opened
# while it was read-only stays read-only in that connection after a chmod; a new connection sees it writable.
_REOPEN_ON = (8, 10, 14)


class SqliteStore(Store):
    """A SQLite file in WAL mode; writers across threads and processes are serialised by SQLite's own lock.

    The file is checked before every transaction: if it was deleted or replaced (its directory removed by a
    cleanup job), the connection, which would go on writing into the unlinked file, is reopened on the path,
    and a directory that existed once is made again. A connection that failed for its own state (opened
    while the file was read-only, an I/O error) is reopened by the next transaction.
    """

    dialect = "sqlite"

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 30.0) -> None:
        self.path = Path(os.path.abspath(path))  # a later chdir() must not move the database
        self._timeout = timeout_s
        self._busy_ms = round(timeout_s * 1000)
        self._conn: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file the connection has open
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and _file_id(self.path) != self._file:
            log.warning("%s: the SQLite file was deleted or replaced; reopening it", self.path)
            self._drop()
        if self._conn is None:
            if self._file is not None:  # it existed before: its directory was removed under us, make it again
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._open()
            self._conn, self._file, self._busy_ms = conn, _file_id(self.path), round(self._timeout * 1000)
        return self._conn

    def _open(self) -> sqlite3.Connection:
        """A connection to the file, in WAL mode with the schema. Several processes opening a new file at once (the
        workers of a host, on their first write) meet "database is locked" there without SQLite's busy wait (the
        switch to WAL takes the lock outright): that is waited out here, within the store's timeout."""
        deadline = time.monotonic() + self._timeout
        while True:
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA.format(json="TEXT"))
                _migrate_sqlite(conn)
                return conn
            except sqlite3.Error as exc:
                conn.close()
                locked = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
                if not locked or time.monotonic() >= deadline:
                    raise
            time.sleep(random.uniform(0.005, 0.05))

    @contextlib.contextmanager
    def transaction(self, lock: bool = False, timeout: float | None = None) -> Iterator[Cursor]:
        wait = self._timeout if timeout is None else max(0.0, min(timeout, self._timeout))
        # The connection is shared: another thread's transaction (a settle waiting on a locked file) counts too.
        if not self._lock.acquire(timeout=wait):
            raise TimeoutError(f"{self.path} was busy in this process for {wait:.2f}s")
        try:
            conn = self._connect()
            busy_ms = round(wait * 1000)
            if busy_ms != self._busy_ms:  # SQLite waits this long for another connection's lock
                conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
                self._busy_ms = busy_ms
            try:
                conn.execute("BEGIN IMMEDIATE" if lock else "BEGIN")
            except sqlite3.Error:
                self._drop()
                raise
            try:
                yield Cursor(conn.cursor(), pg=False)
                conn.execute("COMMIT")
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    self._drop()
                if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _REOPEN_ON:
                    self._drop()
                raise
        finally:
            self._lock.release()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def tag_expr(self) -> str:
        return "json_extract(tags, '$.\"' || ? || '\"')"

    def time_expr(self, fmt: str) -> str:
        pattern = "%Y-%m-%d" if fmt == "day" else "%Y-%m-%dT%H:00Z"
        return f"strftime('{pattern}', ts, 'unixepoch')"

    def tag_names_sql(self) -> str:
        return (
            "SELECT DISTINCT j.key FROM llm_calls, json_each(llm_calls.tags) AS j WHERE ts >= ? AND ts < ? ORDER BY 1"
        )

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"


class PostgresStore(Store):
    """PostgreSQL through a psycopg_pool pool that replaces broken connections (a restart of the server)."""

    dialect = "postgres"
    _json_mark = "CAST(? AS jsonb)"

    def __init__(self, dsn: str, max_size: int = 4, timeout_s: float = 5.0) -> None:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError:
            from ..errors import ConfigError, ConfigProblem

            need = "a PostgreSQL ledger needs psycopg: pip install 'llm-router[postgres]'"
            raise ConfigError([ConfigProblem("<config>", None, "ledger.dsn", need)]) from None

        self._timeout = timeout_s
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max_size,
            open=False,
            check=ConnectionPool.check_connection,
            kwargs={"connect_timeout": max(1, int(timeout_s))},
            name="llm-router-ledger",
        )
        self._pool.open(wait=False)

    @contextlib.contextmanager
    def transaction(self, lock: bool = False, timeout: float | None = None) -> Iterator[Cursor]:
        wait = self._timeout if timeout is None else max(0.001, min(timeout, self._timeout))
        try:
            self._ensure_schema(wait)
            with self._pool.connection(timeout=wait) as conn, conn.cursor() as cur:
                # psycopg's connection block commits at its end and rolls back on an exception.
                if timeout is not None:  # bound every wait in the transaction: a lock held elsewhere, a slow disk
                    ms = str(max(1, round(wait * 1000)))
                    cur.execute(
                        "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                        (ms, ms),
                    )
                if lock:  # one budget transaction at a time across every replica: no deadlock, no lost update
                    cur.execute("SELECT pg_advisory_xact_lock(7220104)")
                yield Cursor(cur, pg=True)
        except Exception as exc:
            if getattr(exc, "sqlstate", None) == "25006":
                # Read-only (a standby after a failover, or default_transaction_read_only): each pooled
                # connection keeps the setting it started with. New ones see the database once it is writable.
                self._pool.drain()
            raise

    def _ensure_schema(self, wait: float) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            with self._pool.connection(timeout=wait) as conn:
                # Workers starting together would race on CREATE TABLE IF NOT EXISTS: serialise them.
                conn.execute("SELECT pg_advisory_xact_lock(7220103)")
                for stmt in filter(str.strip, _SCHEMA.format(json="JSONB").split(";")):
                    conn.execute(stmt)
                for name, kind in ADDED_COLUMNS:  # a database made by an older version
                    conn.execute(f"ALTER TABLE llm_calls ADD COLUMN IF NOT EXISTS {name} {kind}")
            self._schema_ready = True

    def close(self) -> None:
        self._pool.close(timeout=2.0)

    def tag_expr(self) -> str:
        return "tags ->> ?"

    def time_expr(self, fmt: str) -> str:
        pattern = "YYYY-MM-DD" if fmt == "day" else 'YYYY-MM-DD"T"HH24":00Z"'
        return f"to_char(to_timestamp(ts) AT TIME ZONE 'UTC', '{pattern}')"

    def tag_names_sql(self) -> str:
        return "SELECT DISTINCT k FROM llm_calls, jsonb_object_keys(tags) AS k WHERE ts >= ? AND ts < ? ORDER BY 1"

    def __repr__(self) -> str:  # never the DSN: it may hold a password
        return "<PostgresStore>"


def open_store(cfg: LedgerConfig) -> Store:
    """The store a `ledger:` section names. Opening never fails on a database that is down: using it does."""
    if cfg.dsn is not None:
        return PostgresStore(cfg.dsn.get_secret_value())
    return SqliteStore(cfg.sqlite_path)


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a file, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def ledger_identity(cfg: LedgerConfig) -> str:
    """Which database a `ledger:` section writes to, as text with no secret: `sqlite:/abs/path` or
    `postgresql://host:port/dbname` (the DSN's user and password left out: they do not change the database)."""
    if cfg.dsn is None:
        return "sqlite:" + os.path.realpath(cfg.sqlite_path)
    dsn = cfg.dsn.get_secret_value()
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except Exception:  # no psycopg, or a DSN libpq cannot parse (the store will say so): hash it whole
        return "postgresql:dsn-" + hashlib.sha256(dsn.encode()).hexdigest()[:16]
    env = os.environ
    host = parts.get("host") or parts.get("hostaddr") or env.get("PGHOST") or ""
    port = parts.get("port") or env.get("PGPORT") or "5432"
    user = parts.get("user") or env.get("PGUSER") or ""
    dbname = parts.get("dbname") or env.get("PGDATABASE") or user
    return f"postgresql://{host}:{port}/{dbname}"


def state_dir() -> Path:
    """Where this user's llm-router keeps local state: $XDG_STATE_HOME/llm-router, else
    ~/.local/state/llm-router (never the working directory, which may be shared or read-only)."""
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "llm-router"
    try:
        return Path.home() / ".local" / "state" / "llm-router"
    except (RuntimeError, KeyError):  # no home directory (a bare container user)
        return Path(tempfile.gettempdir()) / f"llm-router-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


DB_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)


def db_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the database is unreachable or refused", for both dialects."""
    errors = DB_ERRORS
    if "psycopg" in sys.modules:
        import psycopg
        from psycopg_pool import PoolTimeout

        errors = (*errors, psycopg.Error, PoolTimeout)
    return errors


# SQLSTATE classes of a refusal caused by the data itself: 22 data exception (a NUL in JSON text, a value out of
# range), 23 integrity constraint (a NULL in a NOT NULL column), 54 program limit (a value too large to index).
_CONTENT_SQLSTATE = ("22", "23", "54")


def is_content_error(exc: BaseException) -> bool:
    """Whether the database refused a write for what the rows hold (so another row would go in), rather than
    for its own state (down, locked, read-only, full), which every row would meet alike."""
    if isinstance(exc, (ValueError, TypeError, OverflowError)):  # a value the driver cannot encode or bind
        return True
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return True
    if "psycopg" in sys.modules:
        import psycopg

        if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):  # also raised before sending: a NUL in text
            return True
        state = getattr(exc, "sqlstate", None)
        return isinstance(exc, psycopg.Error) and isinstance(state, str) and state[:2] in _CONTENT_SQLSTATE
    return False
