"""What the router costs before its first request: `import router`, loading a config, `llm-router validate`.

The import and the CLI are timed as fresh subprocesses (the wall time a user waits), best of N; the config
load in this process, since that is where an application pays it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import router

ROOT = Path(__file__).resolve().parent.parent


def config_with_aliases(n_aliases: int = 50, n_providers: int = 5) -> str:
    """A valid config with `n_aliases` aliases of three targets each, and a price for every target."""
    lines = [
        "version: 1",
        "defaults: {model: alias-0, timeout_s: 20, deadline_s: 60, retry: {attempts: 2, backoff_s: 0.2}}",
        "providers:",
    ]
    for p in range(n_providers):
        lines.append(f"  p{p}: {{kind: openai, api_base: 'http://127.0.0.1:9/p{p}/v1', api_key: sk-bench-{p:04d}}}")
    lines.append("aliases:")
    for a in range(n_aliases):
        targets = ", ".join(f"p{(a + k) % n_providers}/model-{a}-{k}" for k in range(3))
        lines.append(f"  alias-{a}: {{targets: [{targets}], params: {{temperature: 0.2, max_tokens: 256}}}}")
    lines.append("pricing:")
    for a in range(n_aliases):
        for k in range(3):
            price = f"{{input_per_1m: {k + 1}.0, output_per_1m: {k + 4}.0}}"
            lines.append(f"  p{(a + k) % n_providers}/model-{a}-{k}: {price}")
    return "\n".join(lines) + "\n"


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return took


def _best_of(cmd: list[str], n: int) -> dict[str, Any]:
    runs = [_wall(cmd) for _ in range(n)]
    return {"best_s": min(runs), "median_s": statistics.median(runs), "runs_s": runs}


def cli_path() -> str:
    """The venv's `llm-router` console script, next to this interpreter."""
    path = Path(sys.executable).parent / "llm-router"
    if not path.exists():
        raise RuntimeError(f"{path} not found: install the project into this venv (make install)")
    return str(path)


def measure(n: int) -> dict[str, Any]:
    """Wall times of the interpreter alone, `import router`, load_config of 50 aliases and `llm-router validate`."""
    out: dict[str, Any] = {}
    text = config_with_aliases(50)
    with tempfile.TemporaryDirectory(prefix="llm-router-bench-") as tmp:
        path = os.path.join(tmp, "bench50.yaml")
        Path(path).write_text(text)
        out["python_startup"] = _best_of([sys.executable, "-c", "pass"], n)
        out["import_router"] = _best_of([sys.executable, "-c", "import router"], n)
        out["validate"] = _best_of([cli_path(), "validate", path], n)
        runs = []
        for _ in range(max(5, 4 * n)):
            t = time.perf_counter()
            cfg = router.load_config(path, env={})
            runs.append(time.perf_counter() - t)
        assert len(cfg.aliases) == 50
        out["load_config_50"] = {"best_s": min(runs), "median_s": statistics.median(runs), "first_s": runs[0]}
    return out


# -- the engines side by side: a process on a direct-only config vs one on a LiteLLM config -------------------

ENGINE_CONFIG = """\
version: 1
defaults: {{model: m, timeout_s: 30, deadline_s: 120, retry: {{attempts: 1}}, engine: {engine}}}
providers:
  ok: {{kind: openai, api_base: "{url}/ok/v1", api_key: sk-bench-not-a-secret}}
aliases:
  m: {{targets: [ok/gpt-4o-mini]}}
"""

# Run in a fresh interpreter: the import, the first call (priced by the model map: no config price), then
# 1,000 more at concurrency 50, and the resident set size at each step. stdout: one JSON object.
ENGINE_SCRIPT = """
import asyncio, gc, json, os, sys, time
t0 = time.perf_counter()
import router
t1 = time.perf_counter()
from prometheus_client import CollectorRegistry
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
r = router.Router(router.parse_config(sys.argv[1], "bench.yaml", env={}), registry=CollectorRegistry())
first = r.generate("ping")
t2 = time.perf_counter()
assert first.cost_source == "litellm", first
rss_first = rss()
async def many(n, c):
    todo = iter(range(n))
    async def worker():
        for _ in todo:
            await r.agenerate("ping")
    await asyncio.gather(*(worker() for _ in range(c)))
asyncio.run(many(1000, 50))
gc.collect()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1, "import_and_first_s": t2 - t0,
                  "rss_first": rss_first, "rss_1000": rss(), "litellm_imported": "litellm" in sys.modules}))
"""


def engines(url: str, runs: int) -> dict[str, Any]:
    """`import router` + the first call, and RSS after 1,000 calls, in fresh processes: `direct` vs `litellm`.

    Interleaved, best of `runs` for the times; the RSS of the last run. Both configs price from LiteLLM's model
    map (the direct engine reads it as a file).
    """
    out: dict[str, Any] = {name: [] for name in ("direct", "litellm")}
    for _ in range(runs):
        for engine in ("direct", "litellm"):
            text = ENGINE_CONFIG.format(engine=engine, url=url)
            proc = subprocess.run(
                [sys.executable, "-c", ENGINE_SCRIPT, text], cwd=ROOT, capture_output=True, text=True, timeout=300
            )
            if proc.returncode != 0:
                raise RuntimeError(f"engine {engine}: exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
            out[engine].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary: dict[str, Any] = {}
    for engine, rows in out.items():
        summary[engine] = {
            "import_s": min(r["import_s"] for r in rows),
            "first_call_s": min(r["first_call_s"] for r in rows),
            "import_and_first_s": min(r["import_and_first_s"] for r in rows),
            "rss_first": rows[-1]["rss_first"],
            "rss_1000": rows[-1]["rss_1000"],
            "litellm_imported": any(r["litellm_imported"] for r in rows),
            "runs": rows,
        }
    return summary
