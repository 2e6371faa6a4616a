"""Usage by time window from the ledger: `query_usage()` and `llm-router usage`.

Sums are computed by the database over integer nano-USD, so a group's cost is exactly the sum of its rows'.
Group by any of: alias, provider, model, key, outcome, cost_source, rerouted_to, shadow, day, hour; any other
name (or `tag:NAME`) is a tag. Shadow requests (router/plugins/shadow.py) are rows of their own, counted like
calls (they are billed); `shadow` tells them apart (`yes` / `no`). Rows appear once the ledger's writer has
flushed them (`ledger.flush_interval_s`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .errors import UnknownTagError

if TYPE_CHECKING:
    from .config import LedgerConfig, RouterConfig

COLUMNS = {
    "alias": "alias",
    "provider": "provider",
    "model": "model",
    "key": "key_name",
    "outcome": "outcome",
    "cost_source": "cost_source",
    "rerouted_to": "rerouted_to",
    "shadow": "CASE WHEN shadow_of IS NULL THEN 'no' ELSE 'yes' END",
}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class UsageRow:
    """One group of calls: its dimension values and what its calls used."""

    group: dict[str, str | None]
    calls: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_nusd: int  # nano-USD, exact
    failed_cost_nusd: int

    @property
    def cost_usd(self) -> float:
        """Everything billed, failed attempts included, in USD."""
        return self.cost_nusd / 1e9

    @property
    def failed_cost_usd(self) -> float:
        """What failed attempts (a stream cut after text) were billed, in USD."""
        return self.failed_cost_nusd / 1e9


def parse_time(text: str | float | datetime, now: float | None = None) -> float:
    """Unix time of `24h`/`30m`/`7d`/`2w` ago, of an ISO date or datetime (UTC unless it says), or as given."""
    now = time.time() if now is None else now
    if isinstance(text, (int, float)):
        return float(text)
    if isinstance(text, datetime):
        return (text if text.tzinfo else text.replace(tzinfo=timezone.utc)).timestamp()
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (24h, 30m, 7d, 2w) nor an ISO date (2026-12-01)") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def _ledger_of(config: RouterConfig | LedgerConfig | str | os.PathLike[str]) -> LedgerConfig:
    from .config import LedgerConfig, RouterConfig, load_config

    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    if isinstance(config, RouterConfig):
        if config.ledger is None:
            raise ValueError(f"{config.source} has no ledger: section, so there is no usage to read")
        return config.ledger
    if isinstance(config, LedgerConfig):
        return config
    raise TypeError(f"expected a RouterConfig, a LedgerConfig or a config path, not {type(config).__name__}")


def query_usage(
    config: RouterConfig | LedgerConfig | str | os.PathLike[str],
    *,
    since: str | float | datetime = "24h",
    until: str | float | datetime | None = None,
    by: Sequence[str] = (),
) -> list[UsageRow]:
    """Usage of the calls that started in [since, until), grouped `by` dimensions or tags, costliest first.

    ``query_usage("config.yaml", since="24h", by=["tenant", "provider"])``. `since`/`until`: a duration ago
    (24h, 30m, 7d), an ISO date or datetime (UTC), a unix time or a datetime.
    """
    from .plugins.store import open_store

    now = time.time()
    start = parse_time(since, now)
    end = parse_time(until, now) if until is not None else now + 1.0
    store = open_store(_ledger_of(config))
    try:
        exprs, params = [], []
        for name in by:
            if name in COLUMNS:
                exprs.append(COLUMNS[name])
            elif not is_tag(name):
                exprs.append(store.time_expr(name))
            else:
                exprs.append(store.tag_expr())
                params.append(name.removeprefix("tag:"))
        dims = "".join(f"{e}, " for e in exprs)
        group = f" GROUP BY {', '.join(str(i + 1) for i in range(len(exprs)))}" if exprs else ""
        sql = (
            f"SELECT {dims}COUNT(*), COALESCE(SUM(CASE WHEN outcome = 'success' THEN 0 ELSE 1 END), 0), "
            "COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_nusd), 0), "
            f"COALESCE(SUM(failed_cost_nusd), 0) FROM llm_calls WHERE ts >= ? AND ts < ?{group}"
        )
        with store.transaction() as cur:
            rows = cur.execute(sql, (*params, start, end)).fetchall()
            missing = _absent_tag(by, rows)
            if missing is not None:
                known = [str(r[0]) for r in cur.execute(store.tag_names_sql(), (start, end)).fetchall()]
                raise UnknownTagError(missing, known)
    finally:
        store.close()
    n = len(exprs)
    out = [
        UsageRow(
            group={name: (None if v is None else str(v)) for name, v in zip(by, r[:n], strict=True)},
            calls=int(r[n]),
            errors=int(r[n + 1]),
            input_tokens=int(r[n + 2]),
            output_tokens=int(r[n + 3]),
            cost_nusd=int(r[n + 4]),
            failed_cost_nusd=int(r[n + 5]),
        )
        for r in rows
        if int(r[n]) > 0
    ]
    out.sort(key=lambda u: (-u.cost_nusd, -u.calls, [v or "" for v in u.group.values()]))
    return out


def is_tag(name: str) -> bool:
    """Whether a `by` name groups by a tag (anything that is not a column, day or hour)."""
    return name not in COLUMNS and name not in ("day", "hour")


def _absent_tag(by: Sequence[str], rows: Sequence[Sequence[Any]]) -> str | None:
    """The first tag of `by` that no row carries (its value is NULL in every group), when there are rows at all:
    grouping by it shows every call as one `(none)` group, which is never what was meant."""
    live = [r for r in rows if int(r[len(by)])]
    for i, name in enumerate(by):
        if is_tag(name) and live and all(r[i] is None for r in live):
            return name.removeprefix("tag:")
    return None


def read_calls(
    config: RouterConfig | LedgerConfig | str | os.PathLike[str],
    *,
    since: str | float | datetime = "24h",
    until: str | float | datetime | None = None,
) -> list[dict[str, Any]]:
    """The ledger's rows of the calls that started in [since, until), oldest first (tags decoded)."""
    from .plugins.store import CALL_COLUMNS, open_store

    now = time.time()
    start = parse_time(since, now)
    end = parse_time(until, now) if until is not None else now + 1.0
    store = open_store(_ledger_of(config))
    try:
        with store.transaction() as cur:
            rows = cur.execute(
                f"SELECT {', '.join(CALL_COLUMNS)} FROM llm_calls WHERE ts >= ? AND ts < ? ORDER BY ts, id",
                (start, end),
            ).fetchall()
    finally:
        store.close()
    out = []
    for r in rows:
        d = dict(zip(CALL_COLUMNS, r, strict=True))
        tags = d["tags"]
        d["tags"] = json.loads(tags) if isinstance(tags, str) else dict(tags)
        out.append(d)
    return out


_HEAD = ("calls", "errors", "input_tokens", "output_tokens", "cost_usd", "failed_cost_usd")
NONE = "(none)"  # a group of calls without the tag (or the column's value): never a blank cell that reads as "ditto"


def _values(u: UsageRow) -> list[Any]:
    return [u.calls, u.errors, u.input_tokens, u.output_tokens, f"{u.cost_usd:.9f}", f"{u.failed_cost_usd:.9f}"]


def as_json(u: UsageRow) -> dict[str, Any]:
    """One row as JSON: USD as numbers, with the exact integer nano-USD beside them (null: no such tag)."""
    return {
        **u.group,
        "calls": u.calls,
        "errors": u.errors,
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cost_usd": u.cost_usd,
        "cost_nusd": u.cost_nusd,
        "failed_cost_usd": u.failed_cost_usd,
        "failed_cost_nusd": u.failed_cost_nusd,
    }


def render(rows: Sequence[UsageRow], by: Sequence[str], fmt: str = "table") -> str:
    """Usage rows as an aligned table (with a total line), CSV or JSON."""
    head = [*by, *_HEAD]
    if fmt == "json":
        return json.dumps([as_json(u) for u in rows], indent=2)
    if fmt == "csv":
        import csv
        import io

        # a machine's format: an empty field is NULL, as CSV readers take it
        body = [[*("" if v is None else v for v in u.group.values()), *_values(u)] for u in rows]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(head)
        w.writerows(body)
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}: table, csv or json")
    body = [[*(NONE if v is None else v for v in u.group.values()), *_values(u)] for u in rows]
    total = UsageRow(
        {},
        sum(u.calls for u in rows),
        sum(u.errors for u in rows),
        sum(u.input_tokens for u in rows),
        sum(u.output_tokens for u in rows),
        sum(u.cost_nusd for u in rows),
        sum(u.failed_cost_nusd for u in rows),
    )
    lines = [head, *body, *([["total", *[""] * (len(by) - 1), *_values(total)]] if by else [])]
    cells = [[str(c) for c in line] for line in lines]
    widths = [max(len(line[i]) for line in cells if i < len(line)) for i in range(len(head))]
    nby = len(by)
    return "\n".join(
        "  ".join(c.ljust(widths[i]) if i < nby else c.rjust(widths[i]) for i, c in enumerate(line)).rstrip()
        for line in cells
    )
