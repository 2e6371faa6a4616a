"""The benchmark run: start the upstream, measure every phase within a time budget, write the results."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Plan:
    """How much of everything to measure."""

    budget_s: float  # wall time of `python -m bench`: the leak check gets what the other phases leave
    warmup: int
    rounds: int
    calls_per_round: int
    levels: tuple[int, ...]
    throughput_rounds: int
    throughput_calls: int  # per cell, at least `waves` × the concurrency
    waves: int
    fallback_rounds: int
    fallback_calls: int
    leak_checkpoints: tuple[int, ...]
    startup_runs: int
    router_only_calls: int
    stream_rounds: int = 5
    stream_calls: int = 100  # streamed answers per variant per round
    engine_runs: int = 3  # fresh processes per engine: import + first call, RSS after 1,000 calls


FULL = Plan(255, 100, 7, 150, (50, 200), 3, 400, 3, 5, 100, (10_000, 100_000), 5, 3000)
QUICK = Plan(42, 20, 3, 50, (50, 200), 1, 150, 2, 3, 20, (2_000, 10_000), 3, 1000, 2, 30, 1)


def machine(pinning: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "pinning": pinning,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "litellm": version("litellm"),
        "aiohttp": version("aiohttp"),
        "router": version("llm-router"),
    }


def pin() -> tuple[int | None, str]:
    """Give the upstream a core of its own when there are two or more; return its CPU and a description."""
    if not hasattr(os, "sched_getaffinity"):
        return None, "not pinned"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, "not pinned: one CPU, the upstream shares it"
    upstream, mine = cpus[-1], set(cpus[:-1])
    os.sched_setaffinity(0, mine)
    return upstream, f"upstream pinned to CPU {upstream}, benchmark to CPU {','.join(map(str, sorted(mine)))}"


def gc_info(freeze: bool) -> dict[str, Any]:
    """What one full GC pass costs with litellm loaded; then freeze that heap if asked.

    litellm leaves ~300k GC-tracked objects; a pass over the oldest generation then takes a few hundred
    milliseconds, and lands in whichever batch happens to be running: one such pass is a 10% swing in a
    1.5 s batch. Frozen (`gc.freeze()`), they are skipped, so what remains is each variant's own work.
    """
    objects = len(gc.get_objects())
    t = time.perf_counter()
    gc.collect()
    full_s = time.perf_counter() - t
    if freeze:
        gc.freeze()
    t = time.perf_counter()
    gc.collect()
    after_s = time.perf_counter() - t
    return {"objects": objects, "full_collect_s": full_s, "frozen": freeze, "collect_after_s": after_s}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description="Measure what llm-router costs over litellm.")
    ap.add_argument("--quick", action="store_true", help="a smaller run for `make bench-quick` (under a minute)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where to write the results (default bench/results)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 255, quick 42)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target fails (for CI on a quiet machine)")
    ap.add_argument("--leak-calls", default=None, help="leak-check checkpoints, e.g. 10000,100000")
    ap.add_argument(
        "--with", dest="candidate", default=None, metavar="CANDIDATE",
        help="apply a bench.profile candidate (e.g. quiet_call) to the router's litellm calls for the whole run: "
        "measures a proposed router change before it is made",
    )
    ap.add_argument(
        "--no-gc-freeze", action="store_true",
        help="measure with litellm's import-time heap unfrozen (full GC passes then land at random in batches)",
    )
    ap.add_argument(
        "--leak-budget", type=float, default=None,
        help="seconds for the leak check (default: what the budget leaves; 0 = no limit, run every checkpoint)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run everything, print one line per figure, write bench/results/; with --strict, exit 1 if a target fails."""
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    budget = args.budget if args.budget is not None else plan.budget_s
    checkpoints = tuple(int(x) for x in args.leak_calls.split(",")) if args.leak_calls else plan.leak_checkpoints
    t_start = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    upstream_cpu, pinning = pin()

    # The startup figures first, before this process has litellm and its threads loaded.
    from . import startup

    say("startup: import router, load_config, llm-router validate")
    res: dict[str, Any] = {"startup": startup.measure(plan.startup_runs)}

    say("importing litellm")
    from . import clients as cl
    from .measure import Runner
    from .report import figures, summarize, write
    from .upstream import Upstream

    cl.quiet()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    candidate: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if args.candidate:
        from .profile import CANDIDATES, applied

        by_name = {c.name: c for c in CANDIDATES}
        if args.candidate not in by_name:
            raise SystemExit(f"--with {args.candidate}: not one of {', '.join(by_name)}")
        candidate = applied(by_name[args.candidate])
        say(f"with {args.candidate} applied to the router's litellm calls: {by_name[args.candidate].doc}")
    with Upstream(cpu=upstream_cpu) as up, candidate:
        say(f"upstream on {up.url}")
        clients = cl.Clients(up.url)
        loop.run_until_complete(clients.astart())
        try:
            runner = Runner(loop, clients)
            variants = clients.variants()
            say("warm-up")
            runner.warm_up(list(variants.values()), plan.warmup)
            runner.fallback(1, max(5, plan.warmup // 10))
            res["gc"] = gc_info(freeze=not args.no_gc_freeze)
            runner.collect = not args.no_gc_freeze

            say(f"router's own work: {plan.router_only_calls} calls × 5 rounds with litellm's call stubbed")
            res["router_only"] = runner.router_only(5, plan.router_only_calls)

            say(f"per call: {plan.rounds} rounds × {plan.calls_per_round} calls × {len(variants)} variants")
            res["sequential"] = runner.rounds_sequential(list(variants.values()), plan.rounds, plan.calls_per_round)

            asyncs = [v for v in variants.values() if v.mode == "async"]
            say(f"throughput at concurrency {', '.join(map(str, plan.levels))}")
            res["concurrent"] = runner.rounds_concurrent(
                asyncs, plan.levels, plan.throughput_rounds, plan.throughput_calls, plan.waves
            )

            streamed = list(clients.stream_variants().values())
            say(f"streams: {plan.stream_rounds} rounds × {plan.stream_calls} answers × {len(streamed)} variants")
            for v in streamed:
                runner.sequential(v, max(5, plan.warmup // 4))
            res["streams"] = runner.rounds_sequential(streamed, plan.stream_rounds, plan.stream_calls)

            say(f"engines: import router + first call, RSS after 1,000 calls ({plan.engine_runs} fresh processes each)")
            res["engines"] = startup.engines(up.url, plan.engine_runs)

            say("fallback")
            res["fallback"] = runner.fallback(plan.fallback_rounds, plan.fallback_calls)

            reserve = 6.0 if args.quick else 10.0  # writing the report, the chart, closing down
            if args.leak_budget is None:
                leak_deadline = time.monotonic() + max(0.0, budget - (time.monotonic() - t_start) - reserve)
            elif args.leak_budget == 0:
                leak_deadline = float("inf")
            else:
                leak_deadline = time.monotonic() + args.leak_budget
            left = leak_deadline - time.monotonic()
            say(f"leak check: {' → '.join(f'{c:,}' for c in checkpoints)} calls"
                + (f" (budget {left:.0f} s)" if left != float("inf") else ""))
            res["leak"] = {**runner.leak(checkpoints, leak_deadline), "checkpoints": list(checkpoints)}
            settle_timeouts = runner.settle_timeouts
        finally:
            loop.run_until_complete(clients.aclose())
    loop.close()

    res["meta"] = {
        "quick": args.quick,
        "candidate": args.candidate,
        "started": started,
        "duration_s": time.monotonic() - t_start,
        "machine": machine(pinning),
        "params": {
            "rounds": plan.rounds, "calls_per_round": plan.calls_per_round, "warmup": plan.warmup,
            "throughput_rounds": plan.throughput_rounds, "throughput_calls": plan.throughput_calls,
            "waves": plan.waves, "router_only_calls": plan.router_only_calls,
            "levels": list(plan.levels), "fallback_rounds": plan.fallback_rounds,
            "fallback_calls": plan.fallback_calls, "leak_checkpoints": list(checkpoints),
            "startup_runs": plan.startup_runs, "budget_s": budget,
            "stream_rounds": plan.stream_rounds, "stream_calls": plan.stream_calls, "engine_runs": plan.engine_runs,
        },
        "settle_timeouts": settle_timeouts,
    }
    res["summary"] = summarize(res)
    figs = figures(res)
    paths = write(res, figs, args.out)
    res["meta"]["duration_s"] = time.monotonic() - t_start
    for f in figs:
        print(f.line())
    say("wrote " + ", ".join(str(p) for p in paths))
    failed = [f for f in figs if f.verdict.startswith("FAIL")]
    return 1 if failed and args.strict else 0
