"""`llm-router check`: the live preflight, on the sandbox upstream (a dead key, an unknown model, a 503 provider, an
unreachable host, a keyless target), as a real subprocess and in process; and its pure parts as tables."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from router import parse_config
from router.check import (
    NOT_SENT,
    TargetCheck,
    facts,
    failing_aliases,
    key_source,
    plan_probes,
    price_source,
    render_table,
)
from router.cli import main
from router.config import ApiKey
from router.outcomes import FAILURE_OUTCOMES
from router.sandbox import Received, Reply, Upstream

ROOT = Path(__file__).resolve().parents[1]
GOOD_KEY = "sk-check-good-0123456789abcdef"
DEAD_KEY = "sk-check-dead-0123456789abcdef"
KEYS = {"CHECK_GOOD_KEY": GOOD_KEY, "CHECK_DEAD_KEY": DEAD_KEY}
UNSET = "CHECK_UNSET_KEY"

# chat works through its second target; broken has one target per way of failing, so it fails every call.
CONFIG = """
version: 1
defaults: {{timeout_s: 5}}
providers:
  dead: {{kind: openai, api_base: "{up}/dead/v1", api_key: "${{CHECK_DEAD_KEY}}"}}
  good: {{kind: openai, api_base: "{up}/good/v1", api_key: "${{CHECK_GOOD_KEY}}"}}
  nomodel: {{kind: openai, api_base: "{up}/nomodel/v1", api_key: "${{CHECK_GOOD_KEY}}"}}
  down: {{kind: openai, api_base: "{up}/down/v1", api_key: "${{CHECK_GOOD_KEY}}"}}
  gone: {{kind: openai, api_base: "http://127.0.0.1:{closed}/v1", api_key: "${{CHECK_GOOD_KEY}}"}}
  keyless: {{kind: openai, api_base: "{up}/keyless/v1", api_key: "${{{unset}}}"}}
aliases:
  chat: {{targets: [dead/sim-large, good/sim-large]}}
  broken: {{targets: [nomodel/no-such-model, down/sim-large, gone/sim-large, keyless/sim-large]}}
pricing:
  dead/sim-large: {{input_per_1m: 1.0, output_per_1m: 2.0}}
  good/sim-large: {{input_per_1m: 1.0, output_per_1m: 2.0}}
{extra}
"""


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening) for the whole test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def script(up: Upstream) -> None:
    up.set_default("dead", Reply(status=401, error=f"Incorrect API key provided: {DEAD_KEY}"))
    up.set_default("good", Reply(usage=(1, 1)))
    up.set_default("nomodel", Reply(status=404, error="The model `no-such-model` does not exist"))
    up.set_default("down", Reply(status=503, error="SIMULATED overload"))
    up.set_default("keyless", Reply(usage=(1, 1)))


def write_config(tmp_path: Path, up: Upstream, closed: int, extra: str = "") -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG.format(up=up.url, closed=closed, unset=UNSET, extra=textwrap.dedent(extra)))
    return path


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (UNSET, "LLM_ROUTER_DISABLED_PROVIDERS")}
    env.update(KEYS, LITELLM_LOCAL_MODEL_COST_MAP="True", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1")
    return env


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of an in-process check: the good and dead keys set, the keyless one not."""
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(UNSET, raising=False)
    monkeypatch.delenv("LLM_ROUTER_DISABLED_PROVIDERS", raising=False)


def check_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    code = main(["check", *args, "--format", "json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def by_target(report: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {t["target"]: t for t in report["targets"]}


# -- the command, as a real subprocess ---------------------------------------------------------------------------


def test_the_table_names_each_failure_and_the_alias_that_would_fail_every_call(
    tmp_path: Path, up: Upstream, closed_port: int
) -> None:
    script(up)
    path = write_config(tmp_path, up, closed_port)
    proc = subprocess.run(
        [sys.executable, "-m", "router.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert GOOD_KEY not in proc.stdout + proc.stderr and DEAD_KEY not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("llm-router check sends a real request to each target")
    assert "may bill" in proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if "/" in line.split(" ", 1)[0]}
    assert list(rows) == [
        "dead/sim-large",
        "good/sim-large",
        "nomodel/no-such-model",
        "down/sim-large",
        "gone/sim-large",
        "keyless/sim-large",
    ]
    assert "auth (401): Incorrect API key provided: ***" in rows["dead/sim-large"]
    assert "$CHECK_DEAD_KEY" in rows["dead/sim-large"]
    assert rows["good/sim-large"].rstrip().endswith(" ok")
    assert "not_found (404)" in rows["nomodel/no-such-model"]
    assert "server_error (503)" in rows["down/sim-large"]
    assert "connection" in rows["gone/sim-large"] and "(500)" not in rows["gone/sim-large"]
    assert f"${UNSET} not set" in rows["keyless/sim-large"] and "not sent: no key" in rows["keyless/sim-large"]
    assert "chat    ok: good/sim-large answered" in proc.stdout
    assert "broken  FAILS" in proc.stdout
    assert proc.stdout.rstrip().endswith("FAILED: 1 of 2 alias(es) would fail every call: broken")
    # the cheapest request, once per target sent; the keyless target is not sent anything
    for route in ("dead", "good", "nomodel", "down"):
        (request,) = up.requests(route)
        assert request.body["max_tokens"] == 1
        assert request.messages == [{"role": "user", "content": "hi"}]
    assert up.requests("dead")[0].headers["authorization"] == f"Bearer {DEAD_KEY}"
    assert up.requests("keyless") == []


# -- in process: JSON, exit codes, what is (not) sent ------------------------------------------------------------


def test_json_says_per_target_what_each_outcome_proves(
    tmp_path: Path, up: Upstream, closed_port: int, keys: None, capsys: pytest.CaptureFixture[str]
) -> None:
    script(up)
    path = write_config(tmp_path, up, closed_port)
    code, report, err = check_json(capsys, "-c", str(path))
    assert code == 1
    assert report["ok"] is False
    assert report["failing_aliases"] == ["broken"]
    assert report["aliases"] == {
        "chat": {"ok": True, "working_targets": ["good/sim-large"]},
        "broken": {"ok": False, "working_targets": []},
    }
    assert "would fail every call: broken" in err
    t = by_target(report)
    facts_of = {name: (r["outcome"], r["reachable"], r["authenticated"], r["model_found"]) for name, r in t.items()}
    assert facts_of == {
        "dead/sim-large": ("auth", True, False, None),
        "good/sim-large": ("ok", True, True, True),
        "nomodel/no-such-model": ("not_found", True, True, False),
        "down/sim-large": ("server_error", True, None, None),
        "gone/sim-large": ("connection", False, None, None),
        "keyless/sim-large": ("no_credentials", None, None, None),
    }
    assert [t[n]["status_code"] for n in t] == [401, None, 404, 503, None, None]
    assert t["good/sim-large"]["ok"] is True and t["good/sim-large"]["error"] is None
    assert t["good/sim-large"]["latency_s"] > 0 and t["keyless/sim-large"]["latency_s"] is None
    assert t["dead/sim-large"]["key_source"] == "$CHECK_DEAD_KEY"
    assert t["keyless/sim-large"]["key_source"] == f"${UNSET} not set"
    assert t["dead/sim-large"]["error"].endswith("Incorrect API key provided: ***")
    assert t["good/sim-large"]["aliases"] == ["chat"]
    assert DEAD_KEY not in json.dumps(report) and GOOD_KEY not in json.dumps(report)


def test_exit_0_when_every_alias_has_a_working_target_and_only_the_named_aliases_are_checked(
    tmp_path: Path, up: Upstream, closed_port: int, keys: None, capsys: pytest.CaptureFixture[str]
) -> None:
    script(up)
    path = write_config(tmp_path, up, closed_port)
    code, report, err = check_json(capsys, "-c", str(path), "chat")
    assert code == 0, err
    assert report["ok"] is True and report["failing_aliases"] == []
    assert list(report["aliases"]) == ["chat"]
    assert [t["target"] for t in report["targets"]] == ["dead/sim-large", "good/sim-large"]
    assert up.requests("nomodel") == [] and up.requests("down") == []  # broken was not named: nothing sent there
    assert "ok: each of the 1 alias(es) has a working target" in err

    assert main(["check", "-c", str(path), "chat"]) == 0
    assert "ok: each of the 1 alias(es) has a working target" in capsys.readouterr().out


def test_an_unknown_alias_is_a_command_line_error_and_sends_nothing(
    tmp_path: Path, up: Upstream, closed_port: int, keys: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, up, closed_port)
    assert main(["check", "-c", str(path), "chat", "chta"]) == 2
    err = capsys.readouterr().err
    assert "unknown alias 'chta'" in err and "aliases: chat, broken" in err
    assert up.history == []


def test_each_key_of_a_pool_is_checked_and_one_working_key_is_enough(
    tmp_path: Path, up: Upstream, keys: None, capsys: pytest.CaptureFixture[str]
) -> None:
    def by_key(r: Received) -> Reply:
        return Reply(status=401, error="bad key") if DEAD_KEY in r.headers["authorization"] else Reply(usage=(1, 1))

    up.set_default("pool", by_key)
    path = tmp_path / "pool.yaml"
    path.write_text(f"""
version: 1
providers:
  pool:
    kind: openai
    api_base: "{up.url}/pool/v1"
    api_key: [{{name: team-a, key: "${{CHECK_DEAD_KEY}}"}}, {{name: team-b, key: "${{CHECK_GOOD_KEY}}"}},
              {{name: team-c, key: "${{{UNSET}}}"}}]
aliases:
  pooled: {{targets: [pool/sim-small]}}
""")
    code, report, _ = check_json(capsys, "-c", str(path))
    assert code == 0
    rows = [(t["key"], t["key_source"], t["outcome"]) for t in report["targets"]]
    assert rows == [
        ("team-a", "$CHECK_DEAD_KEY", "auth"),
        ("team-b", "$CHECK_GOOD_KEY", "ok"),
        ("team-c", f"${UNSET} not set", "no_credentials"),
    ]
    assert sorted(r.headers["authorization"] for r in up.requests("pool")) == sorted(
        [f"Bearer {DEAD_KEY}", f"Bearer {GOOD_KEY}"]
    )


def test_a_provider_switched_off_is_not_sent_to(
    tmp_path: Path,
    up: Upstream,
    closed_port: int,
    keys: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script(up)
    path = write_config(tmp_path, up, closed_port)
    monkeypatch.setenv("LLM_ROUTER_DISABLED_PROVIDERS", "good")
    code, report, _ = check_json(capsys, "-c", str(path), "chat")
    assert code == 1  # chat's only working target is switched off: its calls would all fail
    assert by_target(report)["good/sim-large"]["outcome"] == "disabled"
    assert up.requests("good") == []


def test_each_request_is_bounded_by_the_timeout_and_at_most_parallel_go_at_once(
    tmp_path: Path, up: Upstream, closed_port: int, keys: None, capsys: pytest.CaptureFixture[str]
) -> None:
    up.set_default("slow", Reply(delay_s=0.4, usage=(1, 1)))
    up.set_default("hang", Reply(delay_s=5, usage=(1, 1)))
    path = tmp_path / "slow.yaml"
    path.write_text(f"""
version: 1
providers:
  slow: {{kind: openai, api_base: "{up.url}/slow/v1", api_key: "${{CHECK_GOOD_KEY}}"}}
  hang: {{kind: openai, api_base: "{up.url}/hang/v1", api_key: "${{CHECK_GOOD_KEY}}"}}
aliases:
  many: {{targets: [slow/m1, slow/m2, slow/m3, slow/m4]}}
  stuck: {{targets: [hang/m1]}}
""")
    started = time.monotonic()
    code, report, _ = check_json(capsys, "-c", str(path), "--parallel", "2", "--timeout", "1")
    took = time.monotonic() - started
    assert code == 1 and report["failing_aliases"] == ["stuck"]
    assert by_target(report)["hang/m1"]["outcome"] == "timeout"
    assert took < 4  # not the 5 s the hung provider takes
    arrived = sorted(r.time for r in up.requests("slow"))
    assert len(arrived) == 4
    # two at once: the third request waits for one of the first two to end (0.4 s later)
    assert arrived[2] - arrived[0] >= 0.3, arrived


def test_nothing_is_recorded_in_the_ledger_the_budgets_or_the_apps_metrics(
    tmp_path: Path, up: Upstream, closed_port: int, keys: None, capsys: pytest.CaptureFixture[str]
) -> None:
    script(up)
    ledger = tmp_path / "ledger.sqlite3"
    path = write_config(
        tmp_path,
        up,
        closed_port,
        extra=f"""
        ledger: {{path: "{ledger}", flush_interval_s: 0.05}}
        budgets:
          - {{name: daily, period: day, limit_usd: 0.000001}}
        """,
    )
    code, report, _ = check_json(capsys, "-c", str(path), "chat")
    assert code == 0  # a budget that would refuse every call does not stop the check: it sends as a call can't
    assert by_target(report)["good/sim-large"]["ok"]
    time.sleep(0.2)
    if ledger.exists():
        with sqlite3.connect(ledger) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            for table in tables:
                assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,), table
    exposition = generate_latest(REGISTRY).decode()
    assert 'provider="good"' not in exposition and 'provider="dead"' not in exposition


# -- the pure parts, as tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ("ok", (True, True, True)),
        ("connection", (False, None, None)),
        ("timeout", (None, None, None)),
        ("auth", (True, False, None)),
        ("payment_required", (True, True, None)),
        ("not_found", (True, True, False)),
        ("rate_limit", (True, None, None)),
        ("server_error", (True, None, None)),
        ("bad_request", (True, True, None)),
        ("other", (None, None, None)),
        ("no_credentials", (None, None, None)),
        ("disabled", (None, None, None)),
    ],
)
def test_facts(outcome: str, expected: tuple[bool | None, bool | None, bool | None]) -> None:
    assert facts(outcome) == expected


def test_every_failure_outcome_says_something_or_nothing_on_purpose() -> None:
    said = {o for o in FAILURE_OUTCOMES if facts(o) != (None, None, None)}
    assert set(FAILURE_OUTCOMES) - said == {"timeout", "other"}


PRICED = """
version: 1
providers: {p: {kind: openai, api_key: sk-literal-0123456789}}
aliases: {a: {targets: [p/gpt-4o-mini, p/sim-model]}}
pricing: {p/sim-model: {input_per_1m: 1, output_per_1m: 2}}
"""


@pytest.mark.parametrize(
    ("index", "provider_cost", "in_map", "expected"),
    [
        (1, None, False, "config"),
        (1, 0.5, True, "config"),  # the config's price wins over everything
        (0, 0.5, True, "provider"),
        (0, None, True, "litellm"),
        (0, None, False, "unknown"),
    ],
)
def test_price_source(index: int, provider_cost: float | None, in_map: bool, expected: str) -> None:
    target = parse_config(PRICED).targets("a")[index]
    assert price_source(target, provider_cost, in_map) == expected


def key(secret: str, env_vars: tuple[str, ...] = (), name: str | None = None) -> ApiKey:
    from pydantic import SecretStr

    return ApiKey.make(SecretStr(secret), name, env_vars)


@pytest.mark.parametrize(
    ("api_key", "env", "expected"),
    [
        (None, {}, "no key configured"),
        (key("sk-literal-0123456789"), {}, "in the config file"),
        (key(""), {}, "empty in the config file"),
        (key("sk-from-env-0123456789", ("OPENAI_API_KEY",)), {"OPENAI_API_KEY": "x"}, "$OPENAI_API_KEY"),
        (key("", ("OPENAI_API_KEY",)), {}, "$OPENAI_API_KEY not set"),
        (key("", ("A_KEY", "B_KEY")), {}, "$A_KEY or $B_KEY not set"),
        (key("sk-default-0123456789", ("OPENAI_API_KEY",)), {}, "the default of ${OPENAI_API_KEY:-...}"),
    ],
)
def test_key_source(api_key: ApiKey | None, env: dict[str, str], expected: str) -> None:
    shown = key_source(api_key, env)
    assert shown == expected
    assert "0123456789" not in shown


PROBED = """
version: 1
providers:
  a: {kind: openai, api_key: "${A_KEY}"}
  b: {kind: openai, api_key: "${B_KEY}"}
  spare: {kind: openai, api_key: "${A_KEY}", enabled: false}
  pool: {kind: openai, api_key: [{name: k1, key: "${A_KEY}"}, {name: k2, key: "${B_KEY}"}]}
  local: {kind: openai, api_base: "http://127.0.0.1:1/v1"}
aliases:
  one: {targets: [a/m, b/m]}
  two: {targets: [b/m, spare/m, pool/m, local/m]}
"""


def test_plan_probes_once_per_target_and_key_with_what_is_not_sent() -> None:
    cfg = parse_config(PROBED, env={"A_KEY": "sk-a-0123456789"})
    probes = plan_probes(cfg, ["one", "two"], disabled=frozenset())
    shown = [(p.target.key, p.key.name if p.key else None, p.aliases, p.skip) for p in probes]
    k1 = cfg.providers["pool"].api_keys()
    assert shown == [
        ("a/m", cfg.providers["a"].api_keys()[0].name, ("one",), None),
        ("b/m", cfg.providers["b"].api_keys()[0].name, ("one", "two"), "no_credentials"),  # shared: probed once
        ("spare/m", cfg.providers["spare"].api_keys()[0].name, ("two",), "disabled"),
        ("pool/m", k1[0].name, ("two",), None),
        ("pool/m", k1[1].name, ("two",), "no_credentials"),  # one key of a pool unset
        ("local/m", None, ("two",), None),  # a server that needs no key
    ]
    switched_off = plan_probes(cfg, ["one"], disabled=frozenset({"a"}))
    assert [p.skip for p in switched_off] == ["disabled", "no_credentials"]


def row(target: str, outcome: str, *aliases: str) -> TargetCheck:
    r, a, m = facts(outcome)
    return TargetCheck(target, None, "$K", aliases, outcome, r, a, m, "config")


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        ([], ["x", "y"]),
        ([row("p/m", "ok", "x")], ["y"]),
        ([row("p/m", "auth", "x", "y"), row("q/m", "ok", "y")], ["x"]),
        ([row("p/m", "ok", "x", "y")], []),
        ([row("p/m", "no_credentials", "x"), row("q/m", "disabled", "y")], ["x", "y"]),
    ],
)
def test_failing_aliases(checks: list[TargetCheck], expected: list[str]) -> None:
    assert failing_aliases(["x", "y"], checks) == expected


def test_the_table_keeps_one_line_per_target_and_says_what_was_not_sent() -> None:
    long = TargetCheck(
        "p/m",
        None,
        "$K",
        ("x",),
        "server_error",
        True,
        None,
        None,
        "unknown",
        0.01,
        503,
        "InternalServerError: litellm.InternalServerError: OpenAIException - " + "overloaded\n" * 40,
    )
    keyless = row("q/m", "no_credentials", "x")
    table = render_table([long, keyless], ["x"])
    lines = table.splitlines()
    assert len(lines) == 1 + 2 + 1 + 1 + 1 + 1  # head, two targets, blank, alias, blank, verdict
    assert "server_error (503): overloaded overloaded" in lines[1] and lines[1].endswith("...")
    assert "litellm.InternalServerError" not in lines[1]
    assert NOT_SENT["no_credentials"] in lines[2]
    assert lines[2].split()[2:5] == ["-", "-", "-"]
