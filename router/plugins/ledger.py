"""The usage ledger: one row per call in a SQLite file or PostgreSQL, written off the hot path.

`Ledger` is a `Hook`. It adds up each call's attempts as they finish (`attempt_finished`: tokens and cost of
every billed attempt, the failed ones apart), builds the call's row when it ends (`call_finished`) and hands
it to a `Writer`: a daemon thread that writes rows in batches every `flush_interval_s` (or `batch_size`
rows). The call only appends to a queue.

Nothing is lost on purpose, and what cannot be kept is counted:
- `Router.close()` and interpreter exit (atexit) flush the queue;
- a batch the database cannot take (down, restarting, read-only, locked, disk full) is appended to a local
  spool file and written first when the database is back, by this process or the next one using the same
  spool. A spool belongs to one database: its first line names it (`ledger_identity`, no secret), its default
  place follows from it (`spool_path`), and a spool naming another database is never replayed here;
- a batch the database refuses for what a row holds (a NUL in a JSON string, a NULL where none may be) is
  split until each refused row is alone: those go to the dead-letter file (`<spool>.dead-letter`, JSON lines
  with the reason), the others are written. One bad row never stops the ledger;
- when the spool cannot be written either (disk full, its directory unwritable) rows wait in memory, at most
  `MAX_MEMORY_ROWS`; a deleted directory is made again on the next write;
- rows carry the call's id and are inserted with ON CONFLICT DO NOTHING, so a replay never doubles a row;
- a crash (SIGKILL, power) loses at most the rows of the last `flush_interval_s`.
Rows that reach no database are counted in `llm_router_ledger_rows_dropped_total{reason}` (`DROP_REASONS`),
rows that a failed write left waiting in `llm_router_ledger_rows_waiting`. A call never fails because the
ledger is down: errors stay in the writer thread, and each condition is logged when it starts and when it
ends, never once per row.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hooks import AttemptReport, Call, Hook
from .store import (
    CALL_COLUMNS,
    Store,
    db_errors,
    is_content_error,
    ledger_identity,
    open_store,
    state_dir,
    to_nusd,
)

if TYPE_CHECKING:
    from ..config import LedgerConfig
    from ..metrics import RouterMetrics
    from ..types import Result

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the spool is then not shared between processes
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("router")

MAX_MEMORY_ROWS = 100_000  # rows kept in memory while neither the database nor the spool takes them
# Why a row reached no database: refused for its content (it is in the dead-letter file), no room left in
# memory, a spool line torn by a crash, still in memory when the ledger closed.
DROP_REASONS = ("rejected", "queue_full", "torn", "closed")
SPOOL_FORMAT = 1


@dataclass
class _Tally:
    """What a call's attempts added up to so far."""

    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nusd: int = 0
    failed_cost_nusd: int = 0
    cost_source: str | None = None
    provider: str | None = None
    model: str | None = None
    key_name: str | None = None


def tally(call: Call, report: AttemptReport) -> None:
    """Add one finished attempt to the call's tally (in `call.data["ledger"]`)."""
    t: _Tally = call.data.setdefault("ledger", _Tally())
    t.attempts += 1
    t.provider, t.model, t.key_name = report.target.provider, report.target.model, report.key_name
    if report.usage is not None:
        cost = to_nusd(report.cost_usd or 0.0)
        t.input_tokens += report.usage.input_tokens
        t.output_tokens += report.usage.output_tokens
        t.cost_nusd += cost
        if report.attempt.outcome != "success":
            t.failed_cost_nusd += cost
        t.cost_source = report.cost_source


def call_row(call: Call, result: Result | None, now: float) -> tuple[Any, ...]:
    """The ledger row of a finished call, in CALL_COLUMNS order."""
    t: _Tally = call.data.get("ledger") or _Tally()
    provider, model = (result.provider, result.model) if result is not None else (t.provider, t.model)
    source = t.cost_source if t.attempts else (result.cost_source if result is not None else None)
    return (
        call.id,
        call.started_at,
        call.alias,
        provider,
        model,
        t.key_name,
        json.dumps(dict(call.tags), sort_keys=True, separators=(",", ":")),
        t.input_tokens,
        t.output_tokens,
        t.cost_nusd,
        t.failed_cost_nusd,
        source,
        max(0.0, now - call.started_at),
        call.outcome,
        t.attempts,
        call.rerouted_to,
    )


class ForeignSpoolError(Exception):
    """The spool file holds rows of another database (or of one it does not name): they are not ours to write."""

    def __init__(self, path: Path, found: str | None, expected: str) -> None:
        self.path, self.found, self.expected = path, found, expected
        whose = f"database {found}" if found else "a database it does not name (written by an older version)"
        super().__init__(f"the spool {path} holds rows of {whose}, not of this ledger's {expected}")


class Spool:
    """A JSON-lines file of rows waiting for the database; appends and replays are locked across processes.

    Its first line names the database it belongs to; a file naming another is refused (`ForeignSpoolError`).
    `adopt_unnamed`: take a file with no such line as ours (a SQLite ledger's spool at its default place,
    written by an older version: it can only be that file's).
    """

    def __init__(self, path: Path, database: str = "", adopt_unnamed: bool = False) -> None:
        self.path = path
        self.database = database
        self.adopt_unnamed = adopt_unnamed
        self.rows = 0  # rows in the file, as this process last saw it

    @contextlib.contextmanager
    def _locked(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)  # made again if it was deleted
        with open(self.path, "a+", encoding="utf-8") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield f
            finally:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def _check_owner(self, f: Any) -> bool:
        """Whether the file holds anything: False when all it holds is one line torn by a failed first write
        (a full disk, a crash); raises ForeignSpoolError when it names another database, or none."""
        f.seek(0)
        first = f.readline()
        if not first.endswith("\n"):
            return False
        try:
            head = json.loads(first)
        except ValueError:
            head = None
        if isinstance(head, dict) and "llm_router_spool" in head:
            if head.get("database") != self.database:
                raise ForeignSpoolError(self.path, str(head.get("database")), self.database)
        elif not self.adopt_unnamed:
            raise ForeignSpoolError(self.path, None, self.database)
        return True

    def append(self, rows: Sequence[Sequence[Any]]) -> None:
        """Add rows (fsynced: they outlive a crash); a file of another database is left alone."""
        with self._locked() as f:
            end = f.seek(0, os.SEEK_END)
            if end and not self._check_owner(f):
                f.truncate(0)
                end = 0
            if end:
                f.seek(end - 1)  # after a line torn by a crash, start a new one
                torn = f.read(1) != "\n"
                f.seek(end)
                if torn:
                    f.write("\n")
            else:
                f.write(json.dumps({"llm_router_spool": SPOOL_FORMAT, "database": self.database}) + "\n")
            f.write("".join(json.dumps(list(r)) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
            self.rows = (self.rows if end else 0) + len(rows)

    def pending(self) -> bool:
        """Whether any row is waiting."""
        try:
            waiting = self.path.stat().st_size > 0
        except OSError:
            waiting = False
        if not waiting:
            self.rows = 0
        return waiting

    def replay(self, write: Callable[[list[tuple[Any, ...]]], None], batch: int) -> tuple[int, int]:
        """Write every waiting row with `write`, then empty the file; on an error the file is kept whole.
        Returns (rows written, lines torn by a crash and skipped)."""
        with self._locked() as f:
            if not f.seek(0, os.SEEK_END):
                self.rows = 0
                return 0, 0
            if not self._check_owner(f):
                f.truncate(0)
                self.rows = 0
                return 0, 1
            f.seek(0)
            rows, torn = [], 0
            for line in f:
                try:
                    item = json.loads(line)
                except ValueError:  # a line torn by a crash mid-append: the rest of the spool is still good
                    torn += line.strip() != ""
                    continue
                if isinstance(item, list):
                    rows.append(tuple(item))
                elif not (isinstance(item, dict) and "llm_router_spool" in item):
                    torn += 1
            self.rows = len(rows)
            for i in range(0, len(rows), batch):
                write(rows[i : i + batch])
            f.truncate(0)
            f.flush()
            os.fsync(f.fileno())
            self.rows = 0
        return len(rows), torn


class DeadLetter:
    """A JSON-lines file of the rows the database refused for what they hold, each with the reason."""

    def __init__(self, path: Path, database: str = "") -> None:
        self.path = path
        self.database = database

    def append(self, row: Sequence[Any], reason: str) -> None:
        """Keep one refused row (fsynced)."""
        named: Any = dict(zip(CALL_COLUMNS, row, strict=True)) if len(row) == len(CALL_COLUMNS) else list(row)
        entry = {"at": time.time(), "database": self.database, "reason": reason, "row": named}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=repr) + "\n")
            f.flush()
            os.fsync(f.fileno())


class _Conditions:
    """Log a condition once when it starts and once when it ends, however many rows meet it."""

    def __init__(self) -> None:
        self._on: set[str] = set()
        self._lock = threading.Lock()

    def start(self, name: str, level: int, msg: str, *args: Any) -> None:
        with self._lock:
            if name in self._on:
                return
            self._on.add(name)
        log.log(level, msg, *args)

    def end(self, name: str, msg: str | None = None, *args: Any) -> None:
        with self._lock:
            if name not in self._on:
                return
            self._on.discard(name)
        if msg is not None:
            log.warning(msg, *args)


def _describe(exc: BaseException) -> str:
    """An error in a log line: its type, with the message of a local error (a server's may name its host)."""
    if isinstance(exc, (OSError, sqlite3.Error)) and str(exc):
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} {state}" if state else type(exc).__name__


class Writer:
    """Writes rows in batches from a daemon thread; spools them while the database cannot take them, keeps
    them in memory while the spool cannot either, and dead-letters the rows the database refuses."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        flush_interval_s: float = 1.0,
        batch_size: int = 500,
        *,
        dead_letter: DeadLetter | None = None,
        metrics: RouterMetrics | None = None,
        max_memory_rows: int = MAX_MEMORY_ROWS,
    ) -> None:
        self.store = store
        self.spool = spool
        self.dead_letter = dead_letter or DeadLetter(dead_letter_path(spool.path), spool.database)
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_memory_rows = max_memory_rows
        self.metrics = metrics
        self._rows: list[tuple[Any, ...]] = []
        self._backlog: list[tuple[Any, ...]] = []  # rows a failed write left that the spool could not take
        self._cond = threading.Condition()
        self._stop = False
        self._flush_wanted = 0
        self._flushed = 0
        self._conditions = _Conditions()
        self.written = 0  # rows this writer got into the database
        self.spooled = 0  # rows it had to spool
        self.rejected = 0  # rows the database refused for their content (in the dead-letter file)
        self.dropped: Counter[str] = Counter()  # rows that reached no database, by reason
        if metrics is not None:
            for reason in DROP_REASONS:  # every series from the start: increase() sees the first drop
                metrics.ledger_dropped(reason, 0)
            metrics.ledger_waiting(0)
        self._thread = threading.Thread(target=self._run, name="llm-router-ledger", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)
        atexit.register(_close_at_exit, ref)

    def put(self, row: tuple[Any, ...]) -> None:
        """Queue a row; never blocks on the database. Past `max_memory_rows` in memory, the row is dropped."""
        with self._cond:
            if len(self._rows) + len(self._backlog) >= self.max_memory_rows:
                self._drop("queue_full", 1)
                return
            self._rows.append(row)
            if len(self._rows) >= self.batch_size:
                self._cond.notify()

    def waiting(self) -> int:
        """Rows a failed write left waiting: in memory and in the spool."""
        with self._cond:
            held = len(self._backlog)
        return held + (self.spool.rows if self.spool.pending() else 0)

    def flush(self, timeout: float = 30.0) -> bool:
        """Write (or spool) every row queued so far; whether that finished within `timeout`."""
        with self._cond:
            self._flush_wanted += 1
            want = self._flush_wanted
            self._cond.notify()
            return self._cond.wait_for(lambda: self._flushed >= want or not self._thread.is_alive(), timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush and stop the thread; rows that could be kept nowhere are counted and logged."""
        with self._cond:
            if self._stop:
                return
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            lost = len(self._backlog) + (len(self._rows) if self._thread.is_alive() else 0)
            self._backlog = []
        if self._thread.is_alive():
            log.error("ledger: the writer did not finish in %.0fs; %d row(s) still in memory are lost", timeout, lost)
        elif lost:
            log.error(
                "ledger: %d row(s) could be written neither to the database nor to the spool %s; they are lost",
                lost,
                self.spool.path,
            )
        if lost:
            self._drop("closed", lost)
        self.store.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stop or self._flush_wanted > self._flushed or len(self._rows) >= self.batch_size,
                    self.flush_interval_s,
                )
                rows, self._rows = self._rows, []
                stop, want = self._stop, self._flush_wanted
            try:
                self._write(rows)
            except Exception:  # a bug must not end the writer: later rows still need it
                log.exception("ledger: writing %d row(s) failed", len(rows))
            with self._cond:
                self._flushed = want
                self._cond.notify_all()
            if stop:
                return

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        with self._cond:
            todo, self._backlog = self._backlog + rows, []
        rejected = self.rejected
        try:
            self._replay()
            while todo:
                self._insert(todo[: self.batch_size])
                del todo[: self.batch_size]
            self._conditions.end("down", "ledger: the database is back")
        except db_errors() as exc:
            self._conditions.start(
                "down",
                logging.WARNING,
                "ledger: cannot write to the database (%s); rows wait in the spool %s until it is back",
                _describe(exc),
                self.spool.path,
            )
        finally:
            if todo:
                self._keep(todo)
            if self.rejected == rejected:
                self._conditions.end("rejected")
            if self.metrics is not None:
                self.metrics.ledger_waiting(self.waiting())

    def _replay(self) -> None:
        if not self.spool.pending():
            return
        try:
            n, torn = self.spool.replay(self._insert, self.batch_size)
        except ForeignSpoolError as exc:
            self._conditions.start(
                "foreign",
                logging.ERROR,
                "ledger: %s, so they are not written here. Move that file away, or point spool_path elsewhere; "
                "meanwhile this ledger keeps its own waiting rows in memory",
                exc,
            )
            return
        self._conditions.end("foreign", "ledger: the spool %s is this database's again", self.spool.path)
        if torn:
            self._drop("torn", torn)
            log.error("ledger: %d torn line(s) in the spool %s were skipped", torn, self.spool.path)
        if n:
            log.warning("ledger: wrote %d spooled row(s) to the database", n)

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert rows; a batch refused for what a row holds is split until each refused row is alone."""
        if not rows:
            return
        try:
            self.store.insert_calls(rows)
        except Exception as exc:
            if not is_content_error(exc):
                raise
            if len(rows) == 1:
                self._reject(rows[0], exc)
                return
            mid = len(rows) // 2
            self._insert(rows[:mid])
            self._insert(rows[mid:])
            return
        self.written += len(rows)

    def _reject(self, row: tuple[Any, ...], exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        self.rejected += 1
        self._drop("rejected", 1)
        try:
            self.dead_letter.append(row, reason)
        except OSError as err:
            log.error(
                "ledger: the database refused a row (%s) and the dead-letter file %s cannot be written (%s): "
                "the row is lost",
                reason.splitlines()[0][:300],
                self.dead_letter.path,
                _describe(err),
            )
            return
        self._conditions.start(
            "rejected",
            logging.ERROR,
            "ledger: the database refused a row for what it holds (%s); it is in %s with the reason, and the "
            "other rows are written",
            reason.splitlines()[0][:300],
            self.dead_letter.path,
        )

    def _keep(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows the database did not take: to the spool, else to memory, else dropped (counted)."""
        try:
            self.spool.append(rows)
        except ForeignSpoolError:
            pass  # logged by _replay, which meets it first
        except OSError as exc:
            self._conditions.start(
                "spool",
                logging.ERROR,
                "ledger: cannot spool rows to %s (%s); keeping up to %d row(s) in memory until the database "
                "or the spool takes them",
                self.spool.path,
                _describe(exc),
                self.max_memory_rows,
            )
        else:
            self.spooled += len(rows)
            self._conditions.end("spool", "ledger: rows are spooled to %s again", self.spool.path)
            return
        with self._cond:
            room = max(0, self.max_memory_rows - len(self._rows) - len(self._backlog))
            self._backlog[:0] = rows[:room]  # they go first next time
            lost = len(rows) - min(room, len(rows))
        if lost:
            self._drop("queue_full", lost)

    def _drop(self, reason: str, n: int) -> None:
        self.dropped[reason] += n
        if self.metrics is not None:
            self.metrics.ledger_dropped(reason, n)
        if reason == "queue_full":
            self._conditions.start(
                "queue_full",
                logging.ERROR,
                "ledger: %d row(s) wait in memory, the most it keeps: further rows are dropped (and counted in "
                "llm_router_ledger_rows_dropped_total) until the database or the spool takes them",
                self.max_memory_rows,
            )


def _close_at_exit(ref: weakref.ReferenceType[Writer]) -> None:
    w = ref()
    if w is not None:
        w.close(timeout=10.0)


def spool_path(cfg: LedgerConfig) -> Path:
    """Where rows wait while the database is down: `spool_path`, else next to the SQLite file, else (PostgreSQL)
    a file named by a hash of the database's identity in this user's state directory."""
    if cfg.spool_path:
        return Path(cfg.spool_path)
    if cfg.backend == "sqlite":
        return Path(os.path.abspath(cfg.sqlite_path) + ".spool")
    digest = hashlib.sha256(ledger_identity(cfg).encode()).hexdigest()[:16]
    return state_dir() / f"ledger-{digest}.spool"


def dead_letter_path(spool: Path) -> Path:
    """Where the rows the database refused are kept: next to the spool."""
    return spool.with_name(spool.name + ".dead-letter")


class Ledger(Hook):
    """Records one row per call (see the module docstring); `flush()` waits for the rows queued so far."""

    def __init__(self, cfg: LedgerConfig, store: Store | None = None, metrics: RouterMetrics | None = None) -> None:
        self.config = cfg
        identity = ledger_identity(cfg)
        spool = Spool(spool_path(cfg), identity, adopt_unnamed=cfg.backend == "sqlite" and not cfg.spool_path)
        self.writer = Writer(
            store or open_store(cfg),
            spool,
            cfg.flush_interval_s,
            cfg.batch_size,
            dead_letter=DeadLetter(dead_letter_path(spool.path), identity),
            metrics=metrics,
        )

    def attempt_finished(self, call: Call, report: AttemptReport) -> None:
        tally(call, report)

    def call_finished(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        self.writer.put(call_row(call, result, time.time()))

    def flush(self, timeout: float = 30.0) -> bool:
        """Write every row queued so far (or spool it); whether that finished in time."""
        return self.writer.flush(timeout)

    def close(self) -> None:
        self.writer.close()

    def __repr__(self) -> str:
        return f"<Ledger {self.config.backend}>"


def ledger_of(hooks: Sequence[Hook]) -> Ledger | None:
    """The Ledger among a Router's hooks, if any."""
    return next((h for h in hooks if isinstance(h, Ledger)), None)


__all__ = [
    "CALL_COLUMNS",
    "DROP_REASONS",
    "DeadLetter",
    "ForeignSpoolError",
    "Ledger",
    "Spool",
    "Writer",
    "call_row",
    "dead_letter_path",
    "ledger_of",
    "spool_path",
    "tally",
]
