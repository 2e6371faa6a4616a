"""The gateway: what `llm-router serve` adds to a request, beside LiteLLM's own proxy, and `openai_client()`'s CPU.

``python -m bench.gateway [--quick] [--requests 3000] [--concurrency 50] [--litellm-proxy PATH]`` writes
bench/results/GATEWAY.md and gateway.json.

1. Added latency and throughput over HTTP. One loopback upstream (`bench.upstream`, another process) answers a
   fixed small completion. A load generator in this process (aiohttp, `concurrency` requests in flight) calls it
   directly (the floor), then through each server, in interleaved rounds: `llm-router serve` with 1 and with
   2 workers, and LiteLLM's proxy (`litellm --config ...`, 1 worker) when its command is found. Each server
   runs pinned to core 0, the load generator and the upstream to core 1, so a server has one core of its own
   (two workers share it: on a 2-core machine that is what they would get). Added latency is the server's
   p50 / p99 minus the direct one's; requests/s is what the load generator completed per second.
2. In process: CPU per call (`time.process_time`, every thread) of the OpenAI SDK on `router.openai_client()`
   against `Router.generate()` on the same router, and of `async_openai_client()` against `agenerate()`.

LiteLLM's proxy lives in its own virtualenv (`litellm[proxy]` pins many packages of its own): `make bench`
makes it in bench/.proxy-venv with the pinned litellm; elsewhere pass `--litellm-proxy PATH/TO/litellm`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from bench.upstream import Upstream

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROXY_VENV_BIN = ROOT / "bench" / ".proxy-venv" / "bin" / "litellm"
KEY = "gw-bench-key-0123456789abcdef"
BODY = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8}).encode()

ROUTER_CONFIG = """
version: 1
defaults: {{model: chat, timeout_s: 30, deadline_s: 60, retry: {{attempts: 1}}}}
providers:
  up: {{kind: openai, api_base: "{up}/a/v1", api_key: sk-bench}}
aliases:
  chat: {{targets: [up/bench-model]}}
pricing:
  up/bench-model: {{input_per_1m: 1, output_per_1m: 2}}
gateway:
  keys: [{{name: bench, key: "{key}"}}]
"""
PROXY_CONFIG = """
model_list:
  - model_name: chat
    litellm_params: {{model: openai/bench-model, api_base: "{up}/a/v1", api_key: sk-bench}}
general_settings: {{master_key: "{key}"}}
litellm_settings: {{telemetry: false}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))]


def pinned(cpu: int | None) -> Callable[[], None] | None:
    """A preexec_fn pinning the child to `cpu` (where the machine has it)."""
    if cpu is None or not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) <= cpu:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


@contextmanager
def server(name: str, cmd: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    """A server subprocess pinned to core 0, up once /health-ish answers; its base URL."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=pinned(0))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not listen within 180 s") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def load(url: str, n: int, concurrency: int, auth: bool) -> tuple[list[float], float, int]:
    """`n` chat requests, `concurrency` at a time: latencies (s), wall time (s), failures."""
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {KEY}"
    latencies: list[float] = []
    failures = 0
    todo = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failures
            for _ in todo:
                t0 = time.perf_counter()
                async with session.post(url, data=BODY, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        failures += 1
                        continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, wall, failures


def http_bench(args: argparse.Namespace, up: Upstream, work: Path) -> dict[str, Any]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cfg = work / "router.yaml"
    cfg.write_text(ROUTER_CONFIG.format(up=up.url, key=KEY))
    variants: dict[str, tuple[list[str], int] | None] = {}
    for workers in (1, 2):
        port = free_port()
        cmd = [str(Path(sys.executable).parent / "llm-router"), "serve", "-c", str(cfg), "--port", str(port)]
        variants[f"llm-router serve ({workers} worker{'s' if workers > 1 else ''})"] = (
            cmd + ["--workers", str(workers), "--no-access-log", "--log-level", "warning", "--no-watch"],
            port,
        )
    proxy = args.litellm_proxy or (str(PROXY_VENV_BIN) if PROXY_VENV_BIN.exists() else shutil.which("litellm"))
    proxy_note = None
    if proxy and Path(proxy).exists():
        pcfg = work / "proxy.yaml"
        pcfg.write_text(PROXY_CONFIG.format(up=up.url, key=KEY))
        port = free_port()
        variants["LiteLLM proxy (1 worker)"] = (
            [proxy, "--config", str(pcfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
            port,
        )
    else:
        proxy_note = "LiteLLM's proxy was not found: `make bench` installs it in bench/.proxy-venv"
    rows: dict[str, dict[str, Any]] = {}
    direct = f"{up.url}/a/v1/chat/completions"
    samples: dict[str, list[float]] = {"direct": []}
    walls: dict[str, list[float]] = {"direct": []}
    failures: dict[str, int] = {"direct": 0}
    with ExitStack() as stack:
        urls = {}
        for name, spec in variants.items():
            assert spec is not None
            cmd, port = spec
            base = stack.enter_context(server(name, cmd, env, port, work / f"{port}.log"))
            urls[name] = f"{base}/v1/chat/completions"
            samples[name], walls[name], failures[name] = [], [], 0
            asyncio.run(load(urls[name], max(50, args.concurrency * 2), args.concurrency, True))  # warm up
        asyncio.run(load(direct, 200, args.concurrency, False))
        order = ["direct", *urls]
        per_round = max(args.concurrency, args.requests // args.rounds)
        for rnd in range(args.rounds):
            for name in order[rnd % len(order) :] + order[: rnd % len(order)]:
                url = direct if name == "direct" else urls[name]
                lat, wall, failed = asyncio.run(load(url, per_round, args.concurrency, name != "direct"))
                samples[name] += lat
                walls[name].append(len(lat) / wall)
                failures[name] += failed
    floor50, floor99 = percentile(samples["direct"], 50), percentile(samples["direct"], 99)
    for name, lat in samples.items():
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        rows[name] = {
            "requests": len(lat),
            "failures": failures[name],
            "p50_ms": p50 * 1000,
            "p99_ms": p99 * 1000,
            "added_p50_ms": (p50 - floor50) * 1000,
            "added_p99_ms": (p99 - floor99) * 1000,
            "requests_per_s": statistics.median(walls[name]),
        }
    return {"rows": rows, "proxy": proxy, "proxy_note": proxy_note}


def cpu_bench(args: argparse.Namespace, up: Upstream) -> dict[str, Any]:
    """CPU per call: the OpenAI SDK on openai_client() vs generate(), async twins, interleaved rounds."""
    import gc

    from prometheus_client import CollectorRegistry

    import router
    from router import Router, parse_config

    text = ROUTER_CONFIG.format(up=up.url, key=KEY).split("gateway:")[0]
    r = Router(parse_config(text, "bench.yaml"), registry=CollectorRegistry())
    client = router.openai_client(r, max_retries=0)
    aclient = router.async_openai_client(r, max_retries=0)
    messages = [{"role": "user", "content": "ping"}]

    def sdk() -> None:
        client.chat.completions.create(model="chat", messages=messages, max_tokens=8)  # type: ignore[arg-type]

    def gen() -> None:
        r.generate(messages=messages, model="chat", max_tokens=8)

    async def asdk() -> None:
        await aclient.chat.completions.create(model="chat", messages=messages, max_tokens=8)  # type: ignore[arg-type]

    async def agen() -> None:
        await r.agenerate(messages=messages, model="chat", max_tokens=8)

    def run_sync(fn: Callable[[], None], n: int) -> float:
        t0 = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t0) / n

    def run_async(fn: Callable[[], Any], n: int) -> float:
        async def go() -> float:
            t0 = time.process_time()
            for _ in range(n):
                await fn()
            return (time.process_time() - t0) / n

        return asyncio.run(go())

    variants: dict[str, Callable[[int], float]] = {
        "generate()": lambda n: run_sync(gen, n),
        "openai_client()": lambda n: run_sync(sdk, n),
        "agenerate()": lambda n: run_async(agen, n),
        "async_openai_client()": lambda n: run_async(asdk, n),
    }
    for fn in variants.values():
        fn(max(20, args.cpu_calls // 10))  # warm up: imports, connection pools
    gc.collect()
    gc.freeze()
    per: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rnd in range(args.rounds):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            per[name].append(variants[name](args.cpu_calls))
    client.close()
    r.close()
    med = {k: statistics.median(v) * 1000 for k, v in per.items()}
    return {
        "cpu_ms_per_call": med,
        "sync_ratio": med["openai_client()"] / med["generate()"],
        "async_ratio": med["async_openai_client()"] / med["agenerate()"],
    }


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    http, cpu = res["http"], res["cpu"]
    lines = [
        "# The gateway: added latency, throughput, in-process CPU",
        "",
        f"`python -m bench.gateway{' --quick' if args.quick else ''}` on {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}; {args.requests} requests per variant at concurrency {args.concurrency}, "
        f"{args.rounds} interleaved rounds. Servers pinned to core 0; load generator and upstream to core 1.",
        "",
        "| variant | p50 ms | p99 ms | added p50 ms | added p99 ms | requests/s | failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in http["rows"].items():
        added = ("-", "-") if name == "direct" else (f"{row['added_p50_ms']:.2f}", f"{row['added_p99_ms']:.2f}")
        lines.append(
            f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {added[0]} | {added[1]} | "
            f"{row['requests_per_s']:.0f} | {row['failures']} |"
        )
    if http["proxy_note"]:
        lines += ["", http["proxy_note"]]
    lines += [
        "",
        "In process, CPU per call (all threads), median of rounds:",
        "",
        "| variant | CPU ms per call |",
        "|---|---|",
        *(f"| {k} | {v:.3f} |" for k, v in cpu["cpu_ms_per_call"].items()),
        "",
        f"`openai_client()` costs {cpu['sync_ratio']:.2f}× the CPU of `generate()`; "
        f"`async_openai_client()` {cpu['async_ratio']:.2f}× that of `agenerate()`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=6000, help="per variant, over all rounds")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cpu-calls", type=int, default=300, help="calls per variant per round, in process")
    ap.add_argument("--litellm-proxy", default=None, help="the `litellm` command of a litellm[proxy] install")
    ap.add_argument("--quick", action="store_true", help="a tiny run that only checks the bench works")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default: bench/results; --quick: nowhere)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.cpu_calls = 300, 2, 20
    with Upstream(cpu=1 if (os.cpu_count() or 1) > 1 else None) as up, tempfile.TemporaryDirectory() as tmp:
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {1})  # the load generator beside the upstream, off the servers' core
        res = {"http": http_bench(args, up, Path(tmp)), "cpu": cpu_bench(args, up)}
    text = report(res, args)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gateway.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "GATEWAY.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
