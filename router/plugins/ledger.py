"""The usage ledger: one row per call in a SQLite file or PostgreSQL, written off the hot path.

`Ledger` is a `Hook`. It adds up each call's attempts as they finish (`attempt_finished`: tokens and cost of
every billed attempt, the failed ones apart), builds the call's row when it ends (`call_finished`) and hands
it to a `Writer`: a daemon thread that writes rows in batches every `flush_interval_s` (or `batch_size`
rows). The call only appends to a queue.

Nothing is lost on purpose:
- `Router.close()` and interpreter exit (atexit) flush the queue;
- a batch the database refuses (down, restarting, disk full) is appended to a local spool file and written
  first when the database is back, from this process or the next one using the same spool;
- rows carry the call's id and are inserted with ON CONFLICT DO NOTHING, so a replay never doubles a row;
- a crash (SIGKILL, power) loses at most the rows of the last `flush_interval_s`.
A call never fails because the ledger is down: errors stay in the writer thread, logged once per outage.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hooks import AttemptReport, Call, Hook
from .store import CALL_COLUMNS, Store, db_errors, open_store, to_nusd

if TYPE_CHECKING:
    from ..config import LedgerConfig
    from ..types import Result

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the spool is then not shared between processes
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("router")


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


class Spool:
    """A JSON-lines file of rows waiting for the database; appends and replays are locked across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield f
            finally:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def append(self, rows: Sequence[Sequence[Any]]) -> None:
        """Add rows (fsynced: they outlive a crash)."""
        with self._locked() as f:
            end = f.seek(0, os.SEEK_END)
            if end:  # after a line torn by a crash, start a new one
                f.seek(end - 1)
                torn = f.read(1) != "\n"
                f.seek(end)
                if torn:
                    f.write("\n")
            f.write("".join(json.dumps(list(r)) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    def pending(self) -> bool:
        """Whether any row is waiting."""
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def replay(self, write: Callable[[list[tuple[Any, ...]]], None], batch: int) -> int:
        """Write every waiting row with `write`, then empty the file; on an error the file is kept whole."""
        with self._locked() as f:
            f.seek(0)
            rows, torn = [], 0
            for line in f:
                try:
                    rows.append(tuple(json.loads(line)))
                except ValueError:  # a line torn by a crash mid-append: the rest of the spool is still good
                    torn += line.strip() != ""
            if torn:
                log.error("ledger: %d torn line(s) in the spool %s were skipped", torn, self.path)
            for i in range(0, len(rows), batch):
                write(rows[i : i + batch])
            f.truncate(0)
            f.flush()
            os.fsync(f.fileno())
        return len(rows)


class Writer:
    """Writes rows in batches from a daemon thread; spools them while the database is down."""

    def __init__(self, store: Store, spool: Spool, flush_interval_s: float = 1.0, batch_size: int = 500) -> None:
        self.store = store
        self.spool = spool
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self._rows: list[tuple[Any, ...]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._flush_wanted = 0
        self._flushed = 0
        self._down = False
        self.written = 0  # rows this writer got into the database
        self.spooled = 0  # rows it had to spool
        self._thread = threading.Thread(target=self._run, name="llm-router-ledger", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)
        atexit.register(_close_at_exit, ref)

    def put(self, row: tuple[Any, ...]) -> None:
        """Queue a row; never blocks on the database."""
        with self._cond:
            self._rows.append(row)
            if len(self._rows) >= self.batch_size:
                self._cond.notify()

    def flush(self, timeout: float = 30.0) -> bool:
        """Write (or spool) every row queued so far; whether that finished within `timeout`."""
        with self._cond:
            self._flush_wanted += 1
            want = self._flush_wanted
            self._cond.notify()
            return self._cond.wait_for(lambda: self._flushed >= want or not self._thread.is_alive(), timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush and stop the thread."""
        with self._cond:
            if self._stop:
                return
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("ledger: the writer did not finish in %.0fs; rows still queued may be lost", timeout)
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
        errors = db_errors()
        try:
            if self.spool.pending():
                n = self.spool.replay(self._insert, self.batch_size)
                if n:
                    log.warning("ledger: wrote %d spooled row(s) to the database", n)
            for i in range(0, len(rows), self.batch_size):  # a failure part-way spools all: replays are no-ops
                self._insert(rows[i : i + self.batch_size])
            rows = []
            if self._down:
                self._down = False
                log.warning("ledger: the database is back")
        except errors as exc:
            if not self._down:
                self._down = True
                log.warning(
                    "ledger: cannot write to the database (%s); spooling rows to %s until it is back",
                    type(exc).__name__,
                    self.spool.path,
                )
        finally:
            if rows:
                try:
                    self.spool.append(rows)
                    self.spooled += len(rows)
                except OSError:
                    log.exception("ledger: cannot spool %d row(s) to %s; they are lost", len(rows), self.spool.path)

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self.store.insert_calls(rows)
            self.written += len(rows)


def _close_at_exit(ref: weakref.ReferenceType[Writer]) -> None:
    w = ref()
    if w is not None:
        w.close(timeout=10.0)


def spool_path(cfg: LedgerConfig) -> Path:
    """Where rows wait while the database is down."""
    if cfg.spool_path:
        return Path(cfg.spool_path)
    if cfg.backend == "sqlite":
        return Path(cfg.sqlite_path + ".spool")
    return Path("llm-router-ledger.spool")


class Ledger(Hook):
    """Records one row per call (see the module docstring); `flush()` waits for the rows queued so far."""

    def __init__(self, cfg: LedgerConfig, store: Store | None = None) -> None:
        self.config = cfg
        self.writer = Writer(store or open_store(cfg), Spool(spool_path(cfg)), cfg.flush_interval_s, cfg.batch_size)

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


__all__ = ["CALL_COLUMNS", "Ledger", "Spool", "Writer", "call_row", "ledger_of", "spool_path", "tally"]
