"""What the usage ledger and a budget add to a call: the router with them off, side by side, in one run.

    .venv/bin/python -m bench.ledger [--quick] [--out bench/results]

Three routers on the bench config and upstream (another process, bench/upstream.py): `off` (no ledger),
`ledger` (a SQLite ledger in a temp dir, the default batched writer) and `ledger+budget` (the same plus a
monthly budget on the alias, large enough never to refuse: every request reserves and settles). Each round
runs every variant in a new order: N sequential `generate()` calls, N sequential `agenerate()` calls and N
`agenerate()` calls 50 at a time. The writer thread's CPU is in this process and is billed to the variant:
each CPU window ends after the ledger has flushed what the batch queued. Figures are medians over rounds of
per-round ratios to `off`. Writes LEDGER.md and ledger.json in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _router(text: str) -> Any:
    from prometheus_client import CollectorRegistry

    import router

    return router.Router(router.parse_config(text, "bench.yaml", env={}), registry=CollectorRegistry())


def _flush(r: Any) -> None:
    from router.plugins.ledger import ledger_of

    led = ledger_of(r._hooks.hooks)
    if led is not None:
        led.flush(30)
    for h in r._hooks.hooks:
        store = getattr(h, "store", None)
        if store is not None and hasattr(store, "flush"):
            store.flush()


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write the report."""
    p = argparse.ArgumentParser(prog="python -m bench.ledger")
    p.add_argument("--quick", action="store_true", help="few rounds: indicative only")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    rounds, n = (3, 50) if args.quick else (9, 200)

    from . import clients as cl
    from .upstream import Upstream

    cl.quiet()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    with Upstream() as up, tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        base = cl.config_text(up.url)
        ledger = f'ledger: {{path: "{Path(tmp) / "ledger.sqlite3"}"}}\n'
        budget = f'ledger: {{path: "{Path(tmp) / "budget.sqlite3"}"}}\nbudgets:\n'
        budget += "  - {name: bench, alias: direct, period: month, limit_usd: 1000000000}\n"
        routers = {"off": _router(base), "ledger": _router(base + ledger), "ledger+budget": _router(base + budget)}
        msgs = cl.MESSAGES

        def seq_sync(r: Any) -> list[float]:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                r.generate(messages=msgs, model="direct")
                out.append(time.perf_counter() - t)
            return out

        async def seq_async(r: Any) -> list[float]:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                await r.agenerate(messages=msgs, model="direct")
                out.append(time.perf_counter() - t)
            return out

        async def conc_async(r: Any) -> list[float]:
            sem = asyncio.Semaphore(50)
            out: list[float] = []

            async def one() -> None:
                async with sem:
                    t = time.perf_counter()
                    await r.agenerate(messages=msgs, model="direct")
                    out.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            return [time.perf_counter() - t0]  # the batch's wall time: throughput

        modes: dict[str, Callable[[Any], list[float]]] = {
            "generate (sequential)": seq_sync,
            "agenerate (sequential)": lambda r: loop.run_until_complete(seq_async(r)),
            "agenerate (50 concurrent)": lambda r: loop.run_until_complete(conc_async(r)),
        }
        for r in routers.values():  # warm-up: litellm's first calls, the databases' files and tables
            for run in modes.values():
                run(r)
            _flush(r)
        rng = random.Random(1)
        raw: dict[str, dict[str, list[tuple[float, float]]]] = {m: {k: [] for k in routers} for m in modes}
        for i in range(rounds):
            for mode, run in modes.items():
                order = list(routers)
                rng.shuffle(order)
                for key in order:
                    r = routers[key]
                    c0 = time.process_time()
                    lat = run(r)
                    _flush(r)  # the writer's work is part of the variant's CPU
                    cpu = (time.process_time() - c0) / n
                    raw[mode][key].append((_median(lat), cpu))
            print(f"round {i + 1}/{rounds} done", file=sys.stderr, flush=True)
        for r in routers.values():
            r.close()

    table = []
    for mode, per in raw.items():
        for key in routers:
            lat = [a / b[0] for (a, _), b in zip(per[key], per["off"], strict=True)]
            cpu = [a / b[1] for (_, a), b in zip(per[key], per["off"], strict=True)]
            table.append(
                {
                    "mode": mode,
                    "variant": key,
                    "latency_ms": _median([x[0] for x in per[key]]) * 1000,
                    "cpu_ms_per_call": _median([x[1] for x in per[key]]) * 1000,
                    "latency_ratio": _median(lat),
                    "cpu_ratio": _median(cpu),
                }
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ledger.json").write_text(json.dumps({"rounds": rounds, "calls": n, "rows": table}, indent=2))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# Ledger and budget overhead ({when}, {rounds} rounds × {n} calls{', quick' if args.quick else ''})",
        "",
        "Latency: median per call (for 50 concurrent: wall time of the batch). Ratios: median of per-round ratios",
        "to `off` in the same round. CPU includes the ledger's writer thread.",
        "",
        "| mode | variant | latency ms | × off | CPU ms/call | × off |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['mode']} | {row['variant']} | {row['latency_ms']:.2f} | {row['latency_ratio']:.3f} | "
            f"{row['cpu_ms_per_call']:.2f} | {row['cpu_ratio']:.3f} |"
        )
    (out / "LEDGER.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
