"""Tests of the `llm-router` command, run as a real subprocess (validate, explain, schema, generate)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from router.sandbox import Reply, Upstream

ROOT = Path(__file__).resolve().parents[1]
ROUTER_YAML = ROOT / "config" / "router.yaml"
SANDBOX_YAML = ROOT / "config" / "sandbox.yaml"
# Recognisable fake keys: they must never show up in anything the command prints.
FAKE_OPENAI_KEY = "sk-fake-openai-7f3a9c1e5b"
FAKE_SANDBOX_KEY = "sk-fake-sandbox-4d2b8e6a0c"
KEY_VARS = ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "ANTHROPIC_API_KEY", "SANDBOX_PREMIUM_KEY", "LLM_ROUTER_CONFIG")
PROBLEM_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<key>[^:\s]+): (?P<message>.+)$")


def cli_env(**extra: str) -> dict[str, str]:
    """The process environment without any provider key or router setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env() if env is None else env,
        cwd=cwd,
        timeout=120,
    )


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def assert_clean(proc: subprocess.CompletedProcess[str], *secrets: str) -> None:
    """No traceback and no secret anywhere in the output."""
    assert "Traceback" not in proc.stderr
    for secret in secrets:
        assert secret not in proc.stdout + proc.stderr


# --- validate ---------------------------------------------------------------------------------------------


def test_validate_example_configs() -> None:
    proc = run("validate", str(ROUTER_YAML), str(SANDBOX_YAML))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"{ROUTER_YAML}: ok")
    assert proc.stdout.splitlines()[1].startswith(f"{SANDBOX_YAML}: ok")
    assert_clean(proc)


def test_console_script_validates() -> None:
    script = shutil.which("llm-router", path=os.path.dirname(sys.executable))
    assert script is not None, "the llm-router console script is not installed next to this python"
    proc = subprocess.run(
        [script, "validate", str(SANDBOX_YAML)], capture_output=True, text=True, env=cli_env(), timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{SANDBOX_YAML}: ok")


def test_validate_bad_file_reports_one_problem_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", """
        version: 1
        providers:
          openai: {kind: openai, timout_s: 5}
        aliases:
          chat:
            tragets: [openai/gpt-4o]
            targets: [openai/gpt-4o]
    """)
    text = path.read_text()
    proc = run("validate", str(path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert_clean(proc)
    lines = proc.stderr.splitlines()
    parsed = [PROBLEM_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert {(m["file"], int(m["line"]), m["key"]) for m in parsed if m} == {
        (str(path), line_of(text, "timout_s"), "providers.openai.timout_s"),
        (str(path), line_of(text, "tragets"), "aliases.chat.tragets"),
    }


def test_validate_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    proc = run("validate", str(path))
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"{path}: ")
    assert "not found" in line
    assert_clean(proc)


def test_validate_malformed_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.yaml", """
        version: 1
        providers: {openai: {kind: openai}
        aliases: {}
    """)
    proc = run("validate", str(path))
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    match = re.match(rf"^{re.escape(str(path))}:(\d+): invalid YAML: ", line)
    assert match, line
    assert 1 <= int(match.group(1)) <= len(path.read_text().splitlines()) + 1
    assert_clean(proc)


def test_validate_several_files_reports_each(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "version: 2\nproviders: {p: {kind: openai}}\naliases: {a: {targets: [p/m]}}\n")
    proc = run("validate", str(bad), str(SANDBOX_YAML))
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{SANDBOX_YAML}: ok")
    assert f"{bad}:1: version: " in proc.stderr
    assert_clean(proc)


def test_validate_notes_unset_key_vars() -> None:
    proc = run("validate", str(ROUTER_YAML), env=cli_env(OPENAI_API_KEY=FAKE_OPENAI_KEY))
    assert proc.returncode == 0
    notes = [line for line in proc.stderr.splitlines() if ": note: " in line]
    assert any("OPENROUTER_API_KEY" in n for n in notes)
    assert any("ANTHROPIC_API_KEY" in n for n in notes)
    assert not any("OPENAI_API_KEY" in n for n in notes)
    assert all(n.startswith(f"{ROUTER_YAML}: note: ") for n in notes)
    assert_clean(proc, FAKE_OPENAI_KEY)


def test_validate_does_not_import_litellm() -> None:
    code = (
        "import sys, router.cli; "
        f"rc = router.cli.main(['validate', {str(ROUTER_YAML)!r}]); "
        "assert 'litellm' not in sys.modules, 'litellm imported'; "
        "sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


DEAD_CONFIG = """
    version: 1
    providers:
      openai: {kind: openai, api_key: "${OPENAI_API_KEY}"}
      anthropic: {kind: anthropic, api_key: "${ANTHROPIC_API_KEY}"}
      local: {kind: openai, api_base: "http://127.0.0.1:8000/v1", enabled: false}
      spare: {kind: openai, api_key: literal-spare-key}
    aliases:
      chat: {targets: [openai/gpt-4o, anthropic/claude-3-5-sonnet-20241022]}
      local: {targets: [local/llama3]}
      spare: {targets: [openai/gpt-4o-mini, spare/gpt-4o-mini]}
"""


def warnings_of(proc: subprocess.CompletedProcess[str], path: Path) -> list[str]:
    prefix = f"{path}: warning: "
    return [line.removeprefix(prefix) for line in proc.stderr.splitlines() if line.startswith(prefix)]


def test_validate_names_the_aliases_that_would_fail_every_call_and_why_but_exits_0(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", DEAD_CONFIG)
    proc = run("validate", str(path))
    assert proc.returncode == 0, proc.stderr  # keys may arrive at deploy time
    assert proc.stdout.startswith(f"{path}: ok (4 providers, 3 aliases, 5 targets)")
    assert warnings_of(proc, path) == [
        "alias 'chat' cannot answer: every target is skipped: openai/gpt-4o (MISSING: set OPENAI_API_KEY), "
        "anthropic/claude-3-5-sonnet-20241022 (MISSING: set ANTHROPIC_API_KEY)",
        "alias 'local' cannot answer: every target is skipped: local/llama3 (disabled in the config (enabled: false))",
        "2 of 3 aliases would fail every call; validate --strict exits 1 on this",
    ]
    assert_clean(proc, "literal-spare-key")


def test_validate_strict_exits_1_when_an_alias_cannot_answer(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", DEAD_CONFIG)
    proc = run("validate", "--strict", str(path))
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{path}: ok")
    assert warnings_of(proc, path)[-1] == "2 of 3 aliases would fail every call (--strict)"
    assert_clean(proc, "literal-spare-key")


def test_validate_strict_passes_once_the_keys_are_set_and_counts_disabled_by_env(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", DEAD_CONFIG.replace("enabled: false", "enabled: true"))
    keys = {"OPENAI_API_KEY": FAKE_OPENAI_KEY, "ANTHROPIC_API_KEY": FAKE_SANDBOX_KEY}
    proc = run("validate", "--strict", str(path), env=cli_env(**keys))
    assert proc.returncode == 0, proc.stderr
    assert warnings_of(proc, path) == []
    assert_clean(proc, *keys.values())
    # the emergency switch an operator flips: those providers' targets are skipped too
    proc = run("validate", "--strict", str(path), env=cli_env(**keys, LLM_ROUTER_DISABLED_PROVIDERS="openai,local"))
    assert proc.returncode == 1
    assert warnings_of(proc, path) == [  # chat keeps anthropic, spare its own provider
        "alias 'local' cannot answer: every target is skipped: local/llama3 "
        "(disabled by LLM_ROUTER_DISABLED_PROVIDERS)",
        "1 of 3 aliases would fail every call (--strict)",
    ]
    assert_clean(proc, *keys.values())


def test_validate_strict_on_the_sandbox_config_passes() -> None:
    # its premium provider has no key, but slow/sim-large can still answer for that alias
    proc = run("validate", "--strict", str(SANDBOX_YAML))
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr


# --- explain ----------------------------------------------------------------------------------------------


def example_targets() -> dict[str, list[str]]:
    """Each alias of config/router.yaml with its target keys in order, read from the YAML itself."""
    data = yaml.safe_load(ROUTER_YAML.read_text())
    return {
        alias: [t if isinstance(t, str) else f"{t['provider']}/{t['model']}" for t in spec["targets"]]
        for alias, spec in data["aliases"].items()
    }


def test_explain_lists_targets_in_order_with_credentials_and_prices() -> None:
    proc = run("explain", str(ROUTER_YAML), env=cli_env(OPENAI_API_KEY=FAKE_OPENAI_KEY))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for alias, keys in example_targets().items():
        assert re.search(rf"^{alias}\b", out, re.M), alias
        positions = [out.index(f". {key}  ", out.index(f"\n{alias}")) for key in keys]
        assert positions == sorted(positions), alias
    assert "MISSING: set OPENROUTER_API_KEY" in out
    assert "MISSING: set ANTHROPIC_API_KEY" in out
    assert "MISSING: set OPENAI_API_KEY" not in out
    pricing = yaml.safe_load(ROUTER_YAML.read_text())["pricing"]
    for price in pricing.values():
        assert f"${price['input_per_1m']:g} in / ${price['output_per_1m']:g} out per 1M tokens" in out
    assert_clean(proc, FAKE_OPENAI_KEY)


def test_explain_one_alias() -> None:
    proc = run("explain", str(ROUTER_YAML), "fast")
    assert proc.returncode == 0, proc.stderr
    targets = example_targets()
    listed = re.findall(r"^  \d+\. (\S+)  \(", proc.stdout, re.M)
    assert listed == targets["fast"]
    assert not re.search(r"^(chat|local)\b", proc.stdout, re.M)


def test_explain_unknown_alias() -> None:
    proc = run("explain", str(ROUTER_YAML), "nope")
    assert proc.returncode == 1
    assert "nope" in proc.stderr
    assert proc.stdout == ""
    assert_clean(proc)


# --- schema -----------------------------------------------------------------------------------------------


def test_schema_prints_json() -> None:
    proc = run("schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert {"providers", "aliases"} <= set(schema["properties"])


# --- generate ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


@pytest.fixture
def upstream(sandbox: Upstream) -> Iterator[Upstream]:
    sandbox.reset()
    yield sandbox
    sandbox.reset()


PRICE_IN, PRICE_OUT = 3.0, 15.0  # USD per 1M tokens


def sandbox_config(tmp_path: Path, up: Upstream, route: str) -> Path:
    return write(tmp_path / "router.yaml", f"""
        version: 1
        defaults: {{timeout_s: 60, deadline_s: 120, retry: {{attempts: 1}}}}
        providers:
          sim: {{kind: openai, api_base: "{up.base_url(route)}", api_key: "${{SIM_KEY}}"}}
        aliases:
          chat: {{targets: [sim/sim-model]}}
        pricing:
          sim/sim-model: {{input_per_1m: {PRICE_IN}, output_per_1m: {PRICE_OUT}}}
    """)


def test_generate_prints_text_on_stdout_and_stats_on_stderr(tmp_path: Path, upstream: Upstream) -> None:
    tokens_in, tokens_out = 12, 7
    upstream.enqueue("gen", Reply(text="Hello from the sandbox.", usage=(tokens_in, tokens_out)))
    path = sandbox_config(tmp_path, upstream, "gen")
    proc = run("generate", "-c", str(path), "-m", "chat", "Say hello", env=cli_env(SIM_KEY=FAKE_SANDBOX_KEY))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hello from the sandbox.\n"
    cost = (tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6
    assert "sim/sim-model" in proc.stderr
    assert f"{tokens_in} in / {tokens_out} out tokens" in proc.stderr
    assert f"${cost:.6f} (config)" in proc.stderr
    assert re.search(r"\b\d+ ms\b", proc.stderr)
    assert_clean(proc, FAKE_SANDBOX_KEY)
    (request,) = upstream.requests("gen")
    assert request.model == "sim-model"
    assert request.prompt == "Say hello"
    assert request.headers["authorization"] == f"Bearer {FAKE_SANDBOX_KEY}"


def test_generate_failure_exits_1_with_the_error_class(tmp_path: Path, upstream: Upstream) -> None:
    upstream.enqueue("bad", Reply(status=400, error="the request is malformed"))
    path = sandbox_config(tmp_path, upstream, "bad")
    proc = run("generate", "-c", str(path), "-m", "chat", "hi", env=cli_env(SIM_KEY=FAKE_SANDBOX_KEY))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "ProviderError" in proc.stderr
    assert_clean(proc, FAKE_SANDBOX_KEY)
    assert len(upstream.requests("bad")) == 1  # a 400 is not retried


def test_generate_reads_the_config_named_by_llm_router_config(tmp_path: Path) -> None:
    # The only provider's key is unset, so the call fails before any request, naming the var of *this* file.
    path = write(tmp_path / "from-env.yaml", """
        version: 1
        providers: {p: {kind: openai, api_key: "${KEY_ONLY_IN_THIS_FILE}"}}
        aliases: {chat: {targets: [p/m]}}
    """)
    proc = run("generate", "-m", "chat", "hi", env=cli_env(LLM_ROUTER_CONFIG=str(path)))
    assert proc.returncode == 1
    assert "MissingCredentialsError" in proc.stderr
    assert "KEY_ONLY_IN_THIS_FILE" in proc.stderr
    assert_clean(proc)


def test_generate_default_config_path(tmp_path: Path) -> None:
    proc = run("generate", "-m", "chat", "hi", cwd=tmp_path)
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith("config/router.yaml: ")
    assert "not found" in line


def test_generate_rejects_a_non_positive_timeout_as_a_usage_error(tmp_path: Path, upstream: Upstream) -> None:
    path = sandbox_config(tmp_path, upstream, "unused")
    proc = run("generate", "-c", str(path), "-m", "chat", "--timeout", "0", "hi", env=cli_env(SIM_KEY="k"))
    assert proc.returncode == 2, proc.stderr
    assert "timeout" in proc.stderr
    assert_clean(proc)
    assert upstream.requests("unused") == []


# --- the command line itself ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [(), ("frobnicate",), ("validate",), ("explain",), ("generate",), ("generate", "hi", "--max-tokens", "many")],
    ids=["no-command", "unknown-command", "validate-no-file", "explain-no-file", "generate-no-prompt", "bad-int"],
)
def test_command_line_errors_exit_2(args: tuple[str, ...]) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    assert "usage: llm-router" in proc.stderr
    assert proc.stdout == ""
    assert_clean(proc)
