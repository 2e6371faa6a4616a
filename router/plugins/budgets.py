"""Spend budgets, enforced before any request and atomically across threads, workers and replicas.

`Budgets` is a blocking `Hook`. Before each request (`before_attempt`) it works out the request's worst-case
cost at that target's price and, in one transaction of the ledger's database, checks every budget in scope
and reserves that amount in each (a "hold"), or reserves nothing and refuses: `BudgetExceededError`, or a
`Reroute` to the budget's `fallback` alias. When the attempt ends (`attempt_finished`) the hold is settled
to the real cost (nothing for a failure that was not billed). A transaction takes the database's write lock
(SQLite `BEGIN IMMEDIATE`, a PostgreSQL advisory lock), so concurrent calls from any number of processes see
each other's holds: spent + held + this call never goes over the limit.

The worst case, stated:
- input tokens: the UTF-8 bytes of the request's message text, plus 4 per message and 3 (no tokenizer
  yields more tokens than bytes, so this bounds the real count from above);
- output tokens: the request's `max_tokens` (or `max_completion_tokens`); without it, the model's largest
  answer by litellm's model map; without that, 4096 (`DEFAULT_MAX_OUTPUT_TOKENS`);
- price: the target's `pricing:` entry, else litellm's price map; a target with neither is "unpriced":
  refused under a budget that scopes it (`unpriced: refuse`, the default) or let through reserving nothing
  (`unpriced: allow`).
The guarantee "recorded spend never exceeds the limit" holds when the worst case bounds the bill: a
config price and a max_tokens the provider respects. A provider-reported cost above the estimate is still
recorded in full (it was billed), and the next calls are refused.

A hold lives `HOLD_TTL_S`: a process that dies mid-call frees its holds after that. Settles are written by
a background thread (and by the next reservation of the same process, in its transaction), so a call's end
never waits on the database. A call that ends while one of its reservations is still being made (an
`agenerate()` cancelled while the reservation runs in its thread) gives that hold back as soon as it is made.

A reservation waits for the database (a lock held by another writer, a pool with no free connection) no
longer than what is left of the call's deadline (`Call.deadline_at`). If the deadline runs out first, the
call raises `DeadlineExceededError`, whatever `if_unavailable` says: no time is left to send the request.
A database that fails sooner (unreachable, or SQLite's own 30 s wait) is `if_unavailable`'s case.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..errors import BudgetExceededError, DeadlineExceededError
from ..hooks import AttemptReport, Call, Hook, Reroute
from .store import NUSD, Cursor, Store, db_errors, to_nusd

if TYPE_CHECKING:
    from ..config import BudgetConfig, RouterConfig, Target
    from ..metrics import RouterMetrics
    from ..types import Result

log = logging.getLogger("router")

DEFAULT_MAX_OUTPUT_TOKENS = 4096
HOLD_TTL_S = 900.0
# A wait for the database that fails with less than this left of the call's deadline ran out of the deadline.
DEADLINE_SLACK_S = 0.05


# -- pure decisions -----------------------------------------------------------------------------------------


def period_bounds(period: str, now: float) -> tuple[int, int]:
    """[start, end) of the calendar period (hour, day, month; UTC) that contains `now`, as unix seconds."""
    t = datetime.fromtimestamp(now, timezone.utc)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        return int(start.timestamp()), int(start.timestamp()) + 3600
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return int(start.timestamp()), int(start.timestamp()) + 86400
    if period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(t.year, t.month)[1]
        return int(start.timestamp()), int(start.timestamp()) + days * 86400
    raise ValueError(f"unknown period {period!r}")


def scope_of(b: BudgetConfig, alias: str, target: Target, key_name: str | None, tags: Mapping[str, str]) -> str | None:
    """The budget's scope value for a request ("" for a single limit, the tag value for `per_tag`), or None
    when the request is not in its scope."""
    if b.alias is not None and b.alias != alias:
        return None
    if b.provider is not None and b.provider != target.provider:
        return None
    if b.key is not None and b.key != key_name:
        return None
    if any(tags.get(k) != v for k, v in b.tags.items()):
        return None
    if b.per_tag is not None:
        return tags.get(b.per_tag)
    return ""


def input_token_bound(messages: Sequence[Mapping[str, Any]]) -> int:
    """An upper bound of a request's prompt tokens: UTF-8 bytes of its text, plus 4 per message and 3."""
    n = 3
    for m in messages:
        n += 4 + len(str(m.get("role", "")).encode())
        content = m.get("content")
        if isinstance(content, str):
            n += len(content.encode())
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, Mapping) else part
                n += len(str(text or "").encode())
        elif content is not None:
            n += len(str(content).encode())
        for extra in ("name", "tool_calls", "function_call"):
            if m.get(extra):
                n += len(str(m[extra]).encode())
    return n


def output_token_bound(request: Mapping[str, Any], model_max: int | None) -> int:
    """The request's max_tokens (or max_completion_tokens), else the model's max output, else 4096."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = request.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return model_max or DEFAULT_MAX_OUTPUT_TOKENS


def worst_case_usd(target: Target, input_tokens: int, output_tokens: int) -> float | None:
    """The most a request to `target` can cost by its config price, or litellm's map; None: unpriced."""
    if target.pricing is not None:
        p = target.pricing
        return input_tokens * p.input_per_token + output_tokens * p.output_per_token
    from ..engines import engine_for  # loaded already: this runs on a call's path
    from ..types import Usage

    return engine_for(target).price_map_cost(target, Usage(input_tokens, output_tokens))


# -- the database ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Hold:
    """An amount reserved in one budget's period for one request."""

    budget: str
    scope: str
    period_start: int
    amount_nusd: int


@dataclass(frozen=True)
class Refusal:
    """The hold that did not fit, and what the budget had spent and held at that moment."""

    hold: Hold
    spent_nusd: int
    held_nusd: int


_Settle = tuple[str, tuple[Hold, ...], int]  # hold id, its holds, the real cost


class BudgetStore:
    """Holds and spend per (budget, scope, period) in the ledger's database."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[_Settle] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = False
        self.on_spent: Any = None  # callback(budget, scope, spent_nusd) after a settle
        self._thread = threading.Thread(target=self._run, name="llm-router-budgets", daemon=True)
        self._thread.start()

    def reserve(
        self,
        hold_id: str,
        holds: Sequence[Hold],
        limits: Mapping[str, int],
        now: float,
        timeout: float | None = None,
    ) -> Refusal | None:
        """Reserve every hold, or none: the first that does not fit under its budget's limit is returned.
        `timeout`: the most to wait for the database (default: the store's own limit)."""
        with self._lock:
            pending, self._pending = self._pending, []
        try:
            with self.store.transaction(lock=True, timeout=timeout) as cur:
                spent = self._apply(cur, pending)
                refusal = None
                made: list[str] = []
                for h in sorted(holds):
                    cur.execute(
                        "INSERT INTO llm_budget_spend (budget, scope, period_start, spent_nusd) VALUES (?, ?, ?, 0) "
                        "ON CONFLICT (budget, scope, period_start) DO NOTHING",
                        (h.budget, h.scope, h.period_start),
                    )
                    row = cur.execute(
                        "SELECT spent_nusd FROM llm_budget_spend WHERE budget = ? AND scope = ? AND period_start = ?",
                        (h.budget, h.scope, h.period_start),
                    ).fetchone()
                    held_row = cur.execute(
                        "SELECT COALESCE(SUM(amount_nusd), 0) FROM llm_budget_holds "
                        "WHERE budget = ? AND scope = ? AND period_start = ? AND expires_at > ?",
                        (h.budget, h.scope, h.period_start, now),
                    ).fetchone()
                    s, held = int(row[0]) if row else 0, int(held_row[0]) if held_row else 0
                    spent[(h.budget, h.scope)] = s
                    if s + held + h.amount_nusd > limits[h.budget]:
                        refusal = Refusal(h, s, held)
                        break
                    hid = f"{hold_id}/{h.budget}"
                    cur.execute(
                        "INSERT INTO llm_budget_holds (id, budget, scope, period_start, amount_nusd, expires_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (hid, h.budget, h.scope, h.period_start, h.amount_nusd, now + HOLD_TTL_S),
                    )
                    made.append(hid)
                if refusal is not None:
                    for hid in made:
                        cur.execute("DELETE FROM llm_budget_holds WHERE id = ?", (hid,))
        except BaseException:
            with self._lock:  # the settles were not written: keep them for the next try
                self._pending[:0] = pending
            raise
        self._report(spent)
        return refusal

    def settle(self, hold_id: str, holds: Sequence[Hold], cost_nusd: int) -> None:
        """Replace the holds by the real cost; written by the background thread (never blocks)."""
        with self._cond:
            self._pending.append((hold_id, tuple(holds), cost_nusd))
            self._cond.notify()

    def spent(self, budget: str, scope: str, period_start: int) -> int:
        """The settled spend of a budget's period, in nano-USD."""
        with self.store.transaction() as cur:
            row = cur.execute(
                "SELECT spent_nusd FROM llm_budget_spend WHERE budget = ? AND scope = ? AND period_start = ?",
                (budget, scope, period_start),
            ).fetchone()
        return int(row[0]) if row else 0

    def flush(self, timeout: float = 10.0) -> None:
        """Write the settles queued so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify()
            while self._pending and time.monotonic() < deadline:
                self._cond.wait(0.05)

    def close(self) -> None:
        """Write what is queued, stop the thread, release the database."""
        self.flush()
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(10.0)
        self.store.close()

    def _apply(self, cur: Cursor, pending: Sequence[_Settle]) -> dict[tuple[str, str], int]:
        spent: dict[tuple[str, str], int] = {}
        for hold_id, holds, cost in pending:
            for h in sorted(holds):
                cur.execute(
                    "INSERT INTO llm_budget_spend (budget, scope, period_start, spent_nusd) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (budget, scope, period_start) DO UPDATE SET spent_nusd = "
                    "llm_budget_spend.spent_nusd + excluded.spent_nusd",
                    (h.budget, h.scope, h.period_start, cost),
                )
                cur.execute("DELETE FROM llm_budget_holds WHERE id = ?", (f"{hold_id}/{h.budget}",))
                row = cur.execute(
                    "SELECT spent_nusd FROM llm_budget_spend WHERE budget = ? AND scope = ? AND period_start = ?",
                    (h.budget, h.scope, h.period_start),
                ).fetchone()
                spent[(h.budget, h.scope)] = int(row[0]) if row else 0
        return spent

    def _run(self) -> None:
        errors = db_errors()
        last_sweep = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or bool(self._pending), 1.0)
                pending, self._pending = self._pending, []
                stop = self._stop
            if pending:
                try:
                    with self.store.transaction(lock=True) as cur:
                        spent = self._apply(cur, pending)
                        if time.time() - last_sweep > 60:
                            last_sweep = time.time()
                            cur.execute("DELETE FROM llm_budget_holds WHERE expires_at < ?", (time.time() - 3600,))
                    self._report(spent)
                except errors as exc:
                    log.warning(
                        "budgets: cannot settle %d hold(s) yet (%s); retrying", len(pending), type(exc).__name__
                    )
                    with self._cond:
                        self._pending[:0] = pending
                        if not self._stop:
                            self._cond.wait(1.0)
                with self._cond:
                    self._cond.notify_all()
            if stop:
                return

    def _report(self, spent: Mapping[tuple[str, str], int]) -> None:
        if self.on_spent is not None:
            for (budget, scope), value in spent.items():
                self.on_spent(budget, scope, value)


# -- the hook -------------------------------------------------------------------------------------------------


class Budgets(Hook):
    """Reserves each request's worst-case cost under every budget in scope; refuses or reroutes when it does
    not fit; settles to the real cost (see the module docstring)."""

    blocking = True

    def __init__(self, config: RouterConfig, metrics: RouterMetrics, store: Store) -> None:
        self.budgets = list(config.budgets)
        self.by_name = {b.name: b for b in self.budgets}
        self.limits = {b.name: to_nusd(b.limit_usd) for b in self.budgets}
        self.metrics = metrics
        self.store = BudgetStore(store)
        self.store.on_spent = self._spent
        self._counter = 0
        self._counter_lock = threading.Lock()
        # Guards each call's holds and its "finished" mark: a reservation made in a thread (agenerate) may
        # complete after the call was cancelled and finished.
        self._holds_lock = threading.Lock()
        self._late = False  # the database is answering later than calls' deadlines (logged once)

    def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
        if not call.hedge:  # no request of the call is in flight: a hold left was for one a later hook stopped
            self._release(call)
        alias = call.rerouted_to or call.alias
        in_scope = [
            (b, s) for b in self.budgets if (s := scope_of(b, alias, target, call.key_name, call.tags)) is not None
        ]
        if not in_scope:
            return
        now = time.time()
        from ..engines import engine_for

        out_tokens = output_token_bound(request, None)
        if not any(request.get(n) for n in ("max_tokens", "max_completion_tokens")):
            out_tokens = output_token_bound(request, engine_for(target).max_output_tokens(target))
        cost = worst_case_usd(target, input_token_bound(request.get("messages") or ()), out_tokens)
        holds = []
        for b, scope in in_scope:
            start, _ = period_bounds(b.period, now)
            if cost is None and b.unpriced == "refuse":
                self._refuse(call, b, scope, 0, 0.0, now, target, "unpriced")
            holds.append(Hold(b.name, scope, start, to_nusd(cost) if cost is not None else 0))
        with self._counter_lock:
            self._counter += 1
            hold_id = f"{call.id}.{self._counter}"
        left = None if call.deadline_at is None else call.deadline_at - time.monotonic()
        try:
            if left is not None and left <= 0:
                raise TimeoutError("the call's deadline has passed")
            refusal = self.store.reserve(hold_id, holds, self.limits, now, timeout=left)
        except db_errors() as exc:
            if call.deadline_at is not None and call.deadline_at - time.monotonic() < DEADLINE_SLACK_S:
                self._out_of_time(call, in_scope[0][0], exc)
            strict = [b for b, _ in in_scope if b.if_unavailable == "refuse"]
            if strict:
                log.error("budgets: the database is unreachable (%s); refusing the call", type(exc).__name__)
                self._refuse(call, strict[0], None, 0, 0.0, now, target, "unavailable")
            log.warning("budgets: the database is unreachable (%s); the call goes on unchecked", type(exc).__name__)
            return
        if self._late:
            self._late = False
            log.warning("budgets: the database answers within calls' deadlines again")
        if refusal is not None:
            b = self.by_name[refusal.hold.budget]
            used = refusal.spent_nusd + refusal.held_nusd
            self._refuse(call, b, refusal.hold.scope, used, refusal.hold.amount_nusd / NUSD, now, target, "limit")
        with self._holds_lock:
            if call.data.get("budgets.finished"):  # cancelled while this reservation was being made: give it back
                self.store.settle(hold_id, holds, 0)
                return
            # Keyed by the request's target and key: a hedged race has several requests in flight at once.
            held: dict[tuple[str, str | None], list[tuple[str, tuple[Hold, ...]]]] = call.data.setdefault("budgets", {})
            held.setdefault((target.key, call.key_name), []).append((hold_id, tuple(holds)))

    def attempt_finished(self, call: Call, report: AttemptReport) -> None:
        with self._holds_lock:
            held = call.data.get("budgets", {}).get((report.target.key, report.key_name))
            if not held:
                return
            hold_id, holds = held.pop(0)  # requests to one target and key hold the same amounts: any one fits
        cost = to_nusd(report.cost_usd or 0.0) if report.usage is not None else 0
        self.store.settle(hold_id, holds, cost)

    def call_finished(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        with self._holds_lock:
            call.data["budgets.finished"] = True  # a reservation still under way gives its hold back at once
        self._release(call)  # a later hook refused the request a hold was for, or the call was cancelled

    def _release(self, call: Call) -> None:
        with self._holds_lock:
            held = call.data.pop("budgets", {})
        for holds_of in held.values():
            for hold_id, holds in holds_of:
                self.store.settle(hold_id, holds, 0)

    def _out_of_time(self, call: Call, b: BudgetConfig, exc: BaseException) -> None:
        """The database did not answer within what was left of the call's deadline: the call ends now."""
        if not self._late:
            self._late = True
            log.warning(
                "budgets: the database did not answer within what was left of a call's deadline (%s; locked by "
                "another writer, or overloaded?): such calls raise DeadlineExceededError",
                type(exc).__name__,
            )
        self.metrics.budget_rejected(b.name, "deadline")
        deadline_s = (call.deadline_at or time.monotonic()) - time.monotonic() + time.time() - call.started_at
        raise DeadlineExceededError(call.alias, (), round(deadline_s, 2)) from exc

    def close(self) -> None:
        self.store.close()

    def _refuse(
        self,
        call: Call,
        b: BudgetConfig,
        scope: str | None,
        used_nusd: int,
        needed_usd: float,
        now: float,
        target: Target,
        reason: str,
    ) -> None:
        _, end = period_bounds(b.period, now)
        error = BudgetExceededError(
            b.name,
            used_nusd / NUSD,
            b.limit_usd,
            datetime.fromtimestamp(end, timezone.utc),
            reason,
            needed_usd,
            target.key,
            scope if b.per_tag is not None else None,
        )
        self.metrics.budget_rejected(b.name, reason)
        if b.fallback is not None and call.rerouted_to is None and reason != "unavailable":
            raise Reroute(b.fallback, error)
        raise error

    def _spent(self, budget: str, scope: str, spent_nusd: int) -> None:
        b = self.by_name.get(budget)
        if b is not None and b.per_tag is None:  # per-tag budgets: one value per tag would explode the labels
            self.metrics.budget_remaining(budget, (self.limits[budget] - spent_nusd) / NUSD)

    def __repr__(self) -> str:
        return f"<Budgets {', '.join(self.by_name)}>"
