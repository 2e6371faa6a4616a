"""Tests for router.config: loading, validation, line-numbered errors, interpolation, secrets, schema."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import RouterConfig, config_schema, interpolate, load_config, normalize_model, parse_config
from router.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [ROOT / "config" / "router.yaml", ROOT / "config" / "sandbox.yaml"]
SECRET = "sk-test-zzzz-do-not-leak-0123456789"

BASE = """\
version: 1
providers:
  openai: {kind: openai, api_key: "${OPENAI_KEY}"}
  openrouter: {kind: openrouter, api_key: "${OR_KEY}"}
aliases:
  chat:
    targets: [openai/gpt-4o, openrouter/gpt-4o-mini]
"""


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based number of the line holding the `occurrence`-th match of `needle`."""
    hits = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) >= occurrence, f"{needle!r} occurs {len(hits)} time(s) in the test text"
    return hits[occurrence - 1]


def problems(text: str, env: dict[str, str] | None = None, file: str = "test.yaml") -> list[str]:
    """The problem lines parse_config reports for `text` (the test fails if it parses)."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, file, env={} if env is None else env)
    lines = str(info.value).splitlines()
    assert lines == [str(p) for p in info.value.problems]
    return lines


def parse(text: str, env: dict[str, str] | None = None) -> RouterConfig:
    return parse_config(text, "test.yaml", env={} if env is None else env)


# --- the example configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_validate(path: Path) -> None:
    cfg = load_config(path, env={})
    assert cfg.source == str(path)
    data = yaml.safe_load(path.read_text())
    assert set(cfg.aliases) == set(data["aliases"])
    for alias, spec in data["aliases"].items():
        assert len(cfg.targets(alias)) == len(spec["targets"])


def test_example_config_resolves_targets_in_order() -> None:
    cfg = load_config(ROOT / "config" / "router.yaml", env={})
    keys = [t.key for t in cfg.targets("chat")]
    assert keys == ["openrouter/anthropic/claude-3.5-sonnet", "anthropic/claude-3-5-sonnet-20241022", "openai/gpt-4o"]
    assert dict(cfg.targets("chat")[2].params) == {"temperature": 0.5}


# --- errors name file, line and key path ---------------------------------------------------------------------


def test_typo_in_alias_names_line_key_path_and_suggestion() -> None:
    text = yaml_text("""
        version: 1
        providers:
          openai: {kind: openai}
        aliases:
          chat:
            tragets: [openai/gpt-4o]
    """)
    line = line_of(text, "tragets")
    assert f"test.yaml:{line}: aliases.chat.tragets: unknown key (did you mean 'targets'?)" in problems(text)


def test_several_validation_problems_are_reported_at_once() -> None:
    text = yaml_text("""
        version: 1
        defaults:
          timout_s: 5
        providers:
          openai: {kind: openai, api_kye: x}
        aliases:
          chat: {targets: [openai/gpt-4o], parms: {}}
    """)
    got = problems(text)
    expected = [
        f"test.yaml:{line_of(text, 'timout_s')}: defaults.timout_s: unknown key (did you mean 'timeout_s'?)",
        f"test.yaml:{line_of(text, 'api_kye')}: providers.openai.api_kye: unknown key (did you mean 'api_key'?)",
        f"test.yaml:{line_of(text, 'parms')}: aliases.chat.parms: unknown key (did you mean 'params'?)",
    ]
    for problem in expected:
        assert problem in got
    assert len(got) == len(expected)


def test_several_reference_problems_are_reported_at_once() -> None:
    text = yaml_text("""
        version: 1
        defaults: {model: chta}
        providers:
          openai: {kind: openai}
        aliases:
          chat:
            targets:
              - opena/gpt-4o
        pricing:
          openai/gpt-5: {input_per_1m: 1, output_per_1m: 2}
    """)
    got = problems(text)
    assert len(got) == 3
    assert (
        f"test.yaml:{line_of(text, 'chta')}: defaults.model: alias 'chta' is not defined under aliases "
        "(did you mean 'chat'?)"
    ) in got
    assert (
        f"test.yaml:{line_of(text, 'opena/gpt-4o')}: aliases.chat.targets[0]: provider 'opena' is not defined "
        "under providers (did you mean 'openai'?)"
    ) in got
    pricing_line = line_of(text, "openai/gpt-5")
    assert any(p.startswith(f"test.yaml:{pricing_line}: pricing.openai/gpt-5: matches no target") for p in got)


def test_unknown_provider_in_short_target_has_did_you_mean() -> None:
    text = BASE.replace("openrouter/gpt-4o-mini", "opnrouter/gpt-4o-mini")
    got = problems(text, {"OPENAI_KEY": "k", "OR_KEY": "k"})
    assert got == [
        f"test.yaml:{line_of(text, 'opnrouter/')}: aliases.chat.targets[1]: provider 'opnrouter' is not defined "
        "under providers (did you mean 'openrouter'?)"
    ]


def test_unknown_provider_in_long_target() -> None:
    text = BASE.replace(
        "targets: [openai/gpt-4o, openrouter/gpt-4o-mini]", "targets:\n      - {provider: nobody, model: m}"
    )
    (got,) = problems(text)
    assert got.startswith(f"test.yaml:{line_of(text, 'nobody')}: aliases.chat.targets[0]: provider 'nobody'")
    assert "did you mean" not in got


def test_pricing_key_matching_no_target_suggests_the_closest() -> None:
    text = BASE + "pricing:\n  openai/gpt4o: {input_per_1m: 2.5, output_per_1m: 10}\n"
    (got,) = problems(text)
    assert got == (
        f"test.yaml:{line_of(text, 'openai/gpt4o:')}: pricing.openai/gpt4o: matches no target of any alias "
        "(did you mean 'openai/gpt-4o'?)"
    )


@pytest.mark.parametrize("spelling", ["openrouter/gpt-4o-mini", "openrouter/openai/gpt-4o-mini"])
def test_pricing_matches_openrouter_target_as_written_or_normalised(spelling: str) -> None:
    cfg = parse(BASE + f"pricing:\n  {spelling}: {{input_per_1m: 0.15, output_per_1m: 0.6}}\n")
    (target,) = [t for t in cfg.targets("chat") if t.provider == "openrouter"]
    assert target.pricing is not None
    assert target.pricing.input_per_1m == 0.15


def test_negative_price_is_rejected() -> None:
    text = BASE + "pricing:\n  openai/gpt-4o:\n    input_per_1m: -1\n    output_per_1m: 10\n"
    (got,) = problems(text)
    assert got.startswith(f"test.yaml:{line_of(text, 'input_per_1m: -1')}: pricing.openai/gpt-4o.input_per_1m: ")
    assert "greater than or equal to 0" in got


def test_price_per_1m_and_per_1k_together_is_rejected() -> None:
    text = BASE + "pricing:\n  openai/gpt-4o: {input_per_1m: 2.5, output_per_1k: 0.01}\n"
    (got,) = problems(text)
    assert got == (
        f"test.yaml:{line_of(text, 'openai/gpt-4o:')}: pricing.openai/gpt-4o: "
        "give prices per 1M or per 1K tokens, not both"
    )


def test_empty_price_is_rejected() -> None:
    text = BASE + "pricing:\n  openai/gpt-4o: {}\n"
    (got,) = problems(text)
    assert got.startswith(f"test.yaml:{line_of(text, 'openai/gpt-4o:')}: pricing.openai/gpt-4o: give input_per_1m")


@pytest.mark.parametrize("given", ["input_per_1m: 2.5", "output_per_1m: 10", "input_per_1k: 0.0025"])
def test_price_with_only_one_side_is_rejected(given: str) -> None:
    # A missing side would silently cost 0 while the result says its cost came from the config.
    text = BASE + f"pricing:\n  openai/gpt-4o: {{{given}}}\n"
    (got,) = problems(text)
    assert got.startswith(f"test.yaml:{line_of(text, 'openai/gpt-4o:')}: pricing.openai/gpt-4o")


def test_default_model_must_name_an_alias() -> None:
    text = BASE + "defaults:\n  model: fast\n"
    (got,) = problems(text)
    assert got == f"test.yaml:{line_of(text, 'model: fast')}: defaults.model: alias 'fast' is not defined under aliases"


def test_duplicate_yaml_key_names_both_lines() -> None:
    text = yaml_text("""
        version: 1
        providers:
          openai: {kind: openai}
          openai: {kind: anthropic}
        aliases:
          chat: {targets: [openai/gpt-4o]}
    """)
    first, second = line_of(text, "openai:", 1), line_of(text, "openai:", 2)
    (got,) = problems(text)
    assert got.startswith(f"test.yaml:{second}: providers.openai: duplicate key")
    # The message must point at the other occurrence, or it tells the reader nothing the prefix did not.
    assert re.search(rf"\b{first}\b", got.split("duplicate key", 1)[1])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("version: 1\nproviders: {openai: [1, 2\n", None),
        ("version: 1\n\tproviders: {}\n", "\tproviders"),
        ("version: 1\nname: 'unterminated\n", None),
        ("version: 1\nproviders:\n  a: b\n c: d\n", " c: d"),
    ],
    ids=["unclosed-flow", "tab", "unterminated-quote", "bad-indent"],
)
def test_malformed_yaml_is_one_line_with_file_and_line(text: str, needle: str | None) -> None:
    (got,) = problems(text)
    match = re.fullmatch(r"test\.yaml:(\d+): invalid YAML: .+", got)
    assert match, got
    line = int(match.group(1))
    assert 1 <= line <= text.count("\n") + 1
    if needle is not None:
        assert line == line_of(text, needle)
    assert "Traceback" not in got


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"], ids=["empty", "list", "scalar"])
def test_file_that_is_not_a_mapping(text: str) -> None:
    (got,) = problems(text)
    assert got.startswith("test.yaml:1: ")
    assert "mapping" in got


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: config file not found"
    assert isinstance(info.value, ValueError)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    (got,) = str(info.value).splitlines()
    assert got.startswith(f"{tmp_path}: ")
    assert "directory" in got


def test_load_config_errors_name_the_real_path(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    text = BASE.replace("kind: openai,", "kind: openai, tiemout_s: 3,")
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == (
        f"{path}:{line_of(text, 'tiemout_s')}: providers.openai.tiemout_s: unknown key (did you mean 'timeout_s'?)"
    )


# --- ${VAR} interpolation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("${HOST}", {"HOST": "h.example"}, "h.example"),
        ("https://${HOST}/v1", {"HOST": "h.example"}, "https://h.example/v1"),
        ("${HOST:-fallback.example}", {}, "fallback.example"),
        ("${HOST:-fallback.example}", {"HOST": ""}, "fallback.example"),
        ("${HOST:-fallback.example}", {"HOST": "set.example"}, "set.example"),
        ("${HOST:-}", {}, ""),
        ("cost $$5", {}, "cost $5"),
        ("$${HOST}", {"HOST": "h"}, "${HOST}"),
        ("plain $HOST", {"HOST": "h"}, "plain $HOST"),
    ],
)
def test_interpolate(value: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(value, env)[0] == expected


def test_interpolate_reports_used_and_unset_vars() -> None:
    _, used, unset = interpolate("${A}-${B}-${C:-c}", {"A": "a"})
    assert used == ["A", "B", "C"]
    assert unset == ["B"]


def test_config_values_are_interpolated_from_the_given_env() -> None:
    text = yaml_text("""
        version: 1
        providers:
          local:
            kind: openai
            api_base: "http://${HOST:-127.0.0.1}:${PORT}/v1"
            headers: {X-Price: "$$1"}
        aliases:
          chat: {targets: [local/m], system: "Hi ${WHO:-there}"}
    """)
    cfg = parse(text, {"PORT": "9000"})
    (target,) = cfg.targets("chat")
    assert target.api_base == "http://127.0.0.1:9000/v1"
    assert dict(target.headers) == {"X-Price": "$1"}
    assert cfg.aliases["chat"].system == "Hi there"


def test_unset_var_in_api_base_is_an_error_naming_the_var() -> None:
    text = yaml_text("""
        version: 1
        providers:
          local: {kind: openai, api_base: "${LOCAL_URL}/v1"}
        aliases:
          chat: {targets: [local/m]}
    """)
    (got,) = problems(text, {"OTHER": "x"})
    assert got.startswith(f"test.yaml:{line_of(text, 'LOCAL_URL')}: providers.local.api_base: ")
    assert "LOCAL_URL" in got


def test_unset_var_in_api_key_is_allowed_and_target_lacks_credentials() -> None:
    cfg = parse(BASE, {"OPENAI_KEY": SECRET})
    by_provider = {t.provider: t for t in cfg.targets("chat")}
    assert by_provider["openai"].has_credentials
    assert by_provider["openai"].key_env_vars == ("OPENAI_KEY",)
    assert not by_provider["openrouter"].has_credentials
    assert by_provider["openrouter"].key_env_vars == ("OR_KEY",)


def test_provider_without_api_key_has_credentials() -> None:
    cfg = parse("version: 1\nproviders: {local: {kind: ollama}}\naliases: {chat: {targets: [local/llama3]}}\n")
    (target,) = cfg.targets("chat")
    assert target.keys == ()
    assert target.has_credentials
    assert target.key_env_vars == ()


def test_literal_api_key_has_no_env_vars() -> None:
    cfg = parse("version: 1\nproviders: {p: {kind: openai, api_key: literal}}\naliases: {chat: {targets: [p/m]}}\n")
    (target,) = cfg.targets("chat")
    assert target.has_credentials
    assert target.key_env_vars == ()


def test_parse_config_does_not_read_the_process_environment_when_env_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OR_KEY", "from-the-process")
    cfg = parse(BASE, {"OPENAI_KEY": "k"})
    assert not {t.provider: t for t in cfg.targets("chat")}["openrouter"].has_credentials


# --- targets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["gpt-4o", "openai/", "/gpt-4o"])
def test_target_string_must_be_provider_slash_model(target: str) -> None:
    text = BASE.replace("openrouter/gpt-4o-mini", target)
    (got,) = problems(text, {})
    assert got.startswith(f"test.yaml:{line_of(text, 'targets:')}: aliases.chat.targets[1]: ")
    assert repr(target) in got
    assert "<provider>/<model>" in got


def test_model_part_of_a_target_may_contain_slashes() -> None:
    cfg = parse(BASE.replace("openrouter/gpt-4o-mini", "openrouter/meta-llama/llama-3-8b"))
    assert cfg.targets("chat")[1].model == "meta-llama/llama-3-8b"


def test_alias_needs_at_least_one_target() -> None:
    text = BASE.replace("[openai/gpt-4o, openrouter/gpt-4o-mini]", "[]")
    (got,) = problems(text)
    assert got.startswith(f"test.yaml:{line_of(text, 'targets:')}: aliases.chat.targets: ")


# --- extra="forbid" at every level ------------------------------------------------------------------------


def minimal(**sections: str) -> str:
    """A valid config (provider p, alias a → p/m) with whole top-level sections replaced or added."""
    parts = {
        "version": "version: 1",
        "providers": "providers: {p: {kind: openai}}",
        "aliases": "aliases: {a: {targets: [p/m]}}",
        **{k: f"{k}: {v}" for k, v in sections.items()},
    }
    return "".join(f"{line}\n" for line in parts.values() if not line.endswith(": DROP"))


@pytest.mark.parametrize(
    ("sections", "needle", "key_path", "suggestion"),
    [
        ({"version": "DROP", "versoin": "1"}, "versoin", "versoin", "version"),
        ({"providers": "{p: {kind: openai, api_bse: 'http://x'}}"}, "api_bse", "providers.p.api_bse", "api_base"),
        ({"aliases": "{a: {targets: [p/m], sytem: hi}}"}, "sytem", "aliases.a.sytem", "system"),
        ({"aliases": "{a: {targets: [{provider: p, modle: m}]}}"}, "modle", "aliases.a.targets[0].modle", "model"),
        ({"defaults": "{deadline: 5}"}, "deadline", "defaults.deadline", "deadline_s"),
        ({"defaults": "{retry: {max_backoff: 5}}"}, "max_backoff", "defaults.retry.max_backoff", "max_backoff_s"),
        (
            {"pricing": "{p/m: {input_per_1m: 1, output_per_1m: 2, outptu_per_1m: 3}}"},
            "outptu",
            "pricing.p/m.outptu_per_1m",
            "output_per_1m",
        ),
        ({"metrics": "{bucket: [1, 2]}"}, "bucket", "metrics.bucket", "buckets"),
    ],
    ids=["top", "provider", "alias", "target", "defaults", "retry", "pricing", "metrics"],
)
def test_unknown_keys_are_rejected_at_every_level(
    sections: dict[str, str], needle: str, key_path: str, suggestion: str
) -> None:
    text = minimal(**sections)
    got = problems(text)
    assert f"test.yaml:{line_of(text, needle)}: {key_path}: unknown key (did you mean {suggestion!r}?)" in got


def test_unknown_key_far_from_any_field_has_no_suggestion() -> None:
    text = BASE.replace("kind: openai,", "kind: openai, zzzzzz: 1,")
    assert problems(text) == [f"test.yaml:{line_of(text, 'zzzzzz')}: providers.openai.zzzzzz: unknown key"]


@pytest.mark.parametrize(
    ("provider", "key_path"),
    [
        ("{api_key: x}", "providers.p.kind"),
        ("{kind: Open AI}", "providers.p.kind"),
        ("{kind: openai, api_base: 'ftp://x'}", "providers.p.api_base"),
        ("{kind: openai, timeout_s: 0}", "providers.p.timeout_s"),
    ],
    ids=["kind-missing", "kind-not-a-prefix", "api-base-scheme", "timeout-zero"],
)
def test_invalid_provider_values(provider: str, key_path: str) -> None:
    text = minimal(providers=f"{{p: {provider}}}")
    got = problems(text)
    assert [p for p in got if p.startswith(f"test.yaml:{line_of(text, 'providers:')}: {key_path}: ")], got


def test_fallback_on_must_name_known_outcomes() -> None:
    text = BASE + "defaults:\n  fallback_on: [rate_limit, ratelimit]\n"
    got = problems(text)
    assert any(p.startswith(f"test.yaml:{line_of(text, 'fallback_on')}: defaults.fallback_on[1]: ") for p in got), got


# --- secrets --------------------------------------------------------------------------------------------


def test_api_key_never_appears_in_reprs_or_dumps() -> None:
    cfg = parse(BASE, {"OPENAI_KEY": SECRET, "OR_KEY": SECRET})
    target = cfg.targets("chat")[0]
    assert target.keys
    assert target.keys[0].secret.get_secret_value() == SECRET  # the key is there, only hidden
    outputs = {
        "repr(cfg)": repr(cfg),
        "str(cfg)": str(cfg),
        "repr(target)": repr(target),
        "str(target)": str(target),
        "repr(provider)": repr(cfg.providers["openai"]),
        "model_dump_json": cfg.model_dump_json(),
        "repr(model_dump)": repr(cfg.model_dump()),
    }
    for name, text in outputs.items():
        assert SECRET not in text, name


def test_api_key_never_appears_in_config_errors() -> None:
    text = BASE.replace("kind: openai,", "kind: openai, api_bse: x,") + "defaults: {model: missing}\n"
    with pytest.raises(ConfigError) as info:
        parse(text, {"OPENAI_KEY": SECRET, "OR_KEY": SECRET})
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


# --- OpenRouter model names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "model", "expected"),
    [
        ("openrouter", "gpt-4o", "openai/gpt-4o"),
        ("openrouter", "o3-mini", "openai/o3-mini"),
        ("openrouter", "claude-3-sonnet", "anthropic/claude-3-sonnet"),
        ("openrouter", "gemini-1.5-pro", "google/gemini-1.5-pro"),
        ("openrouter", "mistral-large", "mistralai/mistral-large"),
        ("openrouter", "anthropic/claude-3.5-sonnet", "anthropic/claude-3.5-sonnet"),
        ("openrouter", "openai/gpt-4o", "openai/gpt-4o"),
        ("openrouter", "some-unknown-model", "some-unknown-model"),
        ("openai", "gpt-4o", "gpt-4o"),
        ("anthropic", "claude-3-sonnet", "claude-3-sonnet"),
        ("azure", "gpt-4o", "gpt-4o"),
    ],
)
def test_normalize_model(kind: str, model: str, expected: str) -> None:
    assert normalize_model(kind, model) == expected


def test_openrouter_target_resolves_to_litellm_model() -> None:
    cfg = parse(BASE)
    by_provider = {t.provider: t for t in cfg.targets("chat")}
    assert by_provider["openrouter"].model == "openai/gpt-4o-mini"
    assert by_provider["openrouter"].litellm_model == "openrouter/openai/gpt-4o-mini"
    assert by_provider["openai"].litellm_model == "openai/gpt-4o"


# --- timeouts and prices ----------------------------------------------------------------------------------


def test_provider_timeout_overrides_the_default() -> None:
    text = BASE.replace("kind: openrouter,", "kind: openrouter, timeout_s: 120,") + "defaults: {timeout_s: 7}\n"
    by_provider = {t.provider: t for t in parse(text).targets("chat")}
    assert by_provider["openrouter"].timeout_s == 120
    assert by_provider["openai"].timeout_s == 7


def test_price_per_1k_and_per_1m_give_the_same_per_token_price() -> None:
    per_1m_in, per_1m_out = 2.5, 10.0
    text = BASE + (
        "pricing:\n"
        f"  openai/gpt-4o: {{input_per_1m: {per_1m_in}, output_per_1m: {per_1m_out}}}\n"
        f"  openrouter/gpt-4o-mini: {{input_per_1k: {per_1m_in / 1000}, output_per_1k: {per_1m_out / 1000}}}\n"
    )
    a, b = (t.pricing for t in parse(text).targets("chat"))
    assert a is not None and b is not None
    assert a.input_per_token == pytest.approx(per_1m_in / 1e6)
    assert a.output_per_token == pytest.approx(per_1m_out / 1e6)
    assert b.input_per_token == pytest.approx(a.input_per_token)
    assert b.output_per_token == pytest.approx(a.output_per_token)


def test_target_without_pricing_has_none() -> None:
    assert all(t.pricing is None for t in parse(BASE).targets("chat"))


# --- JSON Schema ------------------------------------------------------------------------------------------


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/$defs/"), ref
    return schema["$defs"][ref.removeprefix("#/$defs/")]


def test_config_schema_is_json_with_providers_and_aliases() -> None:
    schema = config_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert {"providers", "aliases", "version"} <= set(schema["properties"])
    assert {"providers", "aliases", "version"} <= set(schema["required"])
    assert schema["additionalProperties"] is False


def test_config_schema_accepts_the_example_config() -> None:
    schema = config_schema()
    data = yaml.safe_load((ROOT / "config" / "router.yaml").read_text())
    # Structural checks: every key the example uses is declared, at every model level.
    assert set(data) <= set(schema["properties"])
    provider_schema = _resolve(schema, schema["properties"]["providers"]["additionalProperties"])
    for provider in data["providers"].values():
        assert set(provider) <= set(provider_schema["properties"])
    alias_schema = _resolve(schema, schema["properties"]["aliases"]["additionalProperties"])
    for alias in data["aliases"].values():
        assert set(alias) <= set(alias_schema["properties"])
        assert set(alias_schema["required"]) <= set(alias)
    pricing_schema = _resolve(schema, schema["properties"]["pricing"]["additionalProperties"])
    for price in data["pricing"].values():
        assert set(price) <= set(pricing_schema["properties"])
    defaults_schema = _resolve(schema, schema["properties"]["defaults"])
    assert set(data["defaults"]) <= set(defaults_schema["properties"])
    try:
        import jsonschema
    except ImportError:  # not a dependency: the structural checks above are the test then
        return
    jsonschema.validate(data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**data, "tragets": []}, schema)


# --- errors that name the real mistake ----------------------------------------------------------------------


def only(text: str, env: dict[str, str] | None = None) -> str:
    """The one problem line parse_config reports for `text`."""
    got = problems(text, env)
    assert len(got) == 1, got
    return got[0]


def test_a_tab_used_for_indentation_says_yaml_forbids_tabs_not_an_env_var_hint() -> None:
    text = (
        "version: 1\n"
        "providers:\n"
        "  openai:\n"
        "    kind: openai\n"
        '\tapi_key: "${OPENAI_API_KEY}"\n'
        "aliases:\n"
        "  fast: {targets: [openai/gpt-4o-mini]}\n"
    )
    got = only(text)
    assert got.startswith(f"test.yaml:{line_of(text, 'api_key')}: invalid YAML: ")
    assert "YAML forbids tabs for indentation" in got and "spaces" in got
    assert "quote an env var" not in got


def test_a_tab_in_a_flow_line_with_an_env_var_is_still_about_the_tab() -> None:
    text = "version: 1\nproviders:\n\topenai: {kind: openai, api_key: ${OPENAI_API_KEY}}\naliases: {}\n"
    got = only(text)
    assert got.startswith("test.yaml:3: invalid YAML: ") and "YAML forbids tabs for indentation" in got


def test_an_env_var_unquoted_inside_a_flow_mapping_keeps_its_hint() -> None:
    text = "version: 1\nproviders:\n  openai: {kind: openai, api_key: ${OPENAI_API_KEY}}\naliases: {}\n"
    got = only(text)
    assert got.startswith("test.yaml:3: invalid YAML: ") and 'quote an env var: "${VAR}"' in got


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("params", "  params:\n    temperature: 0.2\n"),
        ("system", "  system: Answer in one sentence.\n"),
        ("cache", "  cache: {ttl_s: 60}\n"),
        ("hedge", "  hedge: {after_s: 2}\n"),
    ],
)
def test_an_alias_field_indented_at_the_level_of_the_aliases_points_at_the_indentation(field: str, body: str) -> None:
    text = (
        "version: 1\n"
        "providers:\n"
        "  openai: {kind: openai}\n"
        "aliases:\n"
        "  chat:\n"
        "    targets: [openai/gpt-4o]\n"
        "  fast:\n"
        "    targets: [openai/gpt-4o-mini]\n"
    ) + body
    got = only(text)
    assert got == (
        f"test.yaml:{line_of(text, f'  {field}:')}: aliases.{field}: `{field}` sits at the level of the aliases; "
        f"indent it under alias 'fast'"
    )


def test_a_top_level_section_named_like_an_alias_field_is_not_misplaced() -> None:
    # `cache` is an alias field and a top-level section: an error inside the section is about the section
    text = BASE + "cache: {store: file}\n"
    assert only(text) == f"test.yaml:{line_of(text, 'cache:')}: cache: store: file needs a path " + (
        "(e.g. /var/cache/llm-router/cache.sqlite)"
    )


def test_an_alias_really_named_like_a_field_is_still_an_alias() -> None:
    text = "version: 1\nproviders: {openai: {kind: openai}}\naliases:\n  system: {targets: [openai/gpt-4o]}\n"
    assert [t.key for t in parse(text).targets("system")] == ["openai/gpt-4o"]


def test_a_provider_field_indented_at_the_level_of_the_providers_points_at_the_indentation() -> None:
    text = yaml_text("""
        version: 1
        providers:
          local:
            kind: openai
            api_key: none
          api_base: http://127.0.0.1:8000/v1
        aliases:
          fast: {targets: [local/llama3]}
    """)
    assert only(text) == (
        f"test.yaml:{line_of(text, 'api_base')}: providers.api_base: `api_base` sits at the level of the "
        "providers; indent it under provider 'local'"
    )


def test_a_provider_field_at_the_top_level_points_under_the_last_provider() -> None:
    text = yaml_text("""
        version: 1
        providers:
          local:
            kind: openai
        api_base: http://127.0.0.1:8000/v1
        aliases:
          fast: {targets: [local/llama3]}
    """)
    assert only(text) == (
        f"test.yaml:{line_of(text, 'api_base')}: api_base: `api_base` sits at the top level; "
        "indent it under provider 'local'"
    )


@pytest.mark.parametrize("price", ['"$0.15"', "$0.15", "'$ 0.15'", '"0.15$"', '"0.15 USD"'])
def test_a_price_written_with_a_dollar_sign_says_to_write_a_plain_number(price: str) -> None:
    text = BASE + f"pricing:\n  openai/gpt-4o:\n    input_per_1m: {price}\n    output_per_1m: 0.6\n"
    assert only(text) == (
        f"test.yaml:{line_of(text, 'input_per_1m')}: pricing.openai/gpt-4o.input_per_1m: "
        "write a plain number of USD, without $ or a unit: 0.15"
    )


def test_a_timeout_written_with_its_unit_says_to_write_seconds_as_a_plain_number() -> None:
    text = BASE + 'defaults:\n  timeout_s: "30s"\n'
    assert only(text) == (
        f"test.yaml:{line_of(text, 'timeout_s')}: defaults.timeout_s: "
        "write a plain number of seconds, without a unit: 30"
    )


def test_a_price_that_is_no_number_at_all_keeps_the_plain_message() -> None:
    text = BASE + "pricing:\n  openai/gpt-4o: {input_per_1m: cheap, output_per_1m: 0.6}\n"
    got = only(text)
    assert "valid number" in got and "without $" not in got


DEDENTED = [
    (  # api_base two spaces short, followed by a sibling: YAML only trips on the next line
        """\
        version: 1
        providers:
          local:
            kind: openai
            api_key: none
          api_base: http://127.0.0.1:8000/v1
            timeout_s: 120
        aliases:
          fast: {targets: [local/llama3]}
        """,
        "api_base",
    ),
    (  # the first key of a provider one space short of the keys after it
        """\
        version: 1
        providers:
          local:
           kind: openai
            api_base: http://127.0.0.1:8000/v1
            timeout_s: 120
        aliases:
          fast: {targets: [local/llama3]}
        """,
        "kind",
    ),
    (  # the first key of a provider one space deeper than the keys after it
        """\
        version: 1
        providers:
          local:
             kind: openai
            api_base: http://127.0.0.1:8000/v1
            timeout_s: 120
        aliases:
          fast: {targets: [local/llama3]}
        """,
        "kind",
    ),
    (  # a key dedented between two of its siblings, the next one a mapping key as well
        """\
        version: 1
        providers:
          local:
            kind: openai
          api_key: "${LOCAL_KEY:-none}"
            api_base: http://127.0.0.1:8000/v1
        aliases:
          fast: {targets: [local/llama3]}
        """,
        "api_key",
    ),
    (  # the first item of a list one space deeper than the items after it
        """\
        version: 1
        providers:
          local: {kind: openai}
        aliases:
          fast:
            targets:
               - local/llama3
              - local/qwen
              - local/mistral
        """,
        "llama3",
    ),
]


@pytest.mark.parametrize(("text", "wrong"), DEDENTED, ids=["api_base", "first-short", "first-deep", "mid", "list"])
def test_a_mis_indented_line_is_reported_on_that_line(text: str, wrong: str) -> None:
    text = textwrap.dedent(text)
    got = only(text, {})
    assert got.startswith(f"test.yaml:{line_of(text, wrong)}: invalid YAML: "), got
    assert "indent" in got


def reindented(text: str) -> list[tuple[int, str]]:
    """Every way to shift one line of `text` by one or two spaces: (the 1-based line shifted, the new text)."""
    lines = text.splitlines(keepends=True)
    out = []
    for i, line in enumerate(lines):
        stripped = line.lstrip(" ")
        if not stripped.strip() or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        for shift in (-2, -1, 1, 2):
            if indent + shift >= 0:
                out.append((i + 1, "".join(lines[:i] + [" " * (indent + shift) + stripped] + lines[i + 1 :])))
    return out


def test_when_a_yaml_error_is_moved_off_yamls_own_line_it_is_moved_to_the_line_that_is_wrong() -> None:
    moved = 0
    for changed, text in reindented((ROOT / "config" / "router.yaml").read_text()):
        try:
            yaml.load(text, Loader=yaml.CSafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            assert mark is not None
            yamls_line = mark.line + 1
        else:
            continue
        with pytest.raises(ConfigError) as info:
            parse_config(text, "r.yaml", {})
        (problem,) = info.value.problems
        if problem.line != yamls_line:
            moved += 1
            assert problem.line == changed, f"line {changed} was shifted; the error names {problem}"
    assert moved >= 10  # the rule does move errors: a shifted line reported one line too late


def test_a_dedented_api_base_names_the_lines_it_disagrees_with() -> None:
    text = textwrap.dedent(DEDENTED[0][0])
    assert only(text) == (
        "test.yaml:6: invalid YAML: this line is indented 2 spaces and the lines around it (5 and 7) 4: "
        "indent it like them (YAML reads indentation as structure)"
    )


def test_a_target_without_a_provider_prefix_suggests_one() -> None:
    text = BASE.replace("openrouter/gpt-4o-mini", "gpt-4o-mini")
    assert only(text) == (
        f"test.yaml:{line_of(text, 'targets:')}: aliases.chat.targets[1]: target 'gpt-4o-mini' must be written "
        "'<provider>/<model>', e.g. 'openai/gpt-4o-mini' (providers: openai, openrouter)"
    )


def test_a_misspelt_provider_kind_is_an_error_with_a_suggestion() -> None:
    text = minimal(providers="{p: {kind: opneai}}")
    assert only(text) == (
        f"test.yaml:{line_of(text, 'opneai')}: providers.p.kind: 'opneai' is not a LiteLLM provider "
        "(did you mean 'openai'?)"
    )


def test_no_provider_of_the_installed_litellm_is_taken_for_a_typo() -> None:
    import litellm

    from router.config import LITELLM_PROVIDERS, _kind_typo

    installed = {getattr(p, "value", p) for p in litellm.provider_list}
    assert [p for p in sorted(installed) if _kind_typo(p) is not None] == []
    assert installed >= LITELLM_PROVIDERS  # the list names real providers


@pytest.mark.parametrize("kind", ["openai", "anthropic", "openrouter", "gemini", "azure", "ollama", "vllm", "my-own"])
def test_known_and_unknown_but_unlike_any_provider_kinds_load(kind: str) -> None:
    assert parse(minimal(providers=f"{{p: {{kind: {kind}}}}}")).targets("a")[0].kind == kind


# --- no error echoes a secret ------------------------------------------------------------------------------

# Shaped like a real OpenAI project key (the kind people paste): it must never appear in an error.
REAL_KEY = "sk-proj-" + "Xq3v9LrT0bKpZ2mW7sYcN4dH8fJ1aG6eU5iO0pQzR3tV7xB2nM9kL4jH6gF1dS8aW2eR5tY7uI0o" + "T3BlbkFJ"


def assert_no_key(err: ConfigError, key: str = REAL_KEY) -> None:
    text = str(err) + repr(err) + "".join(p.key_path + p.message for p in err.problems)
    assert key not in text
    # nor any stretch of it long enough to matter
    assert not any(key[i : i + 12] in text for i in range(len(key) - 12))


def config_error(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.yaml", env={} if env is None else env)
    return info.value


def test_a_key_pasted_as_a_target_is_not_echoed_and_the_mistake_is_named() -> None:
    text = BASE.replace("openrouter/gpt-4o-mini", f'"{REAL_KEY}"')
    err = config_error(text)
    assert_no_key(err)
    assert str(err) == (
        f"test.yaml:{line_of(text, 'targets:')}: aliases.chat.targets[1]: holds what looks like an API key (not shown):"
        " a target is '<provider>/<model>'; put the key in providers.NAME.api_key, as \"${ENV_VAR}\""
    )


@pytest.mark.parametrize(
    "target",
    [
        f"{{provider: openai, model: {REAL_KEY}}}",
        f"{{provider: {REAL_KEY}, model: gpt-4o}}",
        f"openai/{REAL_KEY}",
        f"{{target: {REAL_KEY}, weight: 1}}",
    ],
    ids=["model", "provider", "short-model", "tier-member"],
)
def test_a_key_in_a_provider_or_model_field_is_an_error_that_does_not_echo_it(target: str) -> None:
    text = BASE.replace("openrouter/gpt-4o-mini", target)
    err = config_error(text, {"OPENAI_KEY": "k"})
    assert_no_key(err)
    assert "looks like an API key (not shown)" in str(err)
    assert all(p.line == line_of(text, "targets:") for p in err.problems)


@pytest.mark.parametrize(
    ("yaml_value", "where"),
    [
        ('"${PASTED}"', "aliases.chat.targets[1]"),
        ('{provider: "${PASTED}", model: m}', "aliases.chat.targets[1]"),
    ],
)
def test_a_value_from_an_env_var_is_shown_as_the_reference_never_its_value(yaml_value: str, where: str) -> None:
    text = BASE.replace("openrouter/gpt-4o-mini", yaml_value)
    err = config_error(text, {"PASTED": REAL_KEY, "OPENAI_KEY": "k"})
    assert_no_key(err)
    assert all(p.key_path == where for p in err.problems)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (BASE.replace("openrouter/gpt-4o-mini", '"${T}"'), "target '${T}' must be written '<provider>/<model>'"),
        (BASE.replace("openrouter/gpt-4o-mini", '"${T}/gpt-4o"'), "provider '${T}' is not defined"),
        (BASE + 'defaults: {model: "${T}"}\n', "alias '${T}' is not defined"),
        (BASE + 'defaults: {fallback_on: ["${T}"]}\n', "'${T}' is not a failure outcome"),
    ],
    ids=["target", "provider", "default-model", "fallback-on"],
)
def test_an_env_value_that_is_no_secret_is_not_echoed_either(text: str, shown: str) -> None:
    err = config_error(text, {"T": "hunter2", "OPENAI_KEY": "k"})
    assert "hunter2" not in str(err)
    assert shown in str(err)


def test_a_provider_or_alias_named_with_a_key_is_refused_without_echoing_it() -> None:
    text = f"version: 1\nproviders:\n  {REAL_KEY}: {{kind: openai}}\naliases:\n  chat: {{targets: [{REAL_KEY}/m]}}\n"
    err = config_error(text)
    assert_no_key(err)
    assert "looks like an API key" in str(err)


def test_a_huge_value_is_not_echoed_whole() -> None:
    text = BASE.replace("openrouter/gpt-4o-mini", "x" * 100_000 + "/m")
    got = only(text)
    assert len(got) < 400 and "provider 'xxxx" in got


def test_a_file_with_thousands_of_problems_reports_the_first_ones_and_counts_the_rest() -> None:
    text = BASE.replace("[openai/gpt-4o, openrouter/gpt-4o-mini]", "[" + ", ".join(["gpt"] * 5000) + "]")
    got = problems(text)
    assert len(got) == 101
    assert got[-1] == "test.yaml: ... and 4,900 more problems (fix these first)"
    assert all(g.startswith("test.yaml:7: aliases.chat.targets[") for g in got[:100])
