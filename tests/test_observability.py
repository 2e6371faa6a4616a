"""The SRE kit on real parts: the Grafana dashboard's every query, evaluated by a real Prometheus scraping a
Router's /metrics on loopback while it serves traffic over the sandbox; the alert rules loaded by it and unit
tested by promtool; and our exposition linted by `promtool check metrics`."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from router import Router, RouterError, RouterMetrics, start_metrics_server
from router.sandbox import Reply, Upstream

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "examples" / "grafana" / "llm-router.json"
ALERTS = ROOT / "examples" / "prometheus" / "alerts.yaml"
ALERTS_TEST = ROOT / "examples" / "prometheus" / "alerts_test.yaml"

# Grafana's variables, as a dashboard showing every job and alias over the last few seconds would expand them.
GRAFANA_VARS = {"$__rate_interval": "15s", "$__range": "1m", "$job": ".*", "$alias": ".*", "${datasource}": ""}

CONFIG = """
version: 1
defaults:
  model: chat
  timeout_s: 5
  deadline_s: 10
  retry: {attempts: 2, backoff_s: 0.01, max_backoff_s: 0.05}
  circuit: {failure_threshold: 2, failure_ratio: null, cooldown_s: 0.3}
providers:
  flaky: {kind: openai, api_base: "{UP}/flaky/v1", api_key: sk-obs-flaky-000000}
  fast:
    kind: openai
    api_base: "{UP}/fast/v1"
    api_key: [{name: team-a, key: sk-obs-team-a-000000}, {name: team-b, key: sk-obs-team-b-000000}]
  cut: {kind: openai, api_base: "{UP}/cut/v1", api_key: sk-obs-cut-000000}
  premium: {kind: openai, api_base: "{UP}/fast/v1", api_key: "${LLM_ROUTER_OBS_TEST_UNSET_KEY}"}
aliases:
  chat: {targets: [flaky/sim-large, fast/sim-large]}
  premium: {targets: [premium/sim-xl, fast/sim-small]}
  free: {targets: [fast/unpriced]}
  doomed: {targets: [flaky/sim-large]}
  story: {targets: [cut/sim-large]}
pricing:
  flaky/sim-large: {input_per_1m: 3.0, output_per_1m: 15.0}
  fast/sim-large: {input_per_1m: 2.5, output_per_1m: 10.0}
  fast/sim-small: {input_per_1m: 0.15, output_per_1m: 0.6}
  premium/sim-xl: {input_per_1m: 15.0, output_per_1m: 75.0}
  cut/sim-large: {input_per_1m: 1.0, output_per_1m: 4.0}
ledger: {path: "{LEDGER}", flush_interval_s: 0.2}
"""


def binary(name: str) -> str:
    """The path of a Debian-packaged binary; missing, the test fails in CI (it installs it) and skips locally."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; .ci/run installs it with apt-get install prometheus")
        pytest.skip(f"{name} is not installed (apt-get install prometheus); CI runs this test")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- a router serving traffic, and its /metrics ---------------------------------------------------------------


@dataclass
class Traffic:
    router: Router
    registry: CollectorRegistry
    metrics_url: str
    calls: int = 0
    unexpected: list[str] = field(default_factory=list)  # what broke the traffic, if anything did


def _drive(r: Router, config: Path, good: str, stop: threading.Event, t: Traffic) -> None:
    """Rounds of traffic until stopped."""
    while not stop.is_set():
        try:
            _round(r, config, good, t)
        except Exception as exc:  # a broken round must show in the test, not kill the traffic
            t.unexpected.append(repr(exc))
            time.sleep(0.1)


def _round(r: Router, config: Path, good: str, t: Traffic) -> None:
    """One round of every kind of call: fallbacks, skips, an open breaker, streams, cut streams, reloads."""
    r.generate("hi")  # flaky answers 503: retried, fallen back from, then its circuit opens and is skipped
    r.generate("hi", model="premium")  # premium's key is unset: skipped for no_credentials
    r.generate("hi", model="free")  # no price anywhere: cost unknown
    try:
        r.generate("hi", model="doomed")
    except RouterError:
        pass
    "".join(r.generate("tell me", stream=True, key="team-b"))
    try:
        "".join(r.generate("tell me", model="story", stream=True))
    except RouterError:  # cut after two chunks: StreamInterruptedError
        pass
    t.calls += 1
    if t.calls % 3 == 0:
        config.write_text("version: 1\nproviders: {}\n")
        r.reload()  # rejected, counted as an error
        config.write_text(good)
        r.reload()


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    with Upstream() as up:
        up.set_default("flaky", Reply(status=503, error="SIMULATED outage"))
        up.set_default("fast", Reply(usage=(12, 30)))
        up.set_default("cut", Reply(text="one two three four five six seven", cut_after=2))
        work = tmp_path_factory.mktemp("obs")
        good = CONFIG.replace("{UP}", up.url).replace("{LEDGER}", str(work / "ledger.sqlite3"))
        path = work / "router.yaml"
        path.write_text(good)
        registry = CollectorRegistry()
        r = Router.from_yaml(path, registry=registry)
        server, _ = start_metrics_server(port=0, registry=registry)
        t = Traffic(r, registry, f"127.0.0.1:{server.server_address[1]}")
        stop = threading.Event()
        worker = threading.Thread(target=_drive, args=(r, path, good, stop, t), daemon=True)
        worker.start()
        try:
            yield t
        finally:
            stop.set()
            worker.join(30)
            server.shutdown()
            r.close()


# -- a real Prometheus scraping it ----------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result


@pytest.fixture(scope="module")
def prometheus(traffic: Traffic, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    exe = binary("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {"job_name": "llm-router", "static_configs": [{"targets": [traffic.metrics_url]}]},
                ],
            }
        )
    )
    port = free_port()
    log = (work / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{(work / 'prometheus.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready in 20 s:\n{(work / 'prometheus.log').read_text()}")
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel, Grafana variables expanded."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def finite(result: list[dict[str, Any]]) -> bool:
    """Whether a query result holds at least one real number (histogram_quantile of no traffic is NaN)."""
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_every_dashboard_panel_shows_data(prometheus: Prometheus, traffic: Traffic) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    deadline = time.monotonic() + 40
    while True:
        empty = [(title, expr) for title, expr in queries if not finite(prometheus.query(expr))]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not traffic.unexpected
    assert not empty, f"after {traffic.calls} rounds of traffic, no data for:\n" + "\n".join(
        f"  {t}: {e}" for t, e in empty
    )
    # and it is our traffic: the scraped counters agree in kind with what the router did
    sources = {r["metric"]["reason"] for r in prometheus.query("llm_router_skipped_total")}
    assert {"no_credentials", "circuit_open"} <= sources
    assert prometheus.query('llm_router_circuit_state{provider="flaky"}')


def test_the_alert_rules_load_and_evaluate_on_real_metrics(prometheus: Prometheus, traffic: Traffic) -> None:
    deadline = time.monotonic() + 20
    while True:
        groups = prometheus.get("/api/v1/rules")["groups"]
        rules = [rule for g in groups for rule in g["rules"]]
        evaluated = all(
            rule.get("lastEvaluation", "").startswith("20") and rule["health"] != "unknown" for rule in rules
        )
        if (rules and evaluated) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = {rule["name"] for rule in rules}
    assert names == {rule["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for rule in g["rules"]}
    bad = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not bad
    # `doomed` never answers: the alias-down alert goes pending (it fires only after its `for:`)
    deadline = time.monotonic() + 30
    while True:
        alerts = prometheus.get("/api/v1/alerts")["alerts"]
        pending = {(a["labels"]["alertname"], a["labels"].get("alias")) for a in alerts}
        if ("LLMRouterAliasDown", "doomed") in pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ("LLMRouterAliasDown", "doomed") in pending, prometheus.query('llm_router_requests_total{alias="doomed"}')
    assert ("LLMRouterAliasDown", "chat") not in pending


def test_promtool_unit_tests_of_every_alert() -> None:
    promtool = binary("promtool")
    out = subprocess.run(
        [promtool, "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {
        t["alertname"] for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for t in case["alert_rule_test"]
    }
    alerts = {rule["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for rule in g["rules"]}
    assert tested == alerts  # every alert has its test
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_promtool_accepts_our_exposition(traffic: Traffic) -> None:
    promtool = binary("promtool")
    deadline = time.monotonic() + 30
    while traffic.calls < 3 and time.monotonic() < deadline:  # a reload and an open breaker: every metric shows
        time.sleep(0.2)
    text = generate_latest(traffic.registry)
    exposed = {m.decode() for m in re.findall(rb"^(llm_router_\w+)[{ ]", text, re.M)}
    assert set(re.findall(r"\bllm_router_[a-z_]+", DASHBOARD.read_text())) - {"llm_router_"} <= exposed  # all linted
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert out.returncode == 0, (out.stdout + out.stderr).decode()
    assert not out.stdout.strip() and not out.stderr.strip(), (out.stdout + out.stderr).decode()


# -- static checks, no binary needed --------------------------------------------------------------------------


def _metric_names_by_family() -> dict[str, set[str]]:
    """Each of our metric families with the sample names it exposes."""
    names: dict[str, set[str]] = {}
    for family in RouterMetrics(CollectorRegistry()).registry.collect():
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",),
        }[family.type]
        names[family.name] = {family.name + s for s in suffixes}
    return names


def test_dashboard_and_alerts_name_only_metrics_that_exist() -> None:
    known = set().union(*_metric_names_by_family().values())
    texts = {"dashboard": DASHBOARD.read_text(), "alerts": ALERTS.read_text()}
    for where, text in texts.items():
        used = set(re.findall(r"\bllm_router_[a-z_]+", text))
        assert used and used <= known, f"{where} uses unknown metrics: {sorted(used - known)}"


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "job", "alias"}
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and p["description"], p["title"]
        for t in p["targets"]:
            assert 'job=~"$job"' in t["expr"], (p["title"], t["expr"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
    # panels do not overlap
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine
