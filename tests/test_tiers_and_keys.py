"""Weighted tiers, key pools and `explain`: how traffic is shared, which key each request carries, and what an
operator is shown.

Tier order is a pure function of the draws (`order_tier`), tested as a table; end to end the Router gets a
seeded `random.Random`, and shares are asserted within a statistical tolerance, not to the call. Which key
a request carried is read from the Authorization header the upstream received.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from conftest import KEY_A, KEY_B, KEY_C, MakeRouter, Sleeps, standard_env
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import SecretStr

from router import AllTargetsFailedError, RouterError, Skip
from router.config import ApiKey, Target
from router.policy import order_tier, order_tiers, plan_targets, static_skip
from router.sandbox import Reply, Upstream

ROOT = Path(__file__).resolve().parents[1]
KA1 = "sk-pool-one-1111111111aaaa"
KA2 = "sk-pool-two-2222222222bbbb"
TEAM_A = "sk-team-a-3333333333cccc"
TEAM_B = "sk-team-b-4444444444dddd"
SECRETS = (KEY_A, KEY_B, KEY_C, KA1, KA2, TEAM_A, TEAM_B)


def config(chat: str, *, a_key: str = '"${KEY_A}"', circuit: str = "{cooldown_s: 60}", attempts: int = 1) -> str:
    """Providers a, b, c on the upstream; `chat` is the alias's target list, `a_key` provider a's api_key."""
    return f"""
    version: 1
    defaults:
      model: chat
      timeout_s: 5
      deadline_s: 20
      retry: {{attempts: {attempts}, backoff_s: 0.1, max_backoff_s: 1}}
      circuit: {circuit}
    providers:
      a: {{kind: openai, api_base: "{{UP}}/a/v1", api_key: {a_key}}}
      b: {{kind: openai, api_base: "{{UP}}/b/v1", api_key: "${{KEY_B}}"}}
      c: {{kind: openai, api_base: "{{UP}}/c/v1", api_key: "${{KEY_C}}"}}
    aliases:
      chat: {{targets: {chat}}}
      direct: {{targets: [a/model-a]}}
    pricing:
      a/model-a: {{input_per_1m: 2.5, output_per_1m: 10}}
    """


WEIGHTED = "[[{target: a/model-a, weight: 3}, {target: b/model-b, weight: 1}], c/model-c]"
CANARY = "[[{target: a/model-a, weight: 0}, {target: b/model-b, weight: 100}], c/model-c]"
EVEN = "[[{target: a/model-a, weight: 1}, {target: b/model-b, weight: 1}], c/model-c]"
POOL = '["${KA1}", "${KA2}"]'
NAMED = '[{name: team-a, key: "${TEAM_A}"}, {name: team-b, key: "${TEAM_B}"}]'


def env(**extra: str) -> dict[str, str]:
    return {**standard_env(), "KA1": KA1, "KA2": KA2, "TEAM_A": TEAM_A, "TEAM_B": TEAM_B, **extra}


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def routes(up: Upstream) -> list[str]:
    return [r.route for r in up.history]


def keys_seen(up: Upstream, route: str = "a") -> list[str]:
    """The key each request to `route` carried, by its variable name in this file."""
    names = {KA1: "KA1", KA2: "KA2", TEAM_A: "TEAM_A", TEAM_B: "TEAM_B", KEY_A: "KEY_A"}
    out = []
    for rec in up.requests(route):
        auth = rec.headers.get("authorization", "")
        assert auth.startswith("Bearer ")
        out.append(names.get(auth.removeprefix("Bearer "), "?"))
    return out


def label(secret: str) -> str:
    """The metric label of an unnamed key."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def key_requests(registry: CollectorRegistry, key: str, provider: str = "a") -> float:
    return registry.get_sample_value("llm_router_key_requests_total", {"provider": provider, "key": key}) or 0.0


def skipped(registry: CollectorRegistry, provider: str, reason: str, model: str | None = None) -> float:
    labels = {"alias": "chat", "provider": provider, "model": model or f"model-{provider}", "reason": reason}
    return registry.get_sample_value("llm_router_skipped_total", labels) or 0.0


# -- order_tier: a weighted draw without replacement, as a table ---------------------------------------------

def target(name: str, weight: float = 1.0, keys: tuple[ApiKey, ...] = (), enabled: bool = True) -> Target:
    return Target(
        provider=name, model=f"model-{name}", kind="openai", api_base=None, keys=keys, headers={}, timeout_s=5,
        params={}, weight=weight, enabled=enabled,
    )


A3, B1 = target("a", 3), target("b", 1)
P1, Q1, R2, Z0 = target("p"), target("q"), target("r", 2), target("z", 0)

ORDER_CASES = {
    "low draw picks the heavy member": ([A3, B1], [0.0, 0.0], ["a", "b"]),
    "draw just under 3/4 still picks a": ([A3, B1], [0.74, 0.9], ["a", "b"]),
    "draw at 3/4 picks b": ([A3, B1], [0.75, 0.0], ["b", "a"]),
    "draw near 1 picks the last member": ([A3, B1], [0.999, 0.5], ["b", "a"]),
    "second draw orders the rest": ([P1, Q1, R2], [0.5, 0.0, 0.0], ["r", "p", "q"]),
    "second draw over the rest's weights": ([P1, Q1, R2], [0.1, 0.99, 0.0], ["p", "r", "q"]),
    "zero weight goes last, whatever the draws": ([Z0, P1, Q1], [0.9, 0.9, 0.9], ["q", "p", "z"]),
    "zero weight last with low draws too": ([Z0, P1, Q1], [0.0, 0.0, 0.0], ["p", "q", "z"]),
}


@pytest.mark.parametrize("tier, draws, expected", ORDER_CASES.values(), ids=ORDER_CASES.keys())
def test_order_tier_table(tier: list[Target], draws: list[float], expected: list[str]) -> None:
    assert [t.provider for t in order_tier(tier, draws)] == expected


def test_order_tiers_draws_only_for_shared_tiers_and_keeps_tier_order() -> None:
    draws = iter([0.8, 0.1])
    used: list[float] = []

    def draw() -> float:
        used.append(next(draws))
        return used[-1]

    got = order_tiers([(P1,), (A3, B1), (Z0,)], draw)

    assert [t.provider for t in got] == ["p", "b", "a", "z"]
    assert used == [0.8, 0.1]  # one per member of the shared tier, none for the tiers of one


KEY = ApiKey.make(SecretStr(KEY_A), None, ("KEY_A",))
NO_KEY = ApiKey.make(SecretStr(""), None, ("KEY_X",))
TEAM = ApiKey.make(SecretStr(TEAM_A), "team-a", ("TEAM_A",))

SKIP_CASES = {
    "usable": (target("a", keys=(KEY,)), frozenset(), None, None),
    "enabled: false": (target("a", keys=(KEY,), enabled=False), frozenset(), None, "disabled"),
    "disabled by env": (target("a", keys=(KEY,)), frozenset({"a"}), None, "disabled"),
    "disabled wins over a missing key": (target("a", keys=(NO_KEY,)), frozenset({"a"}), None, "disabled"),
    "missing key": (target("a", keys=(NO_KEY,)), frozenset({"b"}), None, "no_credentials"),
    "pool with one key set is usable": (target("a", keys=(NO_KEY, KEY)), frozenset(), None, None),
    "pinned key present": (target("a", keys=(KEY, TEAM)), frozenset(), "team-a", None),
    "pinned key absent": (target("a", keys=(KEY,)), frozenset(), "team-a", "key_not_in_pool"),
    "no key configured": (target("a"), frozenset(), None, None),
}


@pytest.mark.parametrize("t, disabled, pinned, reason", SKIP_CASES.values(), ids=SKIP_CASES.keys())
def test_static_skip_table(t: Target, disabled: frozenset[str], pinned: str | None, reason: str | None) -> None:
    skip = static_skip(t, disabled, pinned)
    assert (skip.reason if skip else None) == reason
    usable, skips = plan_targets([t], None, disabled, pinned)
    assert (len(usable), len(skips)) == ((1, 0) if reason is None else (0, 1))


# -- weighted tiers end to end --------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_three_to_one_tier_shares_traffic_about_three_to_one(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    r = make_router(config(WEIGHTED), rng=random.Random(20240604))
    calls = 400

    results = []
    for start in range(0, calls, 50):
        results += await asyncio.gather(*(r.agenerate(f"q{i}") for i in range(start, start + 50)))

    share = Counter(res.provider for res in results)
    assert set(share) == {"a", "b"}  # c, the next entry, is never needed
    assert 0.70 <= share["a"] / calls <= 0.80
    assert share["a"] + share["b"] == calls
    assert Counter(routes(up)) == share
    assert all(res.fallbacks == 0 for res in results)
    assert registry.get_sample_value("llm_router_fallbacks_total", {
        "alias": "chat", "from_provider": "a", "to_provider": "b", "reason": "server_error"}) is None


def test_a_canary_at_zero_takes_no_traffic_but_is_the_in_tier_fallback(
    make_router: MakeRouter, up: Upstream
) -> None:
    r = make_router(config(CANARY), rng=random.Random(7))

    assert {r.generate(f"q{i}").provider for i in range(30)} == {"b"}
    assert routes(up) == ["b"] * 30

    up.enqueue("b", Reply(status=503))
    res = r.generate("b down")

    assert [(a.provider, a.outcome) for a in res.attempts] == [("b", "server_error"), ("a", "success")]
    assert routes(up)[30:] == ["b", "a"]


class Draws(random.Random):
    """An rng whose every draw is `value`: the tier order is then fixed (see the order_tier table)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


# An even tier: a draw of 0.1 puts a first, 0.9 puts b first.
@pytest.mark.parametrize("draw, first, second", [(0.1, "a", "b"), (0.9, "b", "a")])
def test_a_failing_tier_member_falls_back_to_its_tier_mate_before_the_next_entry(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, draw: float, first: str, second: str
) -> None:
    r = make_router(config(EVEN), rng=Draws(draw))
    up.enqueue(first, Reply(status=503))

    res = r.generate("one member down")

    assert [(a.provider, a.outcome) for a in res.attempts] == [(first, "server_error"), (second, "success")]
    assert routes(up) == [first, second]
    labels = {"alias": "chat", "from_provider": first, "to_provider": second, "reason": "server_error"}
    assert registry.get_sample_value("llm_router_fallbacks_total", labels) == 1


@pytest.mark.parametrize("draw, first, second", [(0.1, "a", "b"), (0.9, "b", "a")])
def test_when_the_whole_tier_fails_the_next_entry_answers(
    make_router: MakeRouter, up: Upstream, draw: float, first: str, second: str
) -> None:
    r = make_router(config(EVEN), rng=Draws(draw))
    up.enqueue("a", Reply(status=503))
    up.enqueue("b", Reply(status=503))

    res = r.generate("tier down")

    assert [(a.provider, a.outcome) for a in res.attempts] == [
        (first, "server_error"), (second, "server_error"), ("c", "success")]
    assert routes(up) == [first, second, "c"]
    assert res.fallbacks == 2


def test_a_skipped_tier_member_leaves_the_traffic_to_its_tier_mate(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    r = make_router(config(WEIGHTED), env=env(KEY_A=""), rng=random.Random(1))

    results = [r.generate(f"q{i}") for i in range(10)]

    assert {res.provider for res in results} == {"b"}
    assert all(Skip("a", "model-a", "no_credentials", ("KEY_A",)) in res.skipped for res in results)
    assert skipped(registry, "a", "no_credentials") == 10
    assert "a" not in routes(up)


# -- key pools ------------------------------------------------------------------------------------------------

def test_a_key_pool_is_used_round_robin(make_router: MakeRouter, up: Upstream, registry: CollectorRegistry) -> None:
    r = make_router(config("[a/model-a, b/model-b]", a_key=POOL), env=env())

    for i in range(5):
        assert r.generate(f"q{i}").provider == "a"

    assert keys_seen(up) == ["KA1", "KA2", "KA1", "KA2", "KA1"]
    assert (key_requests(registry, label(KA1)), key_requests(registry, label(KA2))) == (3, 2)


def test_a_key_answered_401_is_benched_for_the_cooldown_while_the_other_carries_on(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, sleeps: Sleeps
) -> None:
    clock = FakeClock()
    r = make_router(config("[a/model-a, b/model-b]", a_key=POOL), env=env(), clock=clock)
    up.enqueue("a", Reply(status=401, error="Incorrect API key provided"))

    first = r.generate("KA1 revoked")

    assert (first.provider, [(a.provider, a.outcome) for a in first.attempts]) == (
        "a", [("a", "auth"), ("a", "success")])
    assert keys_seen(up) == ["KA1", "KA2"]
    assert sleeps == []
    for i in range(3):
        clock.advance(19)
        assert r.generate(f"benched {i}").provider == "a"
    assert keys_seen(up)[2:] == ["KA2"] * 3
    # The refused key said nothing about the target: its breaker is untouched.
    assert registry.get_sample_value("llm_router_circuit_state", {"provider": "a", "model": "model-a"}) is None

    clock.advance(3)  # 60 s after the 401
    r.generate("back")
    r.generate("and rotating")
    assert keys_seen(up)[5:] == ["KA1", "KA2"]
    assert routes(up).count("b") == 0


def test_a_402_benches_the_key_too(make_router: MakeRouter, up: Upstream) -> None:
    clock = FakeClock()
    r = make_router(config("[a/model-a, b/model-b]", a_key=POOL), env=env(), clock=clock)
    up.enqueue("a", Reply(status=402, error="insufficient credits"))

    r.generate("out of credit")
    r.generate("next")
    r.generate("next again")

    assert keys_seen(up) == ["KA1", "KA2", "KA2", "KA2"]


def test_every_key_of_a_pool_refused_falls_back_then_skips_the_provider(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    clock = FakeClock()
    r = make_router(config("[a/model-a, b/model-b]", a_key=POOL), env=env(), clock=clock)
    up.enqueue("a", Reply(status=401), Reply(status=401))

    first = r.generate("both keys revoked")
    second = r.generate("pool benched")

    assert [(a.provider, a.outcome) for a in first.attempts] == [("a", "auth"), ("a", "auth"), ("b", "success")]
    assert keys_seen(up) == ["KA1", "KA2"]
    assert (second.provider, second.skipped) == ("b", (Skip("a", "model-a", "keys_benched"),))
    assert routes(up) == ["a", "a", "b", "b"]
    assert skipped(registry, "a", "keys_benched") == 1


def test_a_429_moves_to_the_next_key_before_the_next_target_without_waiting(
    make_router: MakeRouter, up: Upstream, sleeps: Sleeps
) -> None:
    r = make_router(config("[a/model-a, b/model-b]", a_key=POOL, attempts=2), env=env())
    up.enqueue("a", Reply(status=429, headers={"Retry-After": "5"}))

    res = r.generate("rate limited")

    assert [(a.provider, a.outcome) for a in res.attempts] == [("a", "rate_limit"), ("a", "success")]
    assert keys_seen(up) == ["KA1", "KA2"]
    assert routes(up) == ["a", "a"]
    assert sleeps == []
    # A rate limit does not bench the key: it is next in turn again.
    r.generate("next")
    assert keys_seen(up)[2:] == ["KA1"]


def test_a_pinned_key_is_carried_by_every_request_and_not_rotated_on_429(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, sleeps: Sleeps
) -> None:
    r = make_router(config("[a/model-a, b/model-b]", a_key=NAMED, attempts=2), env=env())
    up.enqueue("a", Reply(status=429))

    results = [r.generate(f"team a {i}", key="team-a") for i in range(3)]

    assert [res.provider for res in results] == ["a"] * 3
    assert keys_seen(up) == ["TEAM_A"] * 4  # the 429 was retried on the same key
    assert len(sleeps) == 1
    assert [a.outcome for a in results[0].attempts] == ["rate_limit", "success"]
    # b has no key named team-a: a pinned call never spends it.
    assert "b" not in routes(up)
    assert all(Skip("b", "model-b", "key_not_in_pool") in res.skipped for res in results)
    assert (key_requests(registry, "team-a"), key_requests(registry, "team-b")) == (4, 0)
    # Unpinned calls use the whole pool in turn.
    r.generate("anyone")
    r.generate("anyone else")
    assert keys_seen(up)[4:] == ["TEAM_A", "TEAM_B"]


def test_a_pinned_key_rate_limited_to_the_end_fails_without_touching_other_keys(
    make_router: MakeRouter, up: Upstream
) -> None:
    r = make_router(config("[a/model-a, b/model-b]", a_key=NAMED, attempts=2), env=env())
    up.enqueue("a", Reply(status=429), Reply(status=429))

    with pytest.raises(AllTargetsFailedError) as info:
        r.generate("team b", key="team-b")

    assert [a.outcome for a in info.value.attempts] == ["rate_limit", "rate_limit"]
    assert keys_seen(up) == ["TEAM_B", "TEAM_B"]


def test_a_revoked_pinned_key_does_not_take_the_provider_out_for_the_other_keys(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    """team-a's key is refused three times (the breaker's threshold): team-b's calls must still reach a."""
    r = make_router(config("[a/model-a, b/model-b]", a_key=NAMED, circuit="{failure_threshold: 3, cooldown_s: 60}"),
                    env=env())
    up.enqueue("a", *[Reply(status=401, error="key revoked")] * 3)
    for i in range(3):
        with pytest.raises(AllTargetsFailedError):
            r.generate(f"team a {i}", key="team-a")

    res = r.generate("team b", key="team-b")

    assert (res.provider, res.skipped) == ("a", (Skip("b", "model-b", "key_not_in_pool"),))
    assert keys_seen(up) == ["TEAM_A"] * 3 + ["TEAM_B"]
    assert registry.get_sample_value("llm_router_circuit_state", {"provider": "a", "model": "model-a"}) in (None, 0)


def test_an_unknown_key_name_is_an_error_before_any_request(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(config("[a/model-a, b/model-b]", a_key=NAMED), env=env())

    with pytest.raises(RouterError, match="team-c") as info:
        r.generate("who?", key="team-c")

    assert "team-a" in str(info.value) and "team-b" in str(info.value)
    assert up.history == []


def test_key_metrics_use_names_or_hashes_and_never_a_key(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    pool = make_router(config("[a/model-a]", a_key=POOL), env=env())
    for i in range(3):
        pool.generate(f"pool {i}")
    named = make_router(config("[a/model-a]", a_key=NAMED), env=env())
    named.generate("named", key="team-b")
    up.enqueue("a", Reply(status=401, error=f"Incorrect API key provided: {KA2}"))
    pool.generate("refused")

    exposition = generate_latest(registry).decode()

    assert key_requests(registry, label(KA1)) == 3
    assert key_requests(registry, label(KA2)) == 2
    assert key_requests(registry, "team-b") == 1
    for secret in SECRETS:
        assert secret not in exposition
        assert secret[-8:] not in exposition


# -- explain ----------------------------------------------------------------------------------------------------

EXPLAIN_CHAT = "[[{target: a/model-a, weight: 3}, {target: b/model-b, weight: 1}], c/model-c, d/model-d]"


def explain_config(up_url: str) -> str:
    text = config(EXPLAIN_CHAT, a_key=POOL).replace(
        '    aliases:',
        '      d: {kind: openai, api_base: "{UP}/d/v1", api_key: "${KEY_D}", enabled: false}\n    aliases:',
    )
    return textwrap.dedent(text).replace("{UP}", up_url)


def lines_after(text: str, needle: str) -> str:
    """The line naming `needle` and the detail line under it."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if needle in line)
    return lines[i] + "\n" + lines[i + 1]


def test_explain_shows_weights_skips_and_prices_but_no_key(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(explain_config("{UP}"), env=env(KEY_C="", KEY_D="sk-dddd-0123456789"))

    text = r.explain("chat")

    assert "75% a/model-a" in text and "25% b/model-b" in text
    a = lines_after(text, "a/model-a")
    assert f"{label(KA1)} ($KA1), {label(KA2)} ($KA2)" in a
    assert "price: $2.5 in / $10 out per 1M tokens" in a
    assert "MISSING: set KEY_C" in lines_after(text, "c/model-c")
    assert "disabled in the config (enabled: false)" in lines_after(text, "d/model-d")
    assert "SKIPPED" not in a and "SKIPPED" not in lines_after(text, "b/model-b")
    for secret in (*SECRETS, "sk-dddd-0123456789"):
        assert secret not in text


def test_explain_shows_a_canary_at_zero_percent(make_router: MakeRouter) -> None:
    r = make_router(config(CANARY), env=env())

    text = r.explain("chat")

    assert "0% a/model-a" in text and "100% b/model-b" in text


def cli_env(**extra: str) -> dict[str, str]:
    drop = {"KEY_A", "KEY_B", "KEY_C", "KEY_D", "KA1", "KA2", "TEAM_A", "TEAM_B", "LLM_ROUTER_DISABLED_PROVIDERS"}
    out = {k: v for k, v in os.environ.items() if k not in drop}
    out["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    out.update(extra)
    return out


def test_cli_explain_prints_the_plan_without_importing_litellm_or_showing_a_key(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(explain_config("http://127.0.0.1:9"))
    code = (
        "import sys\n"
        "from router.cli import main\n"
        f"code = main(['explain', {str(path)!r}, 'chat'])\n"
        "assert 'litellm' not in sys.modules, 'explain imported litellm'\n"
        "sys.exit(code)\n"
    )
    secrets = {"KA1": KA1, "KA2": KA2, "KEY_B": KEY_B, "KEY_D": "sk-dddd-0123456789"}

    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
        env=cli_env(**secrets, LLM_ROUTER_DISABLED_PROVIDERS="b"),
    )

    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "75% a/model-a" in out and "25% b/model-b" in out
    assert "disabled by LLM_ROUTER_DISABLED_PROVIDERS" in lines_after(out, "b/model-b")
    assert "MISSING: set KEY_C" in lines_after(out, "c/model-c")
    assert "disabled in the config (enabled: false)" in lines_after(out, "d/model-d")
    assert "price: $2.5 in / $10 out per 1M tokens" in lines_after(out, "a/model-a")
    for secret in (*SECRETS, *secrets.values()):
        assert secret not in out + proc.stderr


def test_cli_explain_names_the_missing_key_of_a_pool(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(explain_config("http://127.0.0.1:9"))

    proc = subprocess.run(
        [sys.executable, "-m", "router.cli", "explain", str(path), "chat"], capture_output=True, text=True,
        cwd=ROOT, timeout=60, env=cli_env(KA1=KA1),
    )

    assert proc.returncode == 0, proc.stderr
    assert f"{label(KA1)} ($KA1), MISSING: set KA2" in proc.stdout
    assert KA1 not in proc.stdout + proc.stderr
