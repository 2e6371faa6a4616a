"""What the router costs before its first request: `import router`, loading a config, `llm-router validate`.

The import and the CLI are timed as fresh subprocesses (the wall time a user waits), best of N; the config
load in this process, since that is where an application pays it.
"""

from __future__ import annotations

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
