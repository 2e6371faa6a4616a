"""A real gunicorn master with its workers serving one of the examples/ apps on a loopback socket, for the
tests that run them (tests/test_multiprocess.py, tests/test_multiprocess_state.py); the parsing of what their
/metrics serve, and the steps those tests share.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY_A
from prometheus_client.parser import text_string_to_metric_families

from router.sandbox import Reply, Upstream

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).parent / "gunicorn"
WORKERS = 4
APPS = {
    "wsgi": ("examples.django_app:application", "sync"),
    "asgi": ("examples.fastapi_app:app", "uvicorn_worker.UvicornWorker"),
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Exposition text as {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def grew(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(ls) for (n, ls), _ in samples.items() if n == name]


class Gunicorn:
    """A real gunicorn master with `workers` workers (default WORKERS) serving one of the example apps on a
    loopback socket.

    `template` is the router config, formatted with `up` (the upstream's URL) and `more` (see write_config)."""

    def __init__(
        self, app: str, worker_class: str, workdir: Path, up: Upstream, template: str, workers: int = WORKERS
    ) -> None:
        self.app, self.worker_class, self.workdir, self.template = app, worker_class, workdir, template
        self.n_workers = workers
        self.mp_dir = workdir / "metrics"
        self.config = workdir / "router.yaml"
        self.write_config(up.url)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.set_inheritable(True)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.master_metrics_port = probe.getsockname()[1]
        probe.close()
        self.log = open(workdir / "gunicorn.log", "wb")  # noqa: SIM115  (closed in stop())
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, up_url: str, more: str = "") -> str:
        text = self.template.format(up=up_url, more=more)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)
        return hashlib.sha256(text.encode()).hexdigest()

    def start(self) -> None:
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(self.mp_dir),
            "LLM_ROUTER_CONFIG": str(self.config),
            "LLM_ROUTER_WATCH": "1",
            "LLM_ROUTER_METRICS_PORT": str(self.master_metrics_port),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "KEY_A": KEY_A,
        }
        fd = self.sock.fileno()
        self.proc = subprocess.Popen(
            [
                str(GUNICORN),
                "-c",
                "examples/gunicorn.conf.py",
                "--workers",
                str(self.n_workers),
                "--worker-class",
                self.worker_class,
                "--bind",
                f"fd://{fd}",
                "--timeout",
                "120",
                "--no-control-socket",
                self.app,
            ],
            cwd=ROOT,
            env=env,
            pass_fds=(fd,),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_workers()

    def workers(self) -> list[int]:
        assert self.proc is not None
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def wait_workers(self, old: frozenset[int] = frozenset(), timeout: float = 60) -> list[int]:
        """Wait for the workers, none in `old`, to have built their Router (their config is in the files)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited:\n{self.output()}")
            pids = self.workers()
            if (
                len(pids) == self.n_workers
                and not old & set(pids)
                and all((self.mp_dir / f"gauge_livemax_{p}.db").exists() for p in pids)
            ):
                return pids
            time.sleep(0.1)
        raise AssertionError(f"{self.n_workers} workers did not come up in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.workdir / "gunicorn.log").read_text(errors="replace")[-4000:]

    def generate(self, prompt: str, model: str = "chat") -> dict[str, Any]:
        body = json.dumps({"prompt": prompt, "model": model}).encode()
        req = urllib.request.Request(f"{self.url}/generate", body, {"Content-Type": "application/json"})
        return json.loads(self._get(req))  # type: ignore[no-any-return]

    def refused(self, prompt: str, model: str) -> dict[str, Any]:
        """A call the app answers 502: the router raised (the error's type and message)."""
        body = json.dumps({"prompt": prompt, "model": model}).encode()
        req = urllib.request.Request(f"{self.url}/generate", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=90)
        assert exc.value.code == 502
        return json.loads(exc.value.read())  # type: ignore[no-any-return]

    def scrape(self, url: str | None = None) -> Samples:
        return parse(self._get(urllib.request.Request(url or f"{self.url}/metrics")).decode())

    def _get(self, req: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(req, timeout=90) as resp:
                return resp.read()  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{req.full_url}: {exc.code} {exc.read()[:2000]!r}\n{self.output()}") from None

    def wait_metrics(self, ok: Callable[[Samples], bool], timeout: float = 20) -> Samples:
        deadline = time.monotonic() + timeout
        while True:
            samples = self.scrape()
            if ok(samples) or time.monotonic() > deadline:
                return samples
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        self.log.close()


def spread(server: Gunicorn, prompt: str, model: str, per_worker: int = 3, limit: int = 400) -> list[dict[str, Any]]:
    """Concurrent calls, in rounds, until every worker has answered at least `per_worker` of them."""
    answers: list[dict[str, Any]] = []
    with ThreadPoolExecutor(2 * WORKERS) as pool:
        while True:
            answers += pool.map(lambda i: server.generate(f"{prompt} {i}", model=model), range(2 * WORKERS))
            counts = Counter(a["worker"] for a in answers)
            if len(counts) == WORKERS and min(counts.values()) >= per_worker:
                assert set(counts) == set(server.workers())
                return answers
            assert len(answers) < limit, f"the calls did not reach every worker: {counts}"


def opened(samples: Samples, provider: str) -> float:
    """Circuit openings of `provider`, over all workers."""
    return value(samples, "llm_router_circuit_transitions_total", provider=provider, to="open")


def fail_until_open(server: Gunicorn, up: Upstream, route: str, model: str, provider: str) -> int:
    """Make `route` answer 503, then call `model` one call at a time until `provider`'s circuit opens in one
    worker (the first to see failure_threshold failures); the number of calls, each answered by a fallback."""
    up.set_default(route, Reply(status=503, error="overloaded"))
    for n in range(1, 200):
        assert server.generate(f"until open {n}", model=model)["provider"] != provider
        if opened(server.scrape(), provider):
            return n
    raise AssertionError(f"{provider}'s circuit never opened:\n{server.output()}")
