"""No config file can take a process down: loading is bounded, and every bad file is a `ConfigError`.

The limits (MAX_CONFIG_BYTES, MAX_CONFIG_NODES, MAX_CONFIG_DEPTH) are checked while the YAML is composed,
before anything is expanded, so an alias bomb costs what its thirty lines cost. Each bad file here is loaded
for real (parse_config, load_config on a file, `llm-router validate` in a subprocess under a memory limit,
and a watching Router serving calls), and the error is read for its file, line and limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY_A, KEY_B, KEY_C, Sleeps, standard_config
from prometheus_client import CollectorRegistry

from router import ConfigError, Result, Router, config
from router.config import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, load_config, parse_config
from router.sandbox import Received, Reply, Upstream

GOOD = textwrap.dedent(
    """\
    version: 1
    defaults: {model: chat}
    providers:
      a: {kind: openai, api_base: "http://127.0.0.1:9/v1", api_key: "${KEY_A}"}
    aliases:
      chat: {targets: [a/model-a]}
    """
)
ENV = {"KEY_A": KEY_A}


def bomb(levels: int = 9, width: int = 9) -> str:
    """The issue's alias bomb: `levels` anchors, each a list of `width` references to the one before."""
    lines = ["version: 1", "l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join([*lines, f"providers: *l{levels - 1}", "aliases: {}", ""])


def error_of(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "router.yaml", ENV if env is None else env)
    return info.value


def only_problem(err: ConfigError) -> tuple[int | None, str, str]:
    assert len(err.problems) == 1, str(err)
    p = err.problems[0]
    assert p.file == "router.yaml"
    return p.line, p.key_path, p.message


def peak_mb(fn: Callable[[], Any]) -> float:
    """The peak Python allocation while `fn` runs, in MB (what it raised is left for the caller to check)."""
    tracemalloc.start()
    try:
        fn()
    except ConfigError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 1e6


# -- the limits -----------------------------------------------------------------------------------------------


def test_the_issues_alias_bomb_is_refused_at_the_alias_that_crosses_the_node_limit_with_memory_bounded() -> None:
    text = bomb()  # 9**9 = 387 million strings once expanded
    started = time.perf_counter()
    err = error_of(text)
    # a bound, not a benchmark: the refusal costs milliseconds, the expansion it prevents all of the memory
    assert time.perf_counter() - started < 1
    line, key_path, message = only_problem(err)
    # Line 7 defines l5 as nine *l4, each 66,430 values: the third or fourth takes the document past the limit.
    assert line == 7 and key_path == ""
    assert "alias *l4" in message and f"{MAX_CONFIG_NODES:,}" in message and "MAX_CONFIG_NODES" in message
    assert str(err).startswith(f"router.yaml:7: alias *l4 expands the document past {MAX_CONFIG_NODES:,} values")
    assert peak_mb(lambda: parse_config(text, "router.yaml", ENV)) < 5


def test_a_bomb_of_mappings_through_merge_keys_is_refused_too() -> None:
    lines = ["version: 1", "m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}"]
    for i in range(1, 9):
        lines.append(f"m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(8)) + "}")
    lines.append("providers: {a: {<<: *m8, kind: openai}}")
    err = error_of("\n".join(lines) + "\n")
    line, _, message = only_problem(err)
    assert line == 7 and "alias *m4" in message and "MAX_CONFIG_NODES" in message  # m4 is 74,825 values


def test_the_node_limit_is_exact_and_counts_expanded_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "MAX_CONFIG_NODES", 100)
    base = "version: 1\nbig: &big [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"  # 1 root + 2 + 10 = 13 values so far
    # each reference adds 10 values (the list and its nine items) and each key 1: 13 + 11 * n
    within = base + "".join(f"r{n}: *big\n" for n in range(7))  # 13 + 77 = 90
    over = base + "".join(f"r{n}: *big\n" for n in range(8))  # 13 + 88 = 101
    # within the limit the loader goes on to the schema, which knows no `big` or `r0`
    assert {p.message for p in error_of(within).problems} >= {"unknown key"}
    assert not any("MAX_CONFIG" in p.message for p in error_of(within).problems)
    line, _, message = only_problem(error_of(over))
    assert line == 10 and "alias *big" in message and "past 100 values" in message


def test_a_document_of_too_many_plain_values_is_refused_at_the_value_past_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "MAX_CONFIG_NODES", 1000)
    text = "version: 1\nstop:\n" + "".join(f"  - word {i}\n" for i in range(2000))
    line, _, message = only_problem(error_of(text))
    # `version`, 1 and `stop` come first; item i (on line 3 + i) is value 4 + i; the root and list count last
    assert line == 3 + 997 and "over 1,000 values" in message


@pytest.mark.parametrize(
    ("shape", "open_", "close"),
    [("flow lists", "[", "]"), ("flow mappings", "{a: ", "}")],
)
@pytest.mark.parametrize("levels", [MAX_CONFIG_DEPTH + 1, 5_000, 200_000])
def test_flow_nesting_deeper_than_the_limit_is_refused(shape: str, open_: str, close: str, levels: int) -> None:
    text = f"version: 1\nx: {open_ * levels}1{close * levels}\n"
    line, _, message = only_problem(error_of(text))
    assert line == 2 and message == f"nested deeper than {MAX_CONFIG_DEPTH} levels (MAX_CONFIG_DEPTH)"


def test_nesting_at_the_limit_is_accepted_by_the_loader() -> None:
    # root, aliases, chat and params are 4 levels: 60 lists take it to 64
    def with_lists(n: int) -> str:
        return GOOD.replace("[a/model-a]}", f"[a/model-a], params: {{stop: {'[' * n}1{']' * n}}}}}")

    expected: Any = 1
    for _ in range(MAX_CONFIG_DEPTH - 4):
        expected = [expected]
    assert parse_config(with_lists(MAX_CONFIG_DEPTH - 4), "r.yaml", ENV).aliases["chat"].params["stop"] == expected
    assert "MAX_CONFIG_DEPTH" in only_problem(error_of(with_lists(MAX_CONFIG_DEPTH - 3)))[2]


def test_block_nesting_deeper_than_the_limit_is_refused_at_its_line() -> None:
    text = "version: 1\n" + "".join("  " * i + f"k{i}:\n" for i in range(1000))
    line, _, message = only_problem(error_of(text))
    assert line == 2 + MAX_CONFIG_DEPTH and "MAX_CONFIG_DEPTH" in message  # the mapping on line n is level n - 1


def test_an_alias_that_nests_past_the_limit_once_expanded_is_refused() -> None:
    half = MAX_CONFIG_DEPTH // 2 + 1
    text = f"version: 1\ndeep: &deep {'[' * half}1{']' * half}\nx: {'[' * half}*deep{']' * half}\n"
    line, _, message = only_problem(error_of(text))
    assert line == 3 and "alias *deep nests deeper than" in message and "MAX_CONFIG_DEPTH" in message


@pytest.mark.parametrize("text", ["version: 1\nx: &a [1, *a]\n", "version: 1\nx: &a {y: {z: *a}}\n"])
def test_an_alias_inside_its_own_anchor_is_refused(text: str) -> None:
    line, _, message = only_problem(error_of(text))
    assert line == 2 and "alias *a refers to itself" in message


def test_a_text_over_the_size_limit_is_refused_before_it_is_parsed() -> None:
    text = GOOD + "# " + "x" * MAX_CONFIG_BYTES + "\n"
    _, _, message = only_problem(error_of(text))
    assert f"over the {MAX_CONFIG_BYTES:,}-byte limit (MAX_CONFIG_BYTES)" in message


def test_a_huge_file_is_refused_without_being_read(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    with open(path, "wb") as f:
        f.write(GOOD.encode())
        f.truncate(64 * 2**30)  # sparse: 64 GiB that cost nothing on disk, and must cost nothing to refuse
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.perf_counter() - started < 1
    assert str(info.value) == f"{path}: is 68,719,476,736 bytes, over the 4,194,304-byte limit (MAX_CONFIG_BYTES)"
    assert peak_mb(lambda: load_config(path)) < 1


def test_a_pipe_or_a_device_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "router.yaml"
    os.mkfifo(fifo)  # no writer: opening it for reading would wait for one, forever
    answers: list[BaseException | object] = []

    def load(path: Path | str) -> None:
        try:
            answers.append(load_config(path))
        except BaseException as exc:
            answers.append(exc)

    for path in (fifo, "/dev/zero", "/dev/null"):
        thread = threading.Thread(target=load, args=(path,), daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), f"load_config({path}) hung"
        assert isinstance(answers[-1], ConfigError)
        assert str(answers[-1]) == (
            f"{path}: is not a regular file (a pipe, socket or device); point to the config file itself"
        )


def test_a_real_config_of_thousands_of_aliases_is_well_within_the_limits() -> None:
    aliases = "".join(
        f"  alias-{i}: {{targets: [a/model-{i}, [{{target: a/m-{i}-b, weight: 3}}, a/m-{i}-c]],"
        f" params: {{temperature: 0.2, max_tokens: 64}}, system: 'You are helper number {i}.'}}\n"
        for i in range(2000)
    )
    text = GOOD.replace("aliases:\n", "aliases:\n" + aliases)
    assert len(text.encode()) < MAX_CONFIG_BYTES / 8
    cfg = parse_config(text, "router.yaml", ENV)
    assert len(cfg.aliases) == 2001
    assert [t.model for t in cfg.targets("alias-1999")] == ["model-1999", "m-1999-b", "m-1999-c"]


def test_validate_on_the_bomb_exits_1_with_the_line_and_no_traceback_under_a_memory_limit(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())
    limit = 1 << 30  # 1 GiB of address space: before the fix the bomb died with MemoryError under 4 GiB

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(
        [str(Path(sys.executable).with_name("llm-router")), "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=cap,
    )
    assert proc.returncode == 1, proc.stderr
    said = f"{path}:7: alias *l4 expands the document past {MAX_CONFIG_NODES:,} values (MAX_CONFIG_NODES)"
    assert said in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "text",
    [
        bomb(),
        "version: 1\nx: " + "[" * 5_000 + "1" + "]" * 5_000 + "\n",
        "version: 1\n" + "".join("  " * i + f"k{i}:\n" for i in range(200)),
        "version: 1\nx: &a {y: *a}\n",
        "version: 1\nx: !!python/object/apply:os.system [ls]\n",
        "version: 1\nx: 2024-01-01\nx: " + "9" * 50 + "\n",
    ],
)
def test_the_pure_python_loader_enforces_the_same_limits_as_libyamls(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PyYAML without libyaml falls back to its pure-Python parser: the composer that counts is the same
    with_c = error_of(text).problems
    monkeypatch.setattr(config, "_Loader", config._PyLoader)
    assert error_of(text).problems == with_c


# -- every other way a file can be wrong ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_value", "tag"),
    [
        ("!!python/object/apply:os.system [echo pwned]", "!!python/object/apply:os.system"),
        ("!!python/name:os.system ''", "!!python/name:os.system"),
        ("!!python/object:router.Router {}", "!!python/object:router.Router"),
        ("!!binary aGVsbG8=", "!!binary"),
        ("!!set {a, b}", "!!set"),
        ("!!omap [a: 1]", "!!omap"),
        ("!!timestamp 2024-01-01", "!!timestamp"),
        ("!Ref other", "!Ref"),
        ("!<tag:example.com,2024:thing> x", "tag:example.com,2024:thing"),
    ],
)
def test_a_tag_that_would_construct_an_object_is_refused_naming_its_line(yaml_value: str, tag: str) -> None:
    text = GOOD.replace("[a/model-a]}", f"[a/model-a], params: {{\n    x: {yaml_value}}}}}")
    line, _, message = only_problem(error_of(text))
    assert line == 7 and message.startswith(f"tag {tag} is not allowed")


def test_plain_tags_load_and_dates_and_equals_signs_stay_strings() -> None:
    text = textwrap.dedent(
        """\
        version: !!int "1"
        providers:
          a: {kind: !!str openai, api_key: !!str "${KEY_A}", api_base: "http://127.0.0.1:9/v1"}
        aliases:
          chat:
            targets: [a/model-2024-08-06]
            system: 2024-08-06
            params: {stop: !!seq [a], seed: !!float "1", at: 2001-12-14t21:59:43.10-05:00, eq: =, n: !!null ""}
        """
    )
    cfg = parse_config(text, "router.yaml", ENV)
    assert cfg.aliases["chat"].system == "2024-08-06"
    assert cfg.aliases["chat"].params == {
        "stop": ["a"],
        "seed": 1.0,
        "at": "2001-12-14t21:59:43.10-05:00",
        "eq": "=",
        "n": None,
    }
    assert cfg.targets("chat")[0].keys[0].secret.get_secret_value() == KEY_A


def test_merge_keys_build_providers_from_a_shared_anchor() -> None:
    text = textwrap.dedent(
        """\
        version: 1
        providers:
          a: &common {kind: openai, api_base: "http://127.0.0.1:9/v1", timeout_s: 7}
          b: {<<: *common, api_base: "http://127.0.0.1:10/v1"}
        aliases:
          chat: {targets: [a/m, b/m]}
        """
    )
    cfg = parse_config(text, "router.yaml", {})
    assert [(t.api_base, t.timeout_s) for t in cfg.targets("chat")] == [
        ("http://127.0.0.1:9/v1", 7.0),
        ("http://127.0.0.1:10/v1", 7.0),
    ]


def with_alias(alias: str = "", top: str = "", defaults: str = "") -> str:
    """GOOD plus one more alias line (flow YAML under `aliases:`), more top-level YAML, and more defaults."""
    text = GOOD.replace("aliases:\n", "aliases:\n" + (f"  {alias}\n" if alias else ""))
    return text.replace("{model: chat}", "{model: chat" + defaults + "}") + top


PLACES = [
    (
        lambda v: with_alias(top=f"pricing: {{a/model-a: {{input_per_1m: {v}, output_per_1m: 1}}}}\n"),
        "pricing.a/model-a.input_per_1m",
    ),
    (
        lambda v: with_alias(f"w: {{targets: [[{{target: a/model-a, weight: {v}}}, a/x]]}}"),
        "aliases.w.targets[0][0].weight",
    ),
    (lambda v: with_alias(defaults=f", deadline_s: {v}"), "defaults.deadline_s"),
    (
        lambda v: with_alias(f"p: {{targets: [a/model-a], params: {{temperature: {v}}}}}"),
        "aliases.p.params.temperature",
    ),
]


@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "-.inf", "1.0e+999", "-1.5e+400"])
@pytest.mark.parametrize(("render", "key_path"), PLACES)
def test_non_finite_numbers_are_refused_naming_the_key(value: str, render: Callable[[str], str], key_path: str) -> None:
    line, where, message = only_problem(error_of(render(value)))
    assert where == key_path and "finite" in message
    assert line is not None and line > 1


@pytest.mark.parametrize("value", ["'nan'", "'inf'", "'1e999'", "'-Infinity'"])
@pytest.mark.parametrize(("render", "key_path"), PLACES[:3])
def test_non_finite_numbers_spelled_as_strings_are_refused_too(
    value: str, render: Callable[[str], str], key_path: str
) -> None:
    _, where, message = only_problem(error_of(render(value)))
    assert where == key_path and "finite" in message


@pytest.mark.parametrize(
    ("text", "key_path", "bound"),
    [
        (
            with_alias(top="pricing: {a/model-a: {input_per_1m: 1e+300, output_per_1m: 1}}\n"),
            "pricing.a/model-a.input_per_1m",
            "1000000",
        ),
        (
            with_alias(top="pricing: {a/model-a: {input_per_1k: 1, output_per_1k: 5000}}\n"),
            "pricing.a/model-a.output_per_1k",
            "1000",
        ),
        (
            with_alias("w: {targets: [[{target: a/model-a, weight: 1.0e+300}, a/x]]}"),
            "aliases.w.targets[0][0].weight",
            "1000000",
        ),
    ],
)
def test_huge_prices_and_weights_are_refused(text: str, key_path: str, bound: str) -> None:
    _, where, message = only_problem(error_of(text))
    assert where == key_path and "less than or equal to" in message and bound in message


def test_an_integer_of_thousands_of_digits_is_refused_not_a_valueerror() -> None:
    line, _, message = only_problem(error_of(GOOD + "x: " + "9" * 5000 + "\n"))
    assert line == 7 and message == "integer of 5000 digits is too large"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ('!!int ""', "'' is not a valid !!int"),
        ("0b_", "'0b_' is not a valid !!int"),
        ("0x_", "'0x_' is not a valid !!int"),
        ("!!float abc", "'abc' is not a valid !!float"),
        ("!!bool maybe", "'maybe' is not a valid !!bool"),
    ],
)
def test_a_scalar_its_tag_cannot_read_is_refused_naming_its_line(value: str, shown: str) -> None:
    line, _, message = only_problem(error_of(GOOD + f"x: {value}\n"))
    assert (line, message) == (7, shown)


def test_an_env_value_that_holds_a_reference_is_not_expanded_again() -> None:
    env = {"KEY_A": "${KEY_A}", "HOST": "${HOST}${HOST}", "B": "${A}", "A": "${B}"}
    text = GOOD.replace("127.0.0.1:9", "${HOST}").replace("[a/model-a]}", "[a/model-a], system: '${A}${B}'}")
    cfg = parse_config(text, "router.yaml", env)
    assert cfg.targets("chat")[0].api_base == "http://${HOST}${HOST}/v1"
    assert cfg.aliases["chat"].system == "${B}${A}"
    assert cfg.targets("chat")[0].keys[0].secret.get_secret_value() == "${KEY_A}"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("${HOST", "${HOST"),
        ("http://${HOST:-${FALLBACK}}/v1", "${HOST:-${FALLBACK}}"),
        ("${1HOST}", "${1HOST}"),
        ("${HOST-default}", "${HOST-default}"),
        ("https://${HOST}/${PATH", "${PATH"),
    ],
)
def test_a_reference_that_is_not_one_is_refused_not_sent_as_text(value: str, shown: str) -> None:
    line, key_path, message = only_problem(error_of(GOOD.replace('"http://127.0.0.1:9/v1"', f"'{value}'")))
    assert (line, key_path) == (4, "providers.a.api_base")
    assert message.startswith(f"{shown!r} is not an env var reference: write ${{NAME}} or ${{NAME:-default}}")


def test_a_literal_dollar_brace_is_written_doubled() -> None:
    cfg = parse_config(GOOD.replace("[a/model-a]}", "[a/model-a], system: 'costs $${PRICE'}"), "r.yaml", ENV)
    assert cfg.aliases["chat"].system == "costs ${PRICE"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file must be a mapping with version, providers and aliases"),
        (b"# only a comment\n\n", "the file must be a mapping with version, providers and aliases"),
        (b"---\n...\n", "the file must be a mapping with version, providers and aliases"),
        (b"- a\n- b\n", "the file must be a mapping with version, providers and aliases"),
        (b"version: 1\n---\nversion: 1\n", "invalid YAML: expected a single document"),
        (b"version: 1\nx: \x00\n", "invalid YAML"),
        (GOOD.encode() + b"bad: \xff\xfe\n", "is not UTF-8 text; save the file as UTF-8"),
        (b"\xef\xbb\xbf" + GOOD.encode(), ""),  # a UTF-8 BOM is fine
    ],
)
def test_every_malformed_file_is_a_config_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "router.yaml"
    path.write_bytes(content)
    if not message:
        assert load_config(path, ENV).aliases["chat"]
        return
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    assert all(p.file == str(path) for p in info.value.problems)
    assert message in str(info.value)
    if b"\xff" in content:
        assert info.value.problems[0].line == 7


def test_a_directory_a_missing_file_and_a_dangling_link_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "gone.yaml")
    (tmp_path / "file.yaml").write_text(GOOD)
    for path, message in [
        (tmp_path, "is a directory, not a config file"),
        (tmp_path / "missing.yaml", "config file not found"),
        (tmp_path / "dangling.yaml", "config file not found"),
        (tmp_path / "missing-dir" / "x.yaml", "config file not found"),
        (tmp_path / "file.yaml" / "x.yaml", "cannot read: Not a directory"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value) == f"{path}: {message}"


def test_a_file_rewritten_in_place_while_it_is_read_gives_one_whole_version_or_a_config_error(
    tmp_path: Path,
) -> None:
    # An editor that writes in place truncates, then writes: a reader can meet an empty file, half of one, or
    # (across reads) the start of one version and the end of the next. Each load must give one whole version
    # or a ConfigError. The padding comes first, so half a version alone never validates.
    path = tmp_path / "router.yaml"
    versions = [("#" * (20_000 + 997 * n) + "\n" + GOOD.replace("model-a", f"model-{n}")).encode() for n in range(3)]
    shas = {hashlib.sha256(v).hexdigest(): n for n, v in enumerate(versions)}
    path.write_bytes(versions[0])
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            data = versions[n % 3]
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(0.0005)
                f.write(data[len(data) // 2 :])
            time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    loaded: list[int] = []
    errors = 0
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                cfg = load_config(path, ENV)
            except ConfigError as exc:
                assert all(p.file == str(path) for p in exc.problems)
                errors += 1
                continue
            assert cfg.sha256 in shas, "a config that is no version of the file was loaded"
            assert cfg.targets("chat")[0].model == f"model-{shas[cfg.sha256]}"
            loaded.append(shas[cfg.sha256])
    finally:
        stop.set()
        thread.join()
    assert loaded and len(loaded) + errors > 20


# -- the reload path, under load --------------------------------------------------------------------------------


def reloads(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("llm_router_config_reloads_total", {"result": result}) or 0.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class RssPeak:
    """Samples this process's resident memory every 5 ms in a thread; `.peak` is the highest seen."""

    def __init__(self) -> None:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def bad_files(tmp_path: Path) -> list[tuple[str, Callable[[Path], None]]]:
    """Ways to wreck the live file, each with what writing it does (atomically, as editors do)."""

    def atomic(data: bytes) -> Callable[[Path], None]:
        def put(path: Path) -> None:
            tmp = path.with_name("incoming.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)

        return put

    def huge(path: Path) -> None:
        tmp = path.with_name("incoming.tmp")
        with open(tmp, "wb") as f:
            f.truncate(16 * 2**30)
        os.replace(tmp, path)

    def fifo(path: Path) -> None:  # a pipe with no writer: opening it to read would wait forever
        tmp = path.with_name("incoming.tmp")
        os.mkfifo(tmp)
        os.replace(tmp, path)

    def directory(path: Path) -> None:
        os.unlink(path)
        os.mkdir(path)

    return [
        ("alias bomb", atomic(bomb().encode())),
        ("16 GiB", huge),
        ("object tag", atomic(b"version: 1\nproviders: !!python/object/apply:os.system [echo pwned]\n")),
        ("deep", atomic(b"version: 1\nx: " + b"[" * 100_000 + b"\n")),
        ("not UTF-8", atomic(b"version: 1\n\xff\xfe\n")),
        ("pipe", fifo),
        ("directory", directory),  # last: nothing can be renamed over it
    ]


@pytest.fixture
def live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, up: Upstream, registry: CollectorRegistry, sleeps: Sleeps
) -> Iterator[tuple[Path, Callable[..., Router]]]:
    """A config file whose providers point at the upstream, and a maker of Routers on it (closed after)."""
    for name, value in (("KEY_A", KEY_A), ("KEY_B", KEY_B), ("KEY_C", KEY_C)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LLM_ROUTER_DISABLED_PROVIDERS", raising=False)
    path = tmp_path / "router.yaml"
    path.write_text(standard_config().replace("{UP}", up.url))
    made: list[Router] = []

    def make(**kwargs: Any) -> Router:
        r = Router.from_yaml(path, registry=registry, sleep=sleeps.sleep, asleep=sleeps.asleep, **kwargs)
        made.append(r)
        return r

    yield path, make
    for r in made:
        r.close()


def hold_replies(up: Upstream) -> threading.Event:
    """Every reply waits for the returned gate, so calls stay in flight until the test lets them go."""
    gate = threading.Event()

    def held(rec: Received) -> Reply:
        gate.wait(30)
        return Reply(text=f"{rec.route}:{rec.model}")

    for route in "abc":
        up.set_default(route, held)
    return gate


def wait_until(cond: Callable[[], bool], timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not cond():
        time.sleep(0.01)
    return cond()


@pytest.mark.asyncio
async def test_bad_files_written_over_the_live_file_during_200_calls_are_rejected_counted_and_fail_none(
    live: tuple[Path, Callable[..., Router]], up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    path, make = live
    r = make(watch=True, poll_s=0.02)
    good_sha = r.config.sha256
    gate = hold_replies(up)
    calls = 200
    tasks = [asyncio.create_task(r.agenerate(f"call {i}")) for i in range(calls)]
    in_flight = lambda: registry.get_sample_value("llm_router_in_flight", {"alias": "chat"})  # noqa: E731
    assert await asyncio.to_thread(wait_until, lambda: len(up.history) == calls, 30)
    assert in_flight() == calls

    before = rss_mb()
    sampler = RssPeak()
    for n, (what, put) in enumerate(bad_files(tmp_path), 1):
        await asyncio.to_thread(put, path)
        counted = await asyncio.to_thread(wait_until, lambda n=n: reloads(registry, "error") == n, 10)
        assert counted, f"{what}: not rejected"
        assert r.config.sha256 == good_sha, what
    grew = sampler.stop() - before
    assert in_flight() == calls  # every call was still waiting on its reply while the files went by

    gate.set()
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)
    failures = [x for x in done if not isinstance(x, Result)]
    assert failures == []
    assert sorted(x.text for x in done if isinstance(x, Result)) == ["a:model-a"] * calls
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "chat", "outcome": "success"}) == calls
    assert reloads(registry, "error") == len(bad_files(tmp_path)) and reloads(registry, "success") == 0
    assert grew < 50, f"resident memory grew {grew:.0f} MB while the bad files were rejected"
    # and the router still serves, on the last good config
    assert (await r.agenerate("after")).text == "a:model-a"


def test_reload_of_bad_files_from_another_thread_while_threads_call_fails_none(
    live: tuple[Path, Callable[..., Router]], up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    path, make = live
    r = make()
    gate = hold_replies(up)
    calls = 50
    results: list[Result] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        try:
            res = r.generate(f"call {i}")
            with lock:
                results.append(res)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(calls)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(up.history) == calls, 30)
    before = rss_mb()
    sampler = RssPeak()
    outcomes = []
    for _, put in bad_files(tmp_path):
        put(path)
        outcomes.append(r.reload())
    grew = sampler.stop() - before
    gate.set()
    for t in threads:
        t.join(60)

    assert outcomes == [False] * len(outcomes)
    assert errors == [] and len(results) == calls
    assert all(res.text == "a:model-a" for res in results)
    assert reloads(registry, "error") == len(outcomes) and reloads(registry, "success") == 0
    assert grew < 50, f"resident memory grew {grew:.0f} MB while the bad files were rejected"


class Heartbeat:
    """A thread that wakes every 5 ms; `.longest` is the longest it ever waited for its turn (the GIL)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(0.005)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.longest


HOSTILE_4MIB = {
    # one scalar of `${A:-` with no closing brace: the issue's file, quadratic until the scan was made linear
    "dollar-default": "version: 1\nx: '" + "${A:-" * ((MAX_CONFIG_BYTES - 64) // 5) + "'\n",
    # as many aliases as the node limit lets through, each naming a provider that is not there
    "unknown-providers": "version: 1\nproviders:\n"
    + "".join(f"  prov{i}: {{kind: openai}}\n" for i in range(16_000))
    + "aliases:\n"
    + "".join(f"  al{i}: {{targets: [nope{i}/m]}}\n" for i in range(30_000)),
}


@pytest.mark.parametrize("name", list(HOSTILE_4MIB))
def test_a_watching_router_reloading_a_hostile_file_keeps_its_threads_running_and_serves(
    name: str, live: tuple[Path, Callable[..., Router]], up: Upstream, registry: CollectorRegistry
) -> None:
    path, make = live
    up.set_default("a", Reply(text="served"))
    r = make(watch=True, poll_s=0.02)
    assert r.generate("warm up").text == "served"  # LiteLLM's first import holds the GIL for a while: not ours
    good_sha = r.config.sha256
    text = HOSTILE_4MIB[name]
    assert len(text.encode()) < MAX_CONFIG_BYTES
    heartbeat = Heartbeat()
    tmp = path.with_name("incoming.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    rejected = wait_until(lambda: reloads(registry, "error") == 1, 30)
    served = r.generate("during")  # a call made right after the reload still gets its answer
    longest = heartbeat.stop()
    assert rejected, "the hostile file was not rejected within 30 s"
    assert r.config.sha256 == good_sha and served.text == "served"
    # The issue saw 12.6 s: a reload held the GIL in one regex call. Linear Python work lets go every 5 ms.
    assert longest < 0.5, f"a thread waited {longest:.2f}s for its turn while the file was checked"
