"""Property: whatever a config file holds, loading it gives a RouterConfig or a ConfigError, and nothing else.

Hypothesis feeds the loader generated documents (random trees of config keys and hostile values, dumped as
YAML) and mutated ones (the repository's real configs with YAML syntax, anchors, tags, huge numbers and
broken `${VAR}`s spliced in, cut and duplicated), as text and as bytes on disk. The runs are derandomized
and bounded, so CI sees the same few hundred examples every time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from conftest import standard_config, standard_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import ConfigError, RouterConfig
from router.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [
    standard_config().replace("{UP}", "http://127.0.0.1:9"),
    (ROOT / "config" / "router.yaml").read_text(),
    (ROOT / "config" / "sandbox.yaml").read_text(),
    "version: 1\nl0: &l0 [a, a, a]\nl1: &l1 [*l0, *l0, *l0]\nproviders: {p: {<<: &b {kind: openai}}}\n",
]
# What a hostile or careless file may hold, spliced in whole.
TOKENS = [
    "&a ",
    "*a",
    "&b [*a, *a, *a, *a]",
    "<<: *a",
    "? ",
    "- ",
    ": ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\n",
    "\n  ",
    "\t",
    "'",
    '"',
    "|",
    ">",
    "#",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "!!python/object/apply:os.system [ls]",
    "!!python/name:os.system",
    "!!binary aGk=",
    "!!set {a}",
    "!!timestamp 2024-01-01",
    "!x ",
    "!!int ",
    "!!str ",
    ".nan",
    ".inf",
    "-.inf",
    "1.0e+999",
    "9" * 60,
    "0x" + "f" * 40,
    "1_000",
    "0b_",
    "0x_",
    "!!bool ",
    "!!float ",
    "!!null ",
    "-0",
    "~",
    "null",
    "yes",
    "=",
    "${X}",
    "${X:-${Y}}",
    "${",
    "${1}",
    "$$",
    "${X:-}",
    "\x00",
    "\ufeff",
    "\ud7ff",
    "\udc80",
    "\U0001f600",
    "\x85",
    "weight: ",
    "input_per_1m: ",
    "targets: ",
    "api_key: ",
    "aliases:",
    "providers:",
    "version: 1",
]
ENVS = st.fixed_dictionaries(
    {}, optional={"X": st.sampled_from(["${X}", "${Y}", "", "x", "$$", "${X:-${X}}"]), "Y": st.just("${X}")}
)
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def loads_or_config_error(text: str, env: dict[str, str]) -> RouterConfig | None:
    """parse_config's answer; any exception other than ConfigError fails the property."""
    try:
        cfg = parse_config(text, "fuzz.yaml", env)
    except ConfigError as exc:
        assert exc.problems and all(p.file == "fuzz.yaml" for p in exc.problems)
        assert str(exc)
        return None
    assert isinstance(cfg, RouterConfig)
    for alias in cfg.aliases:
        cfg.tiers(alias)  # every alias resolved against the providers at load
    return cfg


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A real config with 1-8 splices, cuts, duplications and truncations."""
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(text)))
        end = draw(st.integers(at, min(len(text), at + 80)))
        op = draw(st.sampled_from(["insert", "delete", "duplicate", "replace", "truncate", "text"]))
        if op == "insert":
            text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
        elif op == "delete":
            text = text[:at] + text[end:]
        elif op == "duplicate":
            text = text[:end] + text[at:end] * draw(st.integers(1, 30)) + text[end:]
        elif op == "replace":
            text = text[:at] + draw(st.sampled_from(TOKENS)) + text[end:]
        elif op == "truncate":
            text = text[:at]
        else:
            text = text[:at] + draw(st.text(max_size=20)) + text[at:]
    return text


KEYS = st.sampled_from(
    ["version", "defaults", "providers", "aliases", "pricing", "metrics", "kind", "api_key", "api_base", "targets",
     "weight", "target", "params", "system", "model", "timeout_s", "deadline_s", "retry", "circuit", "headers",
     "input_per_1m", "output_per_1m", "name", "key", "enabled", "buckets", "namespace", "a", "a/m", "<<"]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["openai", "a/m", "a/m-2", "http://127.0.0.1:9/v1", "${X}", "${X:-d}", "${X", "$${X}"]),
    st.text(max_size=12),
)
TREES = st.recursive(
    SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=5), max_leaves=30
)


@st.composite
def generated(draw: st.DrawFn) -> str:
    """A random tree under the config's top-level keys, dumped as YAML (sometimes flow style, sometimes JSON)."""
    doc: dict[str, Any] = {"version": draw(st.sampled_from([1, 1, 2, "1", None]))}
    doc["providers"] = draw(
        st.one_of(TREES, st.dictionaries(st.sampled_from(["a", "b"]), st.dictionaries(KEYS, TREES, max_size=4)))
    )
    doc["aliases"] = draw(
        st.one_of(
            TREES,
            st.dictionaries(
                st.sampled_from(["chat", "x"]),
                st.fixed_dictionaries({"targets": st.lists(st.one_of(SCALARS, TREES), max_size=3)}),
                max_size=2,
            ),
        )
    )
    for key in draw(st.lists(st.sampled_from(["defaults", "pricing", "metrics"]), unique=True)):
        doc[key] = draw(TREES)
    return yaml.safe_dump(doc, default_flow_style=draw(st.sampled_from([None, True, False])), allow_unicode=True)


@SETTINGS
@given(text=mutated(), env=ENVS)
def test_a_mutated_config_loads_or_is_a_config_error(text: str, env: dict[str, str]) -> None:
    loads_or_config_error(text, env)


@SETTINGS
@given(text=generated(), env=ENVS)
def test_a_generated_document_loads_or_is_a_config_error(text: str, env: dict[str, str]) -> None:
    loads_or_config_error(text, env)


@settings(SETTINGS, max_examples=100)
@given(
    prefix=st.sampled_from(SEEDS).map(str.encode),
    noise=st.binary(max_size=64),
    at=st.floats(0, 1),
)
def test_a_file_of_any_bytes_loads_or_is_a_config_error(prefix: bytes, noise: bytes, at: float) -> None:
    cut = int(len(prefix) * at)
    fd, name = tempfile.mkstemp(suffix=".yaml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(prefix[:cut] + noise + prefix[cut:])
        try:
            load_config(name, standard_env())
        except ConfigError as exc:
            assert all(p.file == name for p in exc.problems)
    finally:
        os.unlink(name)


def test_the_seeds_of_the_mutations_load() -> None:
    # the mutations start from configs that load, so they probe the schema, not only the YAML parser
    assert loads_or_config_error(SEEDS[0], standard_env()) is not None
    assert loads_or_config_error(SEEDS[2], {}) is not None
