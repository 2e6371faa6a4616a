"""`llm-router serve --workers 4`: gunicorn supervising four uvicorn workers on one socket. /metrics, whichever
worker answers it, sums every worker's; the `state:` section shares a failing provider's open circuit between
them; SIGHUP to the master reloads the config in every worker, in place.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gateway_server import GATEWAY_KEYS, GW_SEARCH, Serve, sse_frames
from prometheus_client.parser import text_string_to_metric_families

from router.sandbox import Reply, Upstream

WORKERS = 4
CONFIG = """
version: 1
defaults: {{model: chat, timeout_s: 10, deadline_s: 30, retry: {{attempts: 1}}}}
providers:
  a: {{kind: openai, api_base: "{up}/w-a/v1", api_key: "${{KEY_A}}"}}
  down:
    kind: openai
    api_base: "{up}/w-down/v1"
    api_key: "${{KEY_A}}"
    circuit: {{failure_threshold: 2, failure_ratio: null, cooldown_s: 600}}
aliases:
  chat: {{targets: [a/model-a]}}
  fallback: {{targets: [down/model-d, a/model-a]}}
  single: {{targets: [a/model-a]}}
{more}
state: {{backend: sqlite, path: "{state}", sync_s: 0.1}}
"""


def write(path: Path, up: Upstream, more: str = "") -> str:
    text = CONFIG.format(up=up.url, state=path.parent / "state.sqlite3", more=more) + GATEWAY_KEYS
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def config(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("workers") / "router.yaml"
    write(path, upstream)
    return path


@pytest.fixture(scope="module")
def server(config: Path) -> Iterator[Serve]:
    s = Serve(config, config.parent, "--workers", str(WORKERS), "--no-watch", "--no-access-log").start()
    yield s
    s.stop()


def scrape(server: Serve) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    # A new connection each time, so that any worker may answer.
    text = httpx.get(f"{server.url}/metrics", headers={"connection": "close"}).text
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def calls(server: Serve, n: int, model: str = "chat") -> list[Any]:
    def one(i: int) -> Any:
        # a client (and connection) per call: the calls spread over the workers
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=GW_SEARCH, max_retries=0) as client:
            return client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"call {i}"}])

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def test_metrics_are_every_workers(server: Serve, up: Upstream) -> None:
    up.set_default("w-a", Reply(text="ok"))

    answers = calls(server, 40)

    assert all(a.choices[0].message.content == "ok" for a in answers)
    for _ in range(6):  # whichever worker answers the scrape, it serves the sum over all four
        samples = scrape(server)
        assert value(samples, "llm_router_worker_processes") == WORKERS
        assert value(samples, "llm_router_requests_total", alias="chat", outcome="success") == 40
        assert value(samples, "llm_router_gateway_responses_total", route="chat", status="200") == 40
        assert value(samples, "llm_router_in_flight", alias="chat") == 0


def test_an_open_circuit_is_shared_by_every_worker(server: Serve, up: Upstream) -> None:
    up.set_default("w-a", Reply(text="from a"))
    up.set_default("w-down", Reply(status=503, error="down"))

    deadline = time.monotonic() + 60
    while not value(scrape(server), "llm_router_circuit_transitions_total", provider="down", to="open"):
        assert time.monotonic() < deadline, server.output()
        assert calls(server, 1, "fallback")[0].choices[0].message.content == "from a"
    time.sleep(1.0)  # every worker syncs the shared state (sync_s: 0.1)
    sent = len(up.requests("w-down"))

    answers = calls(server, 24, "fallback")

    assert all(a.choices[0].message.content == "from a" for a in answers)
    assert len(up.requests("w-down")) == sent  # no worker sent down another request: they share the open circuit
    assert value(scrape(server), "llm_router_skipped_total", provider="down", reason="circuit_open") >= 24


def test_sighup_reloads_every_worker(server: Serve, config: Path, up: Upstream) -> None:
    before = value(scrape(server), "llm_router_config_reloads_total", result="success")
    new = write(config, up, more="  added: {targets: [a/model-a]}")

    server.signal(signal.SIGHUP)

    deadline = time.monotonic() + 20
    while value(scrape(server), "llm_router_config_reloads_total", result="success") - before < WORKERS:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)
    samples = scrape(server)
    shas = {dict(ls)["sha256"] for (n, ls), v in samples.items() if n == "llm_router_config_info" and v == 1}
    assert shas == {new}
    assert value(samples, "llm_router_worker_processes") == WORKERS  # reloaded in place: no worker replaced
    up.set_default("w-a", Reply(text="added"))
    assert {a.choices[0].message.content for a in calls(server, 8, "added")} == {"added"}


def test_sigterm_lets_streams_in_flight_finish(server: Serve, up: Upstream) -> None:
    words = [f"w{i} " for i in range(12)]
    up.enqueue("w-a", Reply(raw_stream=sse_frames(*words), chunk_delays=[0, *([0.1] * 13)]))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=GW_SEARCH, max_retries=0)
    stream = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
    got = [next(stream).choices[0].delta.content or ""]

    server.signal(signal.SIGTERM)  # to the master: every worker stops taking connections, and finishes its answers

    got += [c.choices[0].delta.content or "" for c in stream]
    assert "".join(got) == "".join(words)
    assert server.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz")
