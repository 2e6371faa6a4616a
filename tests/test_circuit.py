"""Circuit breakers: a failing target is taken out of rotation without a request, probed after its cooldown,
and put back when the probe succeeds.

Time is a fake monotonic clock the tests move by hand, so cooldowns pass without waiting. The pure
`admit`/`record` transitions are tested as tables first; then the same behaviour end to end, read back from
the upstream's history (a skipped target gets no request) and from the circuit metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import MakeRouter, standard_env
from prometheus_client import CollectorRegistry

from router import AllTargetsFailedError, ProviderError, Router, Skip
from router.config import CircuitConfig
from router.health import Admission, Circuit, MemoryCircuitStore, admit, record
from router.sandbox import Received, Reply, Upstream


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def config(circuit: str, *, chat: str = "[a/model-a, b/model-b, c/model-c]", a: str = "", b: str = "") -> str:
    """Providers a, b, c on the upstream; one try per target, so each failing call counts once."""
    return f"""
    version: 1
    defaults:
      model: chat
      timeout_s: 5
      deadline_s: 20
      retry: {{attempts: 1}}
      circuit: {circuit}
    providers:
      a: {{kind: openai, api_base: "{{UP}}/a/v1", api_key: "${{KEY_A}}"{a}}}
      b: {{kind: openai, api_base: "{{UP}}/b/v1", api_key: "${{KEY_B}}"{b}}}
      c: {{kind: openai, api_base: "{{UP}}/c/v1", api_key: "${{KEY_C}}"}}
    aliases:
      chat: {{targets: {chat}}}
    """


THREE_STRIKES = "{failure_threshold: 3, cooldown_s: 30, failure_ratio: null}"


def routes(up: Upstream) -> list[str]:
    return [r.route for r in up.history]


def state(registry: CollectorRegistry, provider: str = "a", model: str = "model-a") -> float | None:
    return registry.get_sample_value("llm_router_circuit_state", {"provider": provider, "model": model})


def transitions(registry: CollectorRegistry, to: str, provider: str = "a", model: str = "model-a") -> float:
    labels = {"provider": provider, "model": model, "to": to}
    return registry.get_sample_value("llm_router_circuit_transitions_total", labels) or 0.0


def open_skips(registry: CollectorRegistry, provider: str = "a", model: str = "model-a") -> float:
    labels = {"alias": "chat", "provider": provider, "model": model, "reason": "circuit_open"}
    return registry.get_sample_value("llm_router_skipped_total", labels) or 0.0


def open_a(r: Router, up: Upstream) -> None:
    """Three calls on which a answers 503 (each falls back to b): a's breaker opens on the third."""
    up.enqueue("a", *[Reply(status=503)] * 3)
    for i in range(3):
        assert r.generate(f"strike {i}").provider == "b"
    assert routes(up) == ["a", "b"] * 3


# -- the pure transitions, as tables --------------------------------------------------------------------------

CFG = CircuitConfig(failure_threshold=3, failure_ratio=None, cooldown_s=30.0, window_s=60.0)
RATIO = CircuitConfig(failure_threshold=100, failure_ratio=0.5, min_requests=4, window_s=60.0, cooldown_s=30.0)

# (config, [(time, failed, probe)], expected state, expected transitions returned by record)
RECORD_CASES = {
    "two failures stay closed": (CFG, [(0, True, False), (1, True, False)], "closed", [None, None]),
    "third consecutive failure opens": (CFG, [(0, True, False)] * 3, "open", [None, None, "open"]),
    "a success resets the run": (
        CFG, [(0, True, False), (1, True, False), (2, False, False), (3, True, False), (4, True, False)],
        "closed", [None] * 5,
    ),
    "a neutral result (400) is no failure": (
        CFG, [(0, True, False), (1, None, False), (2, None, False), (3, True, False)], "closed", [None] * 4,
    ),
    "a neutral result (400) does not reset the run either": (
        CFG, [(0, True, False), (1, None, False), (2, True, False), (3, None, False), (4, True, False)],
        "open", [None, None, None, None, "open"],
    ),
    "failing again while open stays open, no new transition": (
        CFG, [(0, True, False)] * 4, "open", [None, None, "open", None],
    ),
    "ratio below min_requests does not count": (
        RATIO, [(0, True, False), (1, False, False), (2, True, False)], "closed", [None] * 3,
    ),
    "ratio reaching 0.5 over min_requests opens": (
        RATIO, [(0, False, False), (1, True, False), (2, False, False), (3, True, False)],
        "open", [None, None, None, "open"],
    ),
    "results older than the window drop out of the ratio": (
        RATIO, [(0, True, False), (1, True, False), (100, False, False), (101, False, False), (102, True, False),
                (103, False, False)],
        "closed", [None] * 6,
    ),
}


@pytest.mark.parametrize("cfg, results, expected, returned", RECORD_CASES.values(), ids=RECORD_CASES.keys())
def test_record_table(
    cfg: CircuitConfig, results: list[tuple[float, bool | None, bool]], expected: str, returned: list[str | None]
) -> None:
    c = Circuit()

    got = [record(c, cfg, now, failed, probe) for now, failed, probe in results]

    assert (c.state, got) == (expected, returned)


def opened_at(t: float, cfg: CircuitConfig = CFG) -> Circuit:
    c = Circuit()
    for _ in range(cfg.failure_threshold):
        record(c, cfg, t, True, False)
    assert c.state == "open"
    return c


ADMIT_CASES = {
    "closed lets everything through": (Circuit(), 0.0, Admission(True)),
    "open within the cooldown refuses, saying until when": (opened_at(0), 29.9, Admission(False, open_until=30.0)),
    "open after the cooldown lets one probe through": (
        opened_at(0), 30.0, Admission(True, probe=True, transition="half_open"),
    ),
    "half-open with a probe out refuses the rest": (
        dataclasses.replace(opened_at(0), state="half_open", probe_started=30.0), 31.0,
        Admission(False, open_until=60.0),
    ),
    "half-open whose probe never came back lets another probe through": (
        dataclasses.replace(opened_at(0), state="half_open", probe_started=30.0), 60.5, Admission(True, probe=True),
    ),
}


@pytest.mark.parametrize("c, now, expected", ADMIT_CASES.values(), ids=ADMIT_CASES.keys())
def test_admit_table(c: Circuit, now: float, expected: Admission) -> None:
    assert admit(dataclasses.replace(c), CFG, now) == expected


def test_probe_success_closes_and_probe_failure_reopens_for_a_full_cooldown() -> None:
    good, bad = opened_at(0), opened_at(0)
    assert admit(good, CFG, 30).probe and admit(bad, CFG, 30).probe
    assert (good.state, bad.state) == ("half_open", "half_open")

    assert record(good, CFG, 31, False, True) == "closed"
    assert record(bad, CFG, 31, True, True) == "open"

    assert (good.state, good.consecutive_failures) == ("closed", 0)
    assert (bad.state, bad.open_until) == ("open", 61.0)
    assert admit(bad, CFG, 60.9).allowed is False
    assert admit(bad, CFG, 61.0) == Admission(True, probe=True, transition="half_open")
    assert admit(good, CFG, 32) == Admission(True)


def test_a_neutral_probe_result_lets_the_next_request_probe() -> None:
    c = opened_at(0)
    assert admit(c, CFG, 30).probe

    assert record(c, CFG, 30.5, None, True) is None

    assert c.state == "half_open"
    assert admit(c, CFG, 30.6) == Admission(True, probe=True)


def test_memory_store_keeps_one_breaker_per_target() -> None:
    store = MemoryCircuitStore()
    for t in range(3):
        store.record("a/model-a", CFG, t, True, False)

    assert store.peek("a/model-a") == ("open", 32.0)
    assert store.peek("a/other") == ("closed", 0.0)
    assert store.admit("a/model-a", CFG, 10).allowed is False
    assert store.admit("b/model-b", CFG, 10) == Admission(True)


# -- end to end ---------------------------------------------------------------------------------------------

def test_three_consecutive_503s_open_the_circuit_and_calls_skip_it_without_a_request(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(config(THREE_STRIKES), clock=clock)
    up.enqueue("a", Reply(status=503), Reply(status=503))
    r.generate("1")
    r.generate("2")
    assert state(registry) is None  # two strikes: still closed, nothing changed
    up.enqueue("a", Reply(status=503))
    r.generate("3")
    assert (state(registry), transitions(registry, "open")) == (2, 1)

    clock.advance(29)
    results = [r.generate(f"open {i}") for i in range(4)]

    assert routes(up) == ["a", "b"] * 3 + ["b"] * 4
    assert [res.provider for res in results] == ["b"] * 4
    assert all(res.skipped == (Skip("a", "model-a", "circuit_open"),) for res in results)
    assert all([a.provider for a in res.attempts] == ["b"] for res in results)
    assert open_skips(registry) == 4
    assert transitions(registry, "open") == 1
    assert registry.get_sample_value(
        "llm_router_attempts_total", {"alias": "chat", "provider": "a", "model": "model-a", "outcome": "server_error"}
    ) == 3


def test_after_the_cooldown_one_probe_goes_through_and_its_success_closes_the_circuit(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(config(THREE_STRIKES), clock=clock)
    open_a(r, up)
    seen_during_probe: list[float | None] = []

    def probe(rec: Received) -> Reply:
        seen_during_probe.append(state(registry))
        return Reply(text="a is back")

    up.enqueue("a", probe)
    clock.advance(30)

    res = r.generate("probe")

    assert (res.provider, res.text, res.skipped) == ("a", "a is back", ())
    assert seen_during_probe == [1]  # half-open while the probe was out
    assert state(registry) == 0
    assert [transitions(registry, to) for to in ("open", "half_open", "closed")] == [1, 1, 1]
    assert r.generate("after").provider == "a"
    assert routes(up) == ["a", "b"] * 3 + ["a", "a"]


def test_a_failed_probe_reopens_the_circuit_for_another_cooldown(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(config(THREE_STRIKES), clock=clock)
    open_a(r, up)
    up.enqueue("a", Reply(status=503))
    clock.advance(30)

    res = r.generate("probe fails")

    assert (res.provider, [(a.provider, a.outcome) for a in res.attempts]) == (
        "b", [("a", "server_error"), ("b", "success")]
    )
    assert state(registry) == 2
    assert [transitions(registry, to) for to in ("open", "half_open", "closed")] == [2, 1, 0]
    # Open again from the failed probe, for a whole cooldown.
    clock.advance(29)
    assert r.generate("still open").skipped == (Skip("a", "model-a", "circuit_open"),)
    assert "circuit open for another 1.0s" in r.explain("chat")
    clock.advance(1)
    assert r.generate("second probe").provider == "a"
    assert state(registry) == 0
    assert routes(up) == ["a", "b"] * 3 + ["a", "b", "b", "a"]


@pytest.mark.asyncio
async def test_a_half_open_circuit_lets_one_probe_through_while_concurrent_calls_skip_it(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(config(THREE_STRIKES), clock=clock)
    open_a(r, up)
    clock.advance(30)
    gate = threading.Event()
    up.enqueue("a", lambda rec: Reply(text="probe answered") if gate.wait(10) else Reply(status=500))

    probe = asyncio.create_task(r.agenerate("probe"))
    deadline = time.monotonic() + 5
    while len(up.requests("a")) < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert len(up.requests("a")) == 4
    others = await asyncio.gather(*(r.agenerate(f"meanwhile {i}") for i in range(5)))
    gate.set()
    first = await asyncio.wait_for(probe, 10)

    assert (first.provider, first.text) == ("a", "probe answered")
    assert [o.provider for o in others] == ["b"] * 5
    assert all(o.skipped == (Skip("a", "model-a", "circuit_open"),) for o in others)
    assert len(up.requests("a")) == 4  # three strikes and the single probe
    assert state(registry) == 0


def test_failure_ratio_over_the_window_opens_the_circuit(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(
        config("{failure_threshold: 100, failure_ratio: 0.5, min_requests: 4, window_s: 60, cooldown_s: 30}"),
        clock=clock,
    )
    up.enqueue("a", Reply(), Reply(status=503), Reply(), Reply(status=503))
    served = []
    for i in range(3):
        served.append(r.generate(f"{i}").provider)
        clock.advance(1)
    assert state(registry) is None  # 1 failure in 3: under min_requests
    served.append(r.generate("3").provider)

    assert served == ["a", "b", "a", "b"]
    assert (state(registry), transitions(registry, "open")) == (2, 1)
    assert r.generate("skipped").skipped == (Skip("a", "model-a", "circuit_open"),)
    assert routes(up) == ["a", "a", "b", "a", "a", "b", "b"]


def test_a_400_says_nothing_about_the_targets_health(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(config(THREE_STRIKES), clock=clock)
    up.enqueue("a", *[Reply(status=400, error="'temperature' must be <= 2")] * 4)

    for i in range(4):
        with pytest.raises(ProviderError):
            r.generate(f"bad {i}")
    res = r.generate("good")

    assert (res.provider, res.skipped) == ("a", ())
    assert routes(up) == ["a"] * 5
    assert state(registry) is None
    assert transitions(registry, "open") == 0


def test_auth_failures_count_against_the_target(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(config(THREE_STRIKES), clock=clock)
    up.enqueue("a", *[Reply(status=401)] * 3)

    assert [r.generate(f"{i}").provider for i in range(4)] == ["b"] * 4

    assert routes(up) == ["a", "b"] * 3 + ["b"]
    assert state(registry) == 2


def test_the_circuit_survives_a_config_reload(
    up: Upstream, registry: CollectorRegistry, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breakers are per target in the store, not per config snapshot: reloading does not reset them."""
    for name, value in standard_env().items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "router.yaml"
    text = textwrap.dedent(config(THREE_STRIKES)).replace("{UP}", up.url)
    path.write_text(text)
    r = Router.from_yaml(path, registry=registry, clock=clock)
    open_a(r, up)

    path.write_text(text.replace("deadline_s: 20", "deadline_s: 25"))
    assert r.reload() is True
    res = r.generate("after reload")

    assert res.skipped == (Skip("a", "model-a", "circuit_open"),)
    assert routes(up) == ["a", "b"] * 3 + ["b"]
    assert state(registry) == 2


# -- when every target is open --------------------------------------------------------------------------------

# One strike opens a target; b cools down in 10 s, a in 30 s.
ALL_OPEN = "{{failure_threshold: 1, cooldown_s: 30, failure_ratio: null, when_all_open: {when}}}"


def open_both(r: Router, up: Upstream, clock: FakeClock) -> None:
    up.enqueue("a", Reply(status=503))
    up.enqueue("b", Reply(status=503))
    with pytest.raises(AllTargetsFailedError):
        r.generate("both fail")
    assert routes(up) == ["a", "b"]
    clock.advance(5)


def test_when_all_open_try_soonest_sends_one_request_to_the_target_cooling_down_first(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(
        config(ALL_OPEN.format(when="try_soonest"), chat="[a/model-a, b/model-b]", b=", circuit: {cooldown_s: 10}"),
        clock=clock,
    )
    open_both(r, up, clock)

    res = r.generate("someone answer")

    assert (res.provider, [a.provider for a in res.attempts]) == ("b", ["b"])
    assert routes(up) == ["a", "b", "b"]
    assert state(registry, "b", "model-b") == 0
    assert state(registry, "a", "model-a") == 2
    assert open_skips(registry) == 1


def test_when_all_open_the_target_tried_is_not_counted_as_skipped(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    """skipped_total counts targets passed over without a request; b got one."""
    r = make_router(
        config(ALL_OPEN.format(when="try_soonest"), chat="[a/model-a, b/model-b]", b=", circuit: {cooldown_s: 10}"),
        clock=clock,
    )
    open_both(r, up, clock)

    res = r.generate("someone answer")

    assert res.provider == "b"
    assert res.skipped == (Skip("a", "model-a", "circuit_open"),)
    assert (open_skips(registry), open_skips(registry, "b", "model-b")) == (1, 0)


def test_when_all_open_try_soonest_goes_by_when_each_cooldown_ends_not_by_its_length(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    """Same cooldown, opened 20 s apart: b (opened first) comes out first, though a comes first in the alias."""
    r = make_router(config(ALL_OPEN.format(when="try_soonest"), chat="[a/model-a, b/model-b]"), clock=clock)
    up.enqueue("b", Reply(status=503))
    with pytest.raises(AllTargetsFailedError):
        r.generate("b fails", provider="b")  # b open until +30
    clock.advance(20)
    up.enqueue("a", Reply(status=503))
    with pytest.raises(AllTargetsFailedError):
        r.generate("a fails", provider="a")  # a open until +50
    clock.advance(5)

    res = r.generate("someone answer")

    assert [a.provider for a in res.attempts] == ["b"]
    assert routes(up) == ["b", "a", "b"]


def test_when_all_open_try_soonest_failing_probe_fails_the_call_after_one_request(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(
        config(ALL_OPEN.format(when="try_soonest"), chat="[a/model-a, b/model-b]", b=", circuit: {cooldown_s: 10}"),
        clock=clock,
    )
    open_both(r, up, clock)
    up.enqueue("b", Reply(status=503))

    with pytest.raises(AllTargetsFailedError) as info:
        r.generate("still down")

    assert [(a.provider, a.outcome) for a in info.value.attempts] == [("b", "server_error")]
    assert routes(up) == ["a", "b", "b"]
    assert state(registry, "b", "model-b") == 2


def test_when_all_open_fail_raises_without_a_request(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(
        config(ALL_OPEN.format(when="fail"), chat="[a/model-a, b/model-b]", b=", circuit: {cooldown_s: 10}"),
        clock=clock,
    )
    open_both(r, up, clock)

    with pytest.raises(AllTargetsFailedError) as info:
        r.generate("fail fast")

    assert info.value.attempts == []
    assert "circuit_open" in str(info.value)
    assert routes(up) == ["a", "b"]
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "chat", "outcome": "circuit_open"}) == 1
    assert (open_skips(registry), open_skips(registry, "b", "model-b")) == (1, 1)


# -- per-provider override ------------------------------------------------------------------------------------

def test_a_providers_circuit_override_applies_to_it_only(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, clock: FakeClock
) -> None:
    r = make_router(
        config(THREE_STRIKES, chat="[a/model-a, b/model-b, c/model-c]",
               a=", circuit: {failure_threshold: 1, cooldown_s: 5}"),
        clock=clock,
    )
    assert r.config.defaults.circuit.failure_threshold == 3
    up.enqueue("a", Reply(status=503))
    up.enqueue("b", Reply(status=503))

    first = r.generate("one strike each")

    assert [a.provider for a in first.attempts] == ["a", "b", "c"]
    assert (state(registry, "a", "model-a"), state(registry, "b", "model-b")) == (2, None)
    assert [x.provider for x in r.generate("a open, b still closed").attempts] == ["b"]
    clock.advance(5)  # a's own cooldown, not the default 30 s
    assert r.generate("a probed").provider == "a"
    assert routes(up) == ["a", "b", "c", "b", "a"]


def test_explain_shows_an_open_circuit_and_how_long_it_stays_open(
    make_router: MakeRouter, up: Upstream, clock: FakeClock
) -> None:
    r = make_router(config(THREE_STRIKES), clock=clock)
    open_a(r, up)
    clock.advance(12)

    text = r.explain("chat")

    a_line = text.splitlines()[next(i for i, line in enumerate(text.splitlines()) if "a/model-a" in line) + 1]
    assert "circuit open for another 18.0s" in a_line
    clock.advance(18)
    assert "circuit half-open: the next call probes it" in r.explain("chat")
