"""`llm-router shadow-report`: each shadow target beside the primary that answered the same calls, from the ledger.

Shadow rows (router/plugins/shadow.py) carry the id of the primary call they shadowed (`shadow_of`), so a
shadow and its primary are paired by a join in the ledger's database: across workers, replicas and restarts.
For each alias, shadow target and primary target, over the shadow requests that started in the window:

    calls compared              shadow requests whose primary row is in the ledger (the others: `unpaired`)
    p50 / p95 latency           primary: the whole call as its caller waited for it (retries included);
                                shadow: its one request, answered ones only
    errors by outcome           shadow: share of its requests per failure outcome (`cancelled`: cut by a
                                shutdown, not the candidate's fault); primary: over every call of the alias in
                                the window (a shadowed call was answered by definition)
    cost per call               mean USD per compared call (a shadow that failed mostly costs nothing)
    cost per 1k output tokens   USD per 1,000 output tokens of the answered ones
    output length ratio         shadow output tokens / primary output tokens, over the calls both answered
    agreement                   structured output and tool calls: the share of calls whose parsed values are
                                equal; text: the mean Jaccard similarity of the two answers' sets of words, a
                                rough signal of how alike they are, not a judgement of which is better

Reads the ledger only (no LiteLLM), like `llm-router usage`.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .usage import _ledger_of, parse_time

if TYPE_CHECKING:
    from .config import LedgerConfig, RouterConfig

AGREEMENT_NOTE = (
    "agreement: structured output and tool calls, the share of calls whose parsed values are equal; text, the "
    "mean Jaccard similarity of the two answers' sets of lower-cased words (1 = the same words). A rough signal "
    "of how alike the answers are, not a judgement of their quality: read a sample of the pairs before switching."
)
KIND_NAMES = {"parsed": "structured output", "tools": "tool calls", "text": "text"}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile `q` (0-100) of `values`; None when there are none."""
    if not values:
        return None
    s = sorted(values)
    rank = -(-q * len(s) // 100)  # ceil
    return s[max(0, min(len(s) - 1, int(rank) - 1))]


@dataclass
class Side:
    """One side of a comparison (the primary or the shadow) over the compared calls."""

    latencies: list[float] = field(default_factory=list)  # of answered requests
    outcomes: Counter[str] = field(default_factory=Counter)
    cost_nusd: int = 0
    answered_cost_nusd: int = 0
    output_tokens: int = 0

    def summary(self, calls: int) -> dict[str, Any]:
        """p50/p95 latency, cost per call and per 1k output tokens."""
        return {
            "p50_latency_s": percentile(self.latencies, 50),
            "p95_latency_s": percentile(self.latencies, 95),
            "cost_per_call_usd": self.cost_nusd / 1e9 / calls if calls else None,
            "cost_per_1k_output_tokens_usd": (
                self.answered_cost_nusd / 1e9 / self.output_tokens * 1000 if self.output_tokens else None
            ),
        }


@dataclass
class Comparison:
    """One shadow target beside one primary target of an alias, over the calls both were sent."""

    alias: str
    primary: str  # provider/model that answered the calls
    shadow: str  # provider/model of the shadow target
    calls: int = 0
    primary_side: Side = field(default_factory=Side)
    shadow_side: Side = field(default_factory=Side)
    both_answered_output: tuple[int, int] = (0, 0)  # (primary, shadow) output tokens where both answered
    agreement: dict[str, list[float]] = field(default_factory=dict)  # kind -> values
    primary_errors: dict[str, Any] = field(default_factory=dict)  # over every call of the alias in the window

    def as_dict(self) -> dict[str, Any]:
        """The comparison as plain data (what `--format json` prints)."""
        n = self.calls
        shadow_errors = {o: c for o, c in self.shadow_side.outcomes.items() if o != "success"}
        p_out, s_out = self.both_answered_output
        return {
            "alias": self.alias,
            "primary": self.primary,
            "shadow": self.shadow,
            "calls_compared": n,
            "primary_side": {**self.primary_side.summary(n), "errors": self.primary_errors},
            "shadow_side": {
                **self.shadow_side.summary(n),
                "errors": {
                    "rate": sum(shadow_errors.values()) / n if n else 0.0,
                    "by_outcome": {o: c / n for o, c in sorted(shadow_errors.items())},
                },
            },
            "output_length_ratio": s_out / p_out if p_out else None,
            "agreement": {
                kind: {"calls": len(v), "mean": sum(v) / len(v)} for kind, v in sorted(self.agreement.items()) if v
            },
        }


@dataclass
class ShadowReport:
    """The comparisons of a window, and the shadow rows whose primary is not in the ledger."""

    since: float
    until: float
    comparisons: list[Comparison]
    unpaired: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data."""
        return {
            "since": _iso(self.since),
            "until": _iso(self.until),
            "comparisons": [c.as_dict() for c in self.comparisons],
            "unpaired_shadow_requests": self.unpaired,
            "note": AGREEMENT_NOTE,
        }


_PAIRS = """
SELECT s.alias, s.provider, s.model, s.outcome, s.latency_s, s.output_tokens, s.cost_nusd, s.agreement,
       s.agreement_kind, p.id, p.provider, p.model, p.outcome, p.latency_s, p.output_tokens, p.cost_nusd
FROM llm_calls s LEFT JOIN llm_calls p ON p.id = s.shadow_of
WHERE s.shadow_of IS NOT NULL AND s.ts >= ? AND s.ts < ?{alias}
"""
_PRIMARY_OUTCOMES = """
SELECT alias, outcome, COUNT(*) FROM llm_calls
WHERE shadow_of IS NULL AND ts >= ? AND ts < ?{alias}
GROUP BY alias, outcome
"""


def query_shadow_report(
    config: RouterConfig | LedgerConfig | str | os.PathLike[str],
    *,
    since: str | float | datetime = "24h",
    until: str | float | datetime | None = None,
    alias: str | None = None,
) -> ShadowReport:
    """The shadow comparisons of the shadow requests that started in [since, until) (see the module docstring),
    for every alias or only `alias`; `since`/`until` as `query_usage` takes them."""
    from .plugins.store import open_store

    now = time.time()
    start = parse_time(since, now)
    end = parse_time(until, now) if until is not None else now + 1.0
    where, params = (" AND s.alias = ?", [alias]) if alias is not None else ("", [])
    store = open_store(_ledger_of(config))
    try:
        with store.transaction() as cur:
            pairs = cur.execute(_PAIRS.format(alias=where), (start, end, *params)).fetchall()
            totals = cur.execute(
                _PRIMARY_OUTCOMES.format(alias=where.replace("s.", "")), (start, end, *params)
            ).fetchall()
    finally:
        store.close()
    return build_report(pairs, totals, start, end)


def build_report(
    pairs: Sequence[Sequence[Any]], primary_outcomes: Sequence[Sequence[Any]], since: float, until: float
) -> ShadowReport:
    """The report from the rows of `_PAIRS` and `_PRIMARY_OUTCOMES` (pure: no database)."""
    by_alias: dict[str, Counter[str]] = {}
    for a, outcome, count in primary_outcomes:
        by_alias.setdefault(a, Counter())[outcome] += int(count)
    groups: dict[tuple[str, str, str], Comparison] = {}
    unpaired = 0
    for row in pairs:
        (a, s_prov, s_model, s_outcome, s_lat, s_out, s_cost, agree, kind, p_id, p_prov, p_model, p_outcome,
         p_lat, p_out, p_cost) = row  # fmt: skip
        if p_id is None:
            unpaired += 1
            continue
        key = (a, f"{p_prov}/{p_model}", f"{s_prov}/{s_model}")
        c = groups.get(key)
        if c is None:
            c = groups[key] = Comparison(*key)
        c.calls += 1
        _add(c.primary_side, p_outcome, p_lat, p_out, p_cost)
        _add(c.shadow_side, s_outcome, s_lat, s_out, s_cost)
        if p_outcome == "success" and s_outcome == "success":
            po, so = c.both_answered_output
            c.both_answered_output = (po + int(p_out or 0), so + int(s_out or 0))
        if agree is not None and kind is not None:
            c.agreement.setdefault(str(kind), []).append(float(agree))
    for c in groups.values():
        outcomes = by_alias.get(c.alias, Counter())
        total = sum(outcomes.values())
        failed = {o: n for o, n in outcomes.items() if o != "success"}
        c.primary_errors = {
            "calls_of_the_alias": total,
            "rate": sum(failed.values()) / total if total else 0.0,
            "by_outcome": {o: n / total for o, n in sorted(failed.items())} if total else {},
        }
    comparisons = sorted(groups.values(), key=lambda c: (c.alias, c.shadow, -c.calls, c.primary))
    return ShadowReport(since, until, comparisons, unpaired)


def _add(side: Side, outcome: str, latency: Any, output_tokens: Any, cost: Any) -> None:
    side.outcomes[outcome] += 1
    side.cost_nusd += int(cost or 0)
    if outcome == "success":
        side.latencies.append(float(latency))
        side.answered_cost_nusd += int(cost or 0)
        side.output_tokens += int(output_tokens or 0)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- rendering --------------------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def _usd(v: float | None) -> str:
    return "-" if v is None else f"${v:.6f}"


def _pct(v: float) -> str:
    return f"{v * 100:.1f}%"


def _errors(errors: dict[str, Any]) -> str:
    detail = ", ".join(f"{o} {_pct(r)}" for o, r in errors["by_outcome"].items())
    return _pct(errors["rate"]) + (f" ({detail})" if detail else "")


def render_report(report: ShadowReport, fmt: str = "table") -> str:
    """The report as text blocks, one per comparison (`table`), or JSON."""
    if fmt == "json":
        return json.dumps(report.as_dict(), indent=2)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}: table or json")
    head = f"shadow report, {_iso(report.since)} to {_iso(report.until)}"
    if not report.comparisons:
        lines = [head, "", "no shadow request in this window (is `shadow:` set on an alias, and the ledger on?)"]
        if report.unpaired:
            lines.append(f"{report.unpaired} shadow request(s) whose primary call is not in the ledger were left out")
        return "\n".join(lines)
    out = [head]
    for c in report.comparisons:
        d = c.as_dict()
        p, s = d["primary_side"], d["shadow_side"]
        ratio = d["output_length_ratio"]
        rows = [
            ("", "primary", "shadow"),
            ("p50 latency", _ms(p["p50_latency_s"]), _ms(s["p50_latency_s"])),
            ("p95 latency", _ms(p["p95_latency_s"]), _ms(s["p95_latency_s"])),
            ("errors", _errors(p["errors"]), _errors(s["errors"])),
            ("cost per call", _usd(p["cost_per_call_usd"]), _usd(s["cost_per_call_usd"])),
            (
                "cost per 1k output tokens",
                _usd(p["cost_per_1k_output_tokens_usd"]),
                _usd(s["cost_per_1k_output_tokens_usd"]),
            ),
            ("output length", "1.00", "-" if ratio is None else f"{ratio:.2f}"),
        ]
        for kind, a in d["agreement"].items():
            said = (
                f"{_pct(a['mean'])} of {a['calls']} equal"
                if kind in ("parsed", "tools")
                else f"{a['mean']:.2f} mean similarity over {a['calls']}"
            )
            rows.append((f"agreement ({KIND_NAMES.get(kind, kind)})", "", said))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        out += ["", f"{c.alias}: {c.shadow} (shadow) beside {c.primary} (primary), {c.calls} call(s) compared"]
        out += [f"  {a.ljust(w0)}  {b.ljust(w1)}  {x}".rstrip() for a, b, x in rows]
        calls = p["errors"]["calls_of_the_alias"]
        out.append(f"  (primary errors: over all {calls} call(s) of {c.alias} in the window)")
    if report.unpaired:
        out += ["", f"{report.unpaired} shadow request(s) whose primary call is not in the ledger were left out"]
    out += ["", *textwrap.wrap(AGREEMENT_NOTE, 116)]
    return "\n".join(out)


__all__ = ["AGREEMENT_NOTE", "Comparison", "ShadowReport", "build_report", "query_shadow_report", "render_report"]
