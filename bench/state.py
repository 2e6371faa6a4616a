"""`python -m bench.state [--quick]`: what a shared health-state store (`state:`) adds to a call.

The same Router config on three stores, side by side in one run: `memory` (the default), `sqlite` (a WAL file
in a temp dir) and `redis` (a real redis-server on loopback, started here). Sync and async calls, interleaved
rounds in a new order each time, against bench.upstream in its own process. Figures: added client CPU per
call (median over rounds of each round's ratio to memory; the sync thread's CPU is in it, as
`time.process_time` counts every thread) and added p50 latency per call (median over rounds of each round's
difference to memory). Targets: under 5% CPU, 0.3 ms p50.
Writes state.json and STATE.md beside the main run's results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

RESULTS = Path(__file__).resolve().parent / "results"
STORES = ("memory", "sqlite", "redis")
CPU_TARGET = 0.05  # added CPU per call, as a fraction of memory's
P50_TARGET_S = 0.0003  # added p50 per call


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.state", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (indicative only)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = ap.parse_args(argv)
    rounds, calls, warmup = (3, 60, 30) if args.quick else (9, 200, 100)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/redis_server.py

    from prometheus_client import CollectorRegistry

    import router
    from tests.redis_server import RedisServer

    from . import clients as cl
    from .measure import Runner, percentile
    from .report import Figure
    from .run import gc_info, machine, pin
    from .upstream import Upstream

    t_start = time.monotonic()
    upstream_cpu, pinning = pin()
    cl.quiet()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    tmp = Path(tempfile.mkdtemp(prefix="llm-router-bench-state-"))
    with Upstream(cpu=upstream_cpu) as up, RedisServer() as redis_server:
        if upstream_cpu is not None and redis_server.proc is not None:
            os.sched_setaffinity(redis_server.proc.pid, {upstream_cpu})  # off the client's core, like the upstream
        sections = {
            "memory": "state: {backend: memory}\n",
            "sqlite": f'state: {{backend: sqlite, path: "{tmp / "state.db"}"}}\n',
            "redis": f'state: {{backend: redis, url: "{redis_server.url}"}}\n',
        }
        routers = {
            s: router.Router(
                router.parse_config(cl.config_text(up.url) + sections[s], f"bench-{s}.yaml"),
                registry=CollectorRegistry(),
            )
            for s in STORES
        }
        variants = []
        for s, r in routers.items():

            def sync_call(r: router.Router = r) -> Any:
                return r.generate(messages=cl.MESSAGES, model="direct")

            def async_call(r: router.Router = r) -> Any:
                return r.agenerate(messages=cl.MESSAGES, model="direct")

            variants.append(cl.Variant(f"{s}_sync", f"{s} generate", "sync", "", sync_call))
            variants.append(cl.Variant(f"{s}_async", f"{s} agenerate", "async", "", async_call))
        runner = Runner(loop, None)  # type: ignore[arg-type]  # sequential rounds only: no Clients needed
        print(f"bench.state: warm-up, then {rounds} rounds × {calls} calls × {len(variants)} variants", file=sys.stderr)
        for v in variants:
            runner.sequential(v, warmup)
        gc_info(freeze=True)
        seq = runner.rounds_sequential(variants, rounds, calls)
        synced = {s: (r._state.syncs if r._state is not None else None) for s, r in routers.items()}
        for r in routers.values():
            r.close()
    loop.close()

    res: dict[str, Any] = {"variants": {}, "synced": synced}
    figs: list[Figure] = []
    for mode in ("sync", "async"):
        base = seq[f"memory_{mode}"]
        base_p50 = percentile(base["lat_s"], 50)
        for s in STORES:
            v = seq[f"{s}_{mode}"]
            cpu = statistics.median(v["cpu_s"])
            p50 = percentile(v["lat_s"], 50)
            res["variants"][f"{s}_{mode}"] = {"cpu_s": cpu, "p50_s": p50, "p99_s": percentile(v["lat_s"], 99)}
            if s == "memory":
                continue
            added = statistics.median(x / y for x, y in zip(v["cpu_s"], base["cpu_s"], strict=True)) - 1
            # p50 of each round's calls, paired with memory's in the same round: drift hits both alike
            p50_added = statistics.median(
                percentile(v["lat_s"][i * calls : (i + 1) * calls], 50)
                - percentile(base["lat_s"][i * calls : (i + 1) * calls], 50)
                for i in range(rounds)
            )
            figs.append(
                Figure(
                    f"state_cpu_{s}_{mode}",
                    f"state {s}: added client CPU per call ({mode})",
                    f"{added:+.1%} over memory",
                    f"{cpu * 1e3:.3f} ms vs {statistics.median(base['cpu_s']) * 1e3:.3f} ms",
                    f"< {CPU_TARGET:.0%}",
                    "PASS" if added < CPU_TARGET else "FAIL",
                    added,
                )
            )
            figs.append(
                Figure(
                    f"state_p50_{s}_{mode}",
                    f"state {s}: added p50 per call ({mode})",
                    "",
                    f"{p50_added * 1e3:+.3f} ms (p50 {p50 * 1e3:.3f} vs {base_p50 * 1e3:.3f} ms)",
                    f"< {P50_TARGET_S * 1e3:.1f} ms",
                    "PASS" if p50_added < P50_TARGET_S else "FAIL",
                    p50_added,
                )
            )
    res["figures"] = [f.__dict__ for f in figs]
    res["meta"] = {
        "quick": args.quick,
        "rounds": rounds,
        "calls_per_round": calls,
        "duration_s": time.monotonic() - t_start,
        "machine": machine(pinning),
        "load_average": os.getloadavg(),  # other work on the machine: latency figures mean little when high
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "state.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Shared health state: what `state:` adds to a call",
        "",
        f"{rounds} interleaved rounds × {calls} sequential calls per variant against the loopback upstream; "
        f"{'quick run, indicative only; ' if args.quick else ''}{res['meta']['machine']['cpu_model']}, "
        f"{pinning}; load average at the end {res['meta']['load_average'][0]:.1f} "
        f"on {res['meta']['machine']['cores']} cores.",
        "",
        "| store | mode | CPU per call | p50 | p99 |",
        "|---|---|---|---|---|",
    ]
    for key, v in res["variants"].items():
        s, mode = key.split("_")
        lines.append(
            f"| {s} | {mode} | {v['cpu_s'] * 1e3:.3f} ms | {v['p50_s'] * 1e3:.3f} ms | {v['p99_s'] * 1e3:.3f} ms |"
        )
    lines += ["", "| figure | value | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {f.name} | {f.ratio or f.absolute} | {f.target} | {f.verdict} |" for f in figs]
    (args.out / "STATE.md").write_text("\n".join(lines) + "\n")
    for f in figs:
        print(f.line())
    print(f"bench.state: wrote {args.out / 'STATE.md'} and state.json", file=sys.stderr)
    return 1 if args.strict and any(f.verdict == "FAIL" for f in figs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
