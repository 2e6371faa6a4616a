"""Turn raw measurements into figures with PASS/FAIL, and write RESULTS.md, overhead.png and results.json."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .measure import percentile

LABELS = {
    "raw_async": "raw aiohttp POST (floor)",
    "litellm_async": "litellm.acompletion",
    "litellm_router_async": "litellm.Router.acompletion",
    "router_async": "router.Router.agenerate",
    "raw_sync": "raw http.client POST (sync floor)",
    "litellm_sync": "litellm.completion",
    "router_sync": "router.Router.generate",
    "httpx_async": "httpx.AsyncClient POST",
    "openai_async": "openai SDK (async)",
    "direct_async": "router.Router.agenerate, direct engine",
    "httpx_sync": "httpx.Client POST",
    "openai_sync": "openai SDK (sync)",
    "direct_sync": "router.Router.generate, direct engine",
}
ASYNC = ["raw_async", "litellm_async", "litellm_router_async", "router_async", "httpx_async", "openai_async",
         "direct_async"]  # fmt: skip
SYNC = ["raw_sync", "litellm_sync", "router_sync", "httpx_sync", "openai_sync", "direct_sync"]
STREAM_LABELS = {
    "httpx_stream_async": "httpx stream, json per event (floor)",
    "openai_stream_async": "openai SDK stream",
    "litellm_stream_async": "litellm.acompletion stream",
    "router_stream_async": "Router.agenerate stream, litellm engine",
    "direct_stream_async": "Router.agenerate stream, direct engine",
    "direct_stream_sync": "Router.generate stream, direct engine",
}


@dataclass
class Figure:
    """One headline number: a ratio (when it has one), the absolutes beside it, and the verdict on its target."""

    key: str
    name: str
    ratio: str  # e.g. "1.02× litellm"; "" when the figure is absolute
    absolute: str  # e.g. "4.31 ms vs 4.22 ms"
    target: str  # "" when there is none
    verdict: str  # PASS, FAIL, INFO or n/a
    value: float | None = None

    def line(self) -> str:
        """The one-line stdout summary."""
        head = f"[{self.verdict}]".ljust(7)
        ratio = f"{self.ratio}; " if self.ratio else ""
        target = f"  (target {self.target})" if self.target else ""
        return f"{head} {self.name}: {ratio}{self.absolute}{target}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if abs(s) < 0.01 else f"{s * 1e3:.1f} ms"


def _ratios(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]: each round's pair ran side by side."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Medians and percentiles of the raw rounds, per variant."""
    seq = res["sequential"]
    out: dict[str, Any] = {"sequential": {}, "concurrent": {}}
    for key, r in seq.items():
        floor = "raw_async" if key in ASYNC else "raw_sync"
        lat, flat = r["lat_s"], seq[floor]["lat_s"]
        out["sequential"][key] = {
            "cpu_ms": statistics.median(r["cpu_s"]) * 1e3,
            "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3,
            "p50_added_ms": (percentile(lat, 50) - percentile(flat, 50)) * 1e3,
            "p99_added_ms": (percentile(lat, 99) - percentile(flat, 99)) * 1e3,
            "rps": statistics.median(r["rps"]),
        }
    for c, by_variant in res["concurrent"].items():
        out["concurrent"][c] = {
            k: {"rps": statistics.median(v["rps"]), "cpu_ms": statistics.median(v["cpu_s"]) * 1e3}
            for k, v in by_variant.items()
        }
    return out


def figures(res: dict[str, Any]) -> list[Figure]:
    """The headline figures, targets first."""
    seq, conc, s = res["sequential"], res["concurrent"], res["summary"]
    figs: list[Figure] = []

    # CPU per call, async: the headline promise.
    r = _ratios(seq["router_async"]["cpu_s"], seq["litellm_async"]["cpu_s"])
    ss = s["sequential"]
    figs.append(Figure(
        "cpu_async", "client CPU per call, Router.agenerate vs litellm.acompletion",
        f"{r:.3f}× litellm",
        f"{ss['router_async']['cpu_ms']:.3f} ms vs {ss['litellm_async']['cpu_ms']:.3f} ms "
        f"(litellm.Router {ss['litellm_router_async']['cpu_ms']:.3f} ms, raw floor {ss['raw_async']['cpu_ms']:.3f} ms)",
        "≤ 1.05×", _verdict(r <= 1.05), r,
    ))

    ro = res["router_only"]
    own_a, own_s = statistics.median(ro["async_cpu_s"]), statistics.median(ro["sync_cpu_s"])
    lit_a = ss["litellm_async"]["cpu_ms"] / 1e3
    figs.append(Figure(
        "router_own_cpu", "the router's own CPU per call (litellm's call stubbed with a recorded answer)",
        f"{own_a / lit_a * 100:.1f}% of litellm.acompletion",
        f"agenerate {own_a * 1e6:.0f} µs, generate {own_s * 1e6:.0f} µs (bare litellm.acompletion "
        f"{lit_a * 1e3:.3f} ms)", "", "INFO", own_a,
    ))

    # Throughput at concurrency 50.
    c50 = conc["50"]
    r_lit = _ratios(c50["router_async"]["rps"], c50["litellm_async"]["rps"])
    r_lr = _ratios(c50["router_async"]["rps"], c50["litellm_router_async"]["rps"])
    cs = s["concurrent"]["50"]
    figs.append(Figure(
        "throughput_c50_vs_litellm", "throughput at concurrency 50, Router.agenerate vs litellm.acompletion",
        f"{r_lit:.3f}× litellm",
        f"{cs['router_async']['rps']:.0f} vs {cs['litellm_async']['rps']:.0f} calls/s "
        f"(raw floor {cs['raw_async']['rps']:.0f} calls/s)",
        "≥ 0.95×", _verdict(r_lit >= 0.95), r_lit,
    ))
    figs.append(Figure(
        "throughput_c50_vs_litellm_router", "throughput at concurrency 50, Router.agenerate vs litellm.Router",
        f"{r_lr:.3f}× litellm.Router",
        f"{cs['router_async']['rps']:.0f} vs {cs['litellm_router_async']['rps']:.0f} calls/s",
        "≥ 1.3×", _verdict(r_lr >= 1.3), r_lr,
    ))

    figs += direct_figures(res)

    # Fallback.
    fb = res["fallback"]
    extra = statistics.median(fb["extra_s"])
    figs.append(Figure(
        "fallback_extra", "fallback after an instant 503, beyond the failed attempt itself",
        "",
        f"{extra * 1e3:+.3f} ms (fallback call {statistics.median(fb['fallback_s']) * 1e3:.2f} ms = failed attempt "
        f"{statistics.median(fb['failed_attempt_s']) * 1e3:.2f} ms + rest; direct call "
        f"{statistics.median(fb['direct_s']) * 1e3:.2f} ms)",
        "≤ 1 ms", _verdict(extra <= 0.001), extra,
    ))
    if "open_extra_s" in fb:
        open_extra = statistics.median(fb["open_extra_s"])
        figs.append(Figure(
            "fallback_circuit_open", "fallback when the first target's circuit is open (no request to it)", "",
            f"{open_extra * 1e3:+.3f} ms over a direct call ({statistics.median(fb['open_s']) * 1e3:.2f} ms vs "
            f"{statistics.median(fb['direct_s']) * 1e3:.2f} ms)", "", "INFO", open_extra,
        ))
    else:
        figs.append(Figure(
            "fallback_circuit_open", "fallback when the first target's circuit is open", "",
            "n/a (no circuit breaker yet)", "", "n/a", None,
        ))

    # Leak.
    leak = res["leak"]
    pts = [p for p in leak["points"] if p["calls"] > 0]
    first_cp, last_cp = leak["checkpoints"][0], leak["checkpoints"][-1]
    if len(pts) >= 2 and pts[-1]["calls"] > pts[0]["calls"]:
        a, b = pts[0], pts[-1]
        growth = (b["rss"] - a["rss"]) / a["rss"]
        per_call = (b["rss"] - a["rss"]) / (b["calls"] - a["calls"])
        short = b["calls"] < last_cp
        note = f" — stopped at {b['calls']:,} calls by the time budget; rerun with --leak-budget 0 for the full count" \
            if short else ""
        figs.append(Figure(
            "rss_growth", f"RSS growth from {a['calls']:,} to {b['calls']:,} Router.agenerate calls",
            f"{growth * 100:+.2f}%",
            f"{a['rss'] / 2**20:.1f} MiB → {b['rss'] / 2**20:.1f} MiB ({per_call:+.1f} bytes/call){note}",
            f"< 5% ({first_cp:,} → {last_cp:,})", _verdict(growth < 0.05) + ("*" if short else ""), growth,
        ))
    else:
        figs.append(Figure("rss_growth", "RSS growth", "", "not measured (time budget too small)", "< 5%", "n/a"))

    # Startup.
    st = res["startup"]
    v, imp = st["validate"]["best_s"], st["import_router"]["best_s"]
    figs.append(Figure(
        "validate_wall", "`llm-router validate` (50 aliases) wall, best of "
        f"{len(st['validate']['runs_s'])}", "", f"{v * 1e3:.0f} ms (median {st['validate']['median_s'] * 1e3:.0f} ms)",
        "< 1 s", _verdict(v < 1.0), v,
    ))
    figs.append(Figure(
        "import_wall", f"`import router` wall (fresh interpreter), best of {len(st['import_router']['runs_s'])}", "",
        f"{imp * 1e3:.0f} ms (median {st['import_router']['median_s'] * 1e3:.0f} ms; bare interpreter "
        f"{st['python_startup']['best_s'] * 1e3:.0f} ms)",
        "< 0.5 s", _verdict(imp < 0.5), imp,
    ))

    # Informational.
    g = res["gc"]
    figs.append(Figure(
        "gc_full_pass", "one full GC pass with litellm loaded", "",
        f"{g['full_collect_s'] * 1e3:.0f} ms over {g['objects']:,} tracked objects; measured "
        + ("with that heap frozen (gc.freeze())" if g["frozen"] else "with that heap NOT frozen (--no-gc-freeze)"),
        "", "INFO", g["full_collect_s"],
    ))
    figs.append(Figure(
        "load_config_50", "load_config of a 50-alias config (in process)", "",
        f"{st['load_config_50']['best_s'] * 1e3:.1f} ms best, {st['load_config_50']['median_s'] * 1e3:.1f} ms median, "
        f"{st['load_config_50']['first_s'] * 1e3:.1f} ms first", "", "INFO", st["load_config_50"]["best_s"],
    ))
    r = _ratios(seq["router_sync"]["cpu_s"], seq["litellm_sync"]["cpu_s"])
    figs.append(Figure(
        "cpu_sync", "client CPU per call, Router.generate vs litellm.completion", f"{r:.3f}× litellm",
        f"{ss['router_sync']['cpu_ms']:.3f} ms vs {ss['litellm_sync']['cpu_ms']:.3f} ms "
        f"(raw floor {ss['raw_sync']['cpu_ms']:.3f} ms)", "", "INFO", r,
    ))
    for key in ("router_async", "litellm_async", "litellm_router_async", "router_sync", "litellm_sync"):
        x = ss[key]
        figs.append(Figure(
            f"latency_{key}", f"latency added over the raw floor, {LABELS[key]}", "",
            f"p50 +{x['p50_added_ms']:.3f} ms, p99 +{x['p99_added_ms']:.3f} ms", "", "INFO",
        ))
    for c in res["concurrent"]:
        cc = s["concurrent"][c]
        rl = _ratios(res["concurrent"][c]["router_async"]["rps"], res["concurrent"][c]["litellm_async"]["rps"])
        figs.append(Figure(
            f"throughput_c{c}", f"throughput at concurrency {c}", f"{rl:.3f}× litellm",
            ", ".join(f"{LABELS[k].split(' (')[0]} {cc[k]['rps']:.0f}/s" for k in ASYNC), "", "INFO", rl,
        ))
    c1 = ss
    figs.append(Figure(
        "throughput_c1", "throughput at concurrency 1",
        f"{c1['router_async']['rps'] / c1['litellm_async']['rps']:.3f}× litellm",
        ", ".join(f"{LABELS[k].split(' (')[0]} {c1[k]['rps']:.0f}/s" for k in ASYNC), "", "INFO",
    ))
    return figs


def direct_figures(res: dict[str, Any]) -> list[Figure]:
    """The direct engine against bare litellm, the openai SDK and httpx (issue 17's targets)."""
    seq, s = res["sequential"], res["summary"]["sequential"]
    if "direct_async" not in seq:
        return []
    figs = []
    for mode, lit, sdk in (("async", "litellm_async", "openai_async"), ("sync", "litellm_sync", "openai_sync")):
        d = f"direct_{mode}"
        call = "agenerate" if mode == "async" else "generate"
        r_lit = _ratios(seq[d]["cpu_s"], seq[lit]["cpu_s"])
        r_sdk = _ratios(seq[d]["cpu_s"], seq[sdk]["cpu_s"])
        httpx_ms = s[f"httpx_{mode}"]["cpu_ms"]
        figs.append(Figure(
            f"direct_cpu_{mode}_vs_litellm", f"client CPU per call, Router.{call} (direct engine) vs {LABELS[lit]}",
            f"{r_lit:.3f}× litellm", f"{s[d]['cpu_ms']:.3f} ms vs {s[lit]['cpu_ms']:.3f} ms (httpx {httpx_ms:.3f} ms)",
            "≤ 0.35×", _verdict(r_lit <= 0.35), r_lit,
        ))
        figs.append(Figure(
            f"direct_cpu_{mode}_vs_openai", f"client CPU per call, Router.{call} (direct engine) vs {LABELS[sdk]}",
            f"{r_sdk:.3f}× openai SDK", f"{s[d]['cpu_ms']:.3f} ms vs {s[sdk]['cpu_ms']:.3f} ms",
            "≤ 1.3×", _verdict(r_sdk <= 1.3), r_sdk,
        ))
    conc = res["concurrent"].get("50", {})
    if "direct_async" in conc:
        r = _ratios(conc["direct_async"]["rps"], conc["litellm_async"]["rps"])
        cs = res["summary"]["concurrent"]["50"]
        figs.append(Figure(
            "direct_throughput_c50", "throughput at concurrency 50, Router.agenerate (direct engine) vs litellm",
            f"{r:.3f}× litellm", f"{cs['direct_async']['rps']:.0f} vs {cs['litellm_async']['rps']:.0f} calls/s "
            f"(openai SDK {cs['openai_async']['rps']:.0f}, httpx {cs['httpx_async']['rps']:.0f})",
            "≥ 2×", _verdict(r >= 2.0), r,
        ))
    streams = res.get("streams")
    if streams:
        from .upstream import STREAM_CHUNKS

        per = {k: statistics.median(v["cpu_s"]) / STREAM_CHUNKS * 1e6 for k, v in streams.items()}
        r = _ratios(streams["direct_stream_async"]["cpu_s"], streams["litellm_stream_async"]["cpu_s"])
        figs.append(Figure(
            "direct_stream_cpu_per_chunk", "streaming client CPU per chunk, Router.agenerate (direct engine)",
            f"{r:.3f}× litellm", ", ".join(f"{STREAM_LABELS[k]} {v:.0f} µs" for k, v in per.items()), "", "INFO", r,
        ))
    eng = res.get("engines")
    if eng:
        d, li = eng["direct"], eng["litellm"]
        figs.append(Figure(
            "direct_import_first_call", "`import router` + the first call, fresh process: direct-only config vs "
            "LiteLLM config", f"{d['import_and_first_s'] / li['import_and_first_s']:.3f}× litellm",
            f"{d['import_and_first_s'] * 1e3:.0f} ms vs {li['import_and_first_s'] * 1e3:.0f} ms (litellm imported: "
            f"{'yes' if d['litellm_imported'] else 'no'} vs {'yes' if li['litellm_imported'] else 'no'})",
            "", "INFO", d["import_and_first_s"],
        ))
        figs.append(Figure(
            "direct_rss_1000", "RSS after 1,000 calls, fresh process: direct-only config vs LiteLLM config",
            f"{d['rss_1000'] / li['rss_1000']:.3f}× litellm",
            f"{d['rss_1000'] / 2**20:.1f} MiB vs {li['rss_1000'] / 2**20:.1f} MiB (after the first call "
            f"{d['rss_first'] / 2**20:.1f} vs {li['rss_first'] / 2**20:.1f} MiB)", "", "INFO", d["rss_1000"],
        ))
    return figs


def engines_markdown(res: dict[str, Any]) -> list[str]:
    """The Engines section of RESULTS.md: per call, streams, startup and memory, direct engine beside the rest."""
    if "direct_async" not in res["sequential"]:
        return []
    s = res["summary"]["sequential"]
    out = [
        "",
        "## Engines: the direct engine beside litellm, the openai SDK and httpx",
        "",
        "| Variant | CPU / call | vs litellm | vs openai SDK | p50 | calls/s (c=1) | calls/s (c=50) |",
        "|---|---|---|---|---|---|---|",
    ]
    c50 = res["summary"]["concurrent"].get("50", {})
    for mode in ("async", "sync"):
        for k in (f"litellm_{mode}", f"router_{mode}", f"openai_{mode}", f"httpx_{mode}", f"direct_{mode}"):
            r_lit = _ratios(res["sequential"][k]["cpu_s"], res["sequential"][f"litellm_{mode}"]["cpu_s"])
            r_sdk = _ratios(res["sequential"][k]["cpu_s"], res["sequential"][f"openai_{mode}"]["cpu_s"])
            rps50 = f"{c50[k]['rps']:.0f}" if k in c50 else "—"
            out.append(f"| {LABELS[k]} | {s[k]['cpu_ms']:.3f} ms | {r_lit:.3f}× | {r_sdk:.3f}× | "
                       f"{s[k]['p50_ms']:.3f} ms | {s[k]['rps']:.0f} | {rps50} |")
    streams = res.get("streams")
    if streams:
        from .upstream import STREAM_CHUNKS

        out += ["", f"Streamed answers ({STREAM_CHUNKS} content chunks each, written one event at a time):", "",
                "| Variant | CPU / answer | CPU / chunk | vs litellm |", "|---|---|---|---|"]
        for k, v in streams.items():
            cpu = statistics.median(v["cpu_s"])
            r = _ratios(v["cpu_s"], streams["litellm_stream_async"]["cpu_s"])
            out.append(f"| {STREAM_LABELS[k]} | {cpu * 1e3:.3f} ms | {cpu / STREAM_CHUNKS * 1e6:.0f} µs | {r:.3f}× |")
    eng = res.get("engines")
    if eng:
        out += ["", "Fresh processes, the same one-target config on each engine, priced by LiteLLM's model map:", "",
                "| Config | import router | + first call | RSS after the first call | RSS after 1,000 calls "
                "| litellm imported |", "|---|---|---|---|---|---|"]
        for name in ("direct", "litellm"):
            e = eng[name]
            out.append(f"| engine: {name} | {e['import_s'] * 1e3:.0f} ms | {e['import_and_first_s'] * 1e3:.0f} ms | "
                       f"{e['rss_first'] / 2**20:.1f} MiB | {e['rss_1000'] / 2**20:.1f} MiB | "
                       f"{'yes' if e['litellm_imported'] else 'no'} |")
    return out


# -- writing ---------------------------------------------------------------------------------------------------


def _machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu_model']}, {m['cores']} cores ({m['pinning']}), Linux {m['kernel']}, Python {m['python']}, "
        f"litellm {m['litellm']}, aiohttp {m['aiohttp']}, llm-router {m['router']}"
    )


def markdown(res: dict[str, Any], figs: list[Figure]) -> str:
    """RESULTS.md."""
    meta, s = res["meta"], res["summary"]
    p = meta["params"]
    out = [
        "# llm-router overhead benchmark",
        "",
        f"Generated by `python -m bench{' --quick' if meta['quick'] else ''}"
        f"{' --with ' + meta['candidate'] if meta.get('candidate') else ''}` on {meta['started']} "
        f"in {meta['duration_s']:.0f} s. Machine: {_machine_line(meta['machine'])}.",
        "",
        "Every call goes to a loopback OpenAI-compatible upstream in another process (aiohttp, fixed 'pong' answer "
        "with usage), so CPU times are the client's alone. Variants run interleaved, in a new order each round, and "
        "each measurement window ends only after litellm's deferred success logging is done. Ratios are medians "
        "of per-round ratios. Every variant sends the kwargs the router builds (model, messages, api_base, "
        "api_key, max_retries=0, timeout); the router's config prices the target itself.",
        "",
        (f"GC: with litellm loaded one full collection takes {res['gc']['full_collect_s'] * 1e3:.0f} ms "
         f"({res['gc']['objects']:,} tracked objects) and lands in whichever batch runs at the time, so after "
         "warm-up that import-time heap is frozen (`gc.freeze()`) and a `gc.collect()` precedes each batch; "
         "`--no-gc-freeze` measures without." if res["gc"]["frozen"] else
         f"GC: NOT frozen (--no-gc-freeze): full collections ({res['gc']['full_collect_s'] * 1e3:.0f} ms each) "
         "land at random in batches."),
        "",
        "## Targets",
        "",
        "| Figure | Ratio | Absolute | Target | Result |",
        "|---|---|---|---|---|",
    ]
    for f in figs:
        if f.target or f.key in ("fallback_circuit_open", "router_own_cpu"):
            out.append(f"| {f.name} | {f.ratio or '—'} | {f.absolute} | {f.target or '—'} | **{f.verdict}** |")
    if any(f.verdict.endswith("*") for f in figs):
        out += ["", "\\* measured over fewer calls than the target names (time budget); see the leak section."]
    out += [
        "",
        f"## Per call, concurrency 1 ({p['rounds']} rounds × {p['calls_per_round']} calls per variant)",
        "",
        "| Variant | CPU vs litellm | CPU / call | p50 added over floor | p99 added over floor | p50 | p99 | calls/s "
        "| full GC passes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seq = s["sequential"]
    for group, base in ((ASYNC, "litellm_async"), (SYNC, "litellm_sync")):
        for k in group:
            x = seq[k]
            ratio = _ratios(res["sequential"][k]["cpu_s"], res["sequential"][base]["cpu_s"])
            out.append(
                f"| {LABELS[k]} | {ratio:.3f}× | {x['cpu_ms']:.3f} ms | {x['p50_added_ms']:+.3f} ms | "
                f"{x['p99_added_ms']:+.3f} ms | {x['p50_ms']:.3f} ms | {x['p99_ms']:.3f} ms | {x['rps']:.0f} | "
                f"{res['sequential'][k].get('gc2', 0)} |"
            )
    levels = list(res["concurrent"])
    out += [
        "",
        f"## Throughput, async ({p['throughput_rounds']} rounds × max({p['throughput_calls']}, "
        f"{p.get('waves', 3)} × concurrency) calls per cell; concurrency 1 from the per-call rounds)",
        "",
        "| Variant | " + " | ".join(f"c={c} vs litellm" for c in ["1", *levels]) + " | "
        + " | ".join(f"c={c} calls/s" for c in ["1", *levels]) + " | "
        + " | ".join(f"c={c} CPU/call" for c in levels) + " |",
        "|---|" + "---|" * (2 * (len(levels) + 1) + len(levels)),
    ]
    for k in ASYNC:
        ratios = [_ratios(res["sequential"][k]["rps"], res["sequential"]["litellm_async"]["rps"])]
        ratios += [
            _ratios(res["concurrent"][c][k]["rps"], res["concurrent"][c]["litellm_async"]["rps"]) for c in levels
        ]
        rps = [seq[k]["rps"]] + [s["concurrent"][c][k]["rps"] for c in levels]
        cpu = [s["concurrent"][c][k]["cpu_ms"] for c in levels]
        out.append(
            f"| {LABELS[k]} | " + " | ".join(f"{r:.3f}×" for r in ratios) + " | "
            + " | ".join(f"{x:.0f}" for x in rps) + " | " + " | ".join(f"{x:.3f} ms" for x in cpu) + " |"
        )
    fb = res["fallback"]
    out += [
        "",
        f"## Fallback ({p['fallback_rounds']} rounds × {p['fallback_calls']} call pairs, alternating)",
        "",
        "Alias `fallback` = [fail/bench-model → ok/bench-model], retry attempts 1; `fail` answers 503 at once "
        "(its circuit never trips). Extra = median(fallback call − its failed attempt's `latency_s`) − "
        "median(direct call to ok/bench-model). Alias `fallback_open` has a first target on the same 503 route "
        "whose circuit opened at its first failure and stays open: the router skips it without a request.",
        "",
        "| | median |",
        "|---|---|",
        f"| direct call | {statistics.median(fb['direct_s']) * 1e3:.3f} ms |",
        f"| fallback call | {statistics.median(fb['fallback_s']) * 1e3:.3f} ms |",
        f"| its failed attempt (`attempts[0].latency_s`) | {statistics.median(fb['failed_attempt_s']) * 1e3:.3f} ms |",
        f"| **extra beyond the failed attempt** | **{statistics.median(fb['extra_s']) * 1e3:+.3f} ms** "
        f"(rounds: {', '.join(f'{x * 1e3:+.3f}' for x in fb['extra_s'])}) |",
    ]
    if "open_extra_s" in fb:
        out += [
            f"| fallback when the first target's circuit is open (alias `fallback_open`) | "
            f"{statistics.median(fb['open_s']) * 1e3:.3f} ms |",
            "| **extra over a direct call, circuit open** | "
            f"**{statistics.median(fb['open_extra_s']) * 1e3:+.3f} ms** |",
        ]
    else:
        out.append("| fallback when the circuit is open | n/a (no circuit breaker yet) |")
    leak = res["leak"]
    out += [
        "",
        f"## Memory (Router.agenerate at concurrency {leak['concurrency']}, RSS from /proc/self/statm after gc)",
        "",
        "| calls | RSS | elapsed |",
        "|---|---|---|",
    ]
    for pt in leak["points"]:
        out.append(f"| {pt['calls']:,} | {pt['rss'] / 2**20:.1f} MiB | {pt['t']:.0f} s |")
    if leak["stopped_early"]:
        out += ["", f"Stopped by the time budget before {leak['checkpoints'][-1]:,} calls; "
                "`python -m bench --leak-budget 0` runs the full count."]
    out += engines_markdown(res)
    st = res["startup"]
    out += [
        "",
        "## Startup",
        "",
        "| | best | median |",
        "|---|---|---|",
        f"| `python -c pass` (interpreter alone) | {st['python_startup']['best_s'] * 1e3:.0f} ms | "
        f"{st['python_startup']['median_s'] * 1e3:.0f} ms |",
        f"| `python -c 'import router'` | {st['import_router']['best_s'] * 1e3:.0f} ms | "
        f"{st['import_router']['median_s'] * 1e3:.0f} ms |",
        f"| `llm-router validate` (50 aliases) | {st['validate']['best_s'] * 1e3:.0f} ms | "
        f"{st['validate']['median_s'] * 1e3:.0f} ms |",
        f"| `router.load_config` (50 aliases, in process) | {st['load_config_50']['best_s'] * 1e3:.1f} ms | "
        f"{st['load_config_50']['median_s'] * 1e3:.1f} ms |",
        "",
        "![overhead](overhead.png)",
        "",
    ]
    if meta["quick"]:
        out.insert(4, "\n> `--quick`: few rounds and calls, so the verdicts are indicative; `make bench` is the "
                      "measurement.\n")
    if meta.get("candidate"):
        out.insert(4, f"\n> **A proposed change, not the router as it is:** the `{meta['candidate']}` candidate of "
                      "`bench.profile` was applied to the router's litellm calls for this run.\n")
    if meta.get("settle_timeouts"):
        out.insert(4, f"\n> warning: {meta['settle_timeouts']} measurement windows timed out waiting for litellm's "
                      "deferred logging.\n")
    return "\n".join(out)


def chart(res: dict[str, Any], path: Path) -> None:
    """overhead.png: CPU per call, latency added, throughput by concurrency, RSS over calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["summary"]
    seq = s["sequential"]
    colors = {"raw_async": "#999999", "litellm_async": "#4c72b0", "litellm_router_async": "#dd8452",
              "router_async": "#55a868", "raw_sync": "#bbbbbb", "litellm_sync": "#8da0cb", "router_sync": "#a6d854",
              "httpx_async": "#777777", "openai_async": "#8172b3", "direct_async": "#c44e52",
              "httpx_sync": "#cccccc", "openai_sync": "#b3a6d8", "direct_sync": "#e78ac3"}
    short = {"raw_async": "raw aiohttp", "litellm_async": "litellm\nacompletion",
             "litellm_router_async": "litellm\nRouter", "router_async": "router\nagenerate",
             "raw_sync": "raw sync", "litellm_sync": "litellm\ncompletion", "router_sync": "router\ngenerate",
             "httpx_async": "httpx\nasync", "openai_async": "openai\nSDK async", "direct_async": "router\ndirect async",
             "httpx_sync": "httpx\nsync", "openai_sync": "openai\nSDK sync", "direct_sync": "router\ndirect sync"}
    keys_present = set(seq)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    keys = [k for k in ASYNC + SYNC if k in keys_present]
    asyncs = [k for k in ASYNC if k in keys_present]

    ax = axes[0][0]
    vals = [seq[k]["cpu_ms"] for k in keys]
    ax.bar(range(len(keys)), vals, color=[colors[k] for k in keys])
    ax.set_xticks(range(len(keys)), [short[k] for k in keys], fontsize=6)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms of client CPU per call")
    ax.set_title("Client CPU per call (concurrency 1)")

    ax = axes[0][1]
    ks = [k for k in keys if not k.startswith("raw")]
    x = range(len(ks))
    ax.bar([i - 0.2 for i in x], [seq[k]["p50_added_ms"] for k in ks], 0.4, label="p50", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], [seq[k]["p99_added_ms"] for k in ks], 0.4, label="p99", color="#c44e52")
    ax.set_xticks(list(x), [short[k] for k in ks], fontsize=6)
    ax.set_ylabel("ms added over the raw HTTP floor")
    ax.set_title("Latency added over the floor (concurrency 1)")
    ax.legend()

    ax = axes[1][0]
    levels = ["1", *res["concurrent"]]
    width = 0.8 / len(asyncs)
    for j, k in enumerate(asyncs):
        ys = [seq[k]["rps"]] + [s["concurrent"][c][k]["rps"] for c in levels[1:]]
        offset = (j - (len(asyncs) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(levels))], ys, width, label=short[k].replace("\n", " "),
               color=colors[k])
    ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
    ax.set_yscale("log")
    ax.set_ylabel("calls / s (log)")
    ax.set_title("Async throughput by concurrency")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    pts = res["leak"]["points"]
    ax.plot([p["calls"] for p in pts], [p["rss"] / 2**20 for p in pts], marker="o", color="#55a868")
    ax.set_xlabel("Router.agenerate calls")
    ax.set_ylabel("RSS (MiB)")
    lo = min(p["rss"] for p in pts) / 2**20
    ax.set_ylim(lo * 0.9, max(p["rss"] for p in pts) / 2**20 * 1.1)
    ax.set_title("Memory over calls (leak check)")

    m = res["meta"]["machine"]
    fig.suptitle(f"llm-router overhead — {m['cpu_model']}, {m['cores']} cores, Python {m['python']}, "
                 f"litellm {m['litellm']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write(res: dict[str, Any], figs: list[Figure], out_dir: Path) -> list[Path]:
    """Write RESULTS.md, overhead.png and results.json into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png, js = out_dir / "RESULTS.md", out_dir / "overhead.png", out_dir / "results.json"
    md.write_text(markdown(res, figs) + "\n")
    chart(res, png)
    js.write_text(json.dumps(_jsonable({**res, "figures": [asdict(f) for f in figs]}), indent=1) + "\n")
    return [md, png, js]
