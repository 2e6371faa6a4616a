"""For the gateway's tests: `llm-router serve` as a real subprocess on a free loopback port, the gateway keys
the tests use, and OpenAI SSE frames to script slow or tool-calling upstream streams.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import standard_env

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "llm-router"

# Client keys of the gateway (what services send as "Authorization: Bearer ...").
GW_SEARCH = "gw-search-5b1f0c7d9e2a4c6b8d0f"
GW_BILLING = "gw-billing-8c2e4a6f0b1d3e5a7c9f"
GATEWAY_KEYS = """
gateway:
  keys:
    - {name: search, key: "${GW_SEARCH}", tags: {team: search}}
    - {name: billing, key: "${GW_BILLING}", tags: {team: billing}, aliases: [single]}
"""


def gateway_env() -> dict[str, str]:
    """The env of the standard config plus the gateway's keys."""
    return {**standard_env(), "GW_SEARCH": GW_SEARCH, "GW_BILLING": GW_BILLING}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sse_frames(*deltas: str, finish: str = "stop", model: str = "model-a") -> list[bytes]:
    """An OpenAI chat stream of these text deltas, a finish reason, usage and [DONE]: one SSE event per item."""

    def event(choices: list[dict[str, Any]], **more: Any) -> bytes:
        body = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": choices}
        return f"data: {json.dumps({**body, **more})}\n\n".encode()

    frames = [
        event([{"index": 0, "delta": {"role": "assistant", "content": d} if i == 0 else {"content": d}}])
        for i, d in enumerate(deltas)
    ]
    frames.append(event([{"index": 0, "delta": {}, "finish_reason": finish}]))
    frames.append(
        event([], usage={"prompt_tokens": 5, "completion_tokens": len(deltas), "total_tokens": 5 + len(deltas)})
    )
    return [*frames, b"data: [DONE]\n\n"]


class Serve:
    """`llm-router serve` in a subprocess on a free loopback port, with its output in a log file."""

    def __init__(self, config: Path, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"serve-{self.port}.log"
        self.args = ["--port", str(self.port), *args]
        self.env = {**os.environ, **gateway_env(), "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Serve:
        log = open(self.log_path, "wb")  # noqa: SIM115  (the child holds it; closed with the process)
        self.proc = subprocess.Popen(
            [str(CLI), "serve", "-c", str(self.config), *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"llm-router serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"llm-router serve did not come up in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
