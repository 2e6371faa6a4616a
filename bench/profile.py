"""Where the CPU of a call goes, and which litellm settings remove work the router already does itself.

    python -m bench.profile                  # cProfile: Router.agenerate vs litellm.acompletion, by area
    python -m bench.profile --ab             # A/B every candidate setting on Router.agenerate's CPU per call
    python -m bench.profile --ab --only no_log,zero_custom_price --rounds 12

The A/B applies a candidate to the running process (a litellm module flag, an extra per-call kwarg patched
into `router._litellm.acomplete`, ...), runs a batch, and takes it off again, interleaved with the baseline
in a new order every round. Before measuring, each candidate must keep what the router reads from
litellm: the text, the usage, OpenRouter's provider-reported cost, the fallback after a 503.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported: no price-map download

import litellm
from prometheus_client import CollectorRegistry

import router
from router.engines import litellm as _litellm

from . import clients as cl
from .measure import Runner
from .run import gc_info, pin
from .upstream import PROVIDER_COST, Upstream

# -- profile ------------------------------------------------------------------------------------------------

# Subtrees of a litellm call worth naming: (label, file suffix, function name); their cumulative time.
SPOTS = [
    ("litellm: cost on the hot path (set_hidden_params → response_cost_calculator)",
     "llm_response_utils/response_metadata.py", "set_hidden_params"),
    ("litellm: deferred success logging (async_success_handler)", "litellm_logging.py", "async_success_handler"),
    ("  of which the standard logging payload", "litellm_logging.py", "get_standard_logging_object_payload"),
    ("  of which the zero-cost diagnostic", "litellm_logging.py", "_record_zero_cost_diagnostic"),
    ("litellm: function_setup (Logging object, callbacks)", "litellm/utils.py", "function_setup"),
    ("litellm: main.acompletion (params, provider routing)", "litellm/main.py", "acompletion"),
    ("openai SDK: request body transform", "openai/_utils/_transform.py", "async_maybe_transform"),
    ("openai SDK: response parse", "openai/_legacy_response.py", "parse"),
    ("httpx + litellm's aiohttp transport: send", "httpx/_client.py", "send"),
    ("router: agenerate (everything, litellm included)", "router/client.py", "agenerate"),
    ("router: make_plan (plan, request bodies)", "router/planner.py", "make_plan"),
    ("router: read_response", "router/engines/litellm.py", "read_response"),
]


def area(filename: str) -> str:
    """A coarse owner for a profiled function's file."""
    f = filename.replace("\\", "/")
    if "/site-packages/" not in f and "/router/" in f:
        return "router (ours)"
    if "prometheus_client" in f:
        return "prometheus_client (router's metrics)"
    if "/site-packages/litellm/" in f:
        sub = f.split("/site-packages/litellm/", 1)[1]
        if sub.startswith(("cost_calculator", "litellm_core_utils/llm_cost_calc", "litellm_core_utils/fallback_gen")):
            return "litellm: cost calculation"
        if sub.startswith(("litellm_core_utils/litellm_logging", "litellm_core_utils/logging_", "integrations")):
            return "litellm: logging"
        return "litellm: other"
    for lib in ("openai", "httpx", "httpcore", "aiohttp", "pydantic", "pydantic_core", "yarl", "multidict"):
        if f"/site-packages/{lib}/" in f:
            return lib
    if f.startswith("~") or f.startswith("<"):
        return "builtins (called from all of the above)"
    return "stdlib (asyncio, json, typing, ...)"


def breakdown(prof: cProfile.Profile) -> tuple[float, dict[str, float], dict[str, float], list[tuple[str, float]]]:
    """(total tottime, tottime by area, cumtime of SPOTS, router's own functions by tottime)."""
    st = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in st.values())
    by_area: dict[str, float] = {}
    mine: list[tuple[str, float]] = []
    for (fn, line, name), v in st.items():
        a = area(fn)
        by_area[a] = by_area.get(a, 0.0) + v[2]
        if a.startswith(("router", "prometheus")):
            mine.append((f"{fn.split('/')[-1]}:{line}({name})", v[2]))
    spots = {}
    for label, suffix, func in SPOTS:
        spots[label] = sum(v[3] for (fn, _, name), v in st.items() if name == func and fn.endswith(suffix))
    mine.sort(key=lambda x: -x[1])
    return total, by_area, spots, mine


def do_profile(runner: Runner, clients: cl.Clients, n: int, concurrency: int) -> None:
    vs = clients.variants()
    for key in ("litellm_async", "router_async"):
        v = vs[key]
        # CPU per call without the profiler, to turn profiled shares into milliseconds.
        plain = statistics.median(runner.concurrent(v, n, concurrency)["cpu_s"] for _ in range(3))
        prof = cProfile.Profile()
        prof.enable()
        runner.concurrent(v, n, concurrency)
        prof.disable()
        total, by_area, spots, mine = breakdown(prof)
        print(f"\n== {v.label}: {plain * 1e3:.3f} ms CPU per call unprofiled "
              f"({n} calls at concurrency {concurrency}); shares from cProfile tottime")
        for a, t in sorted(by_area.items(), key=lambda x: -x[1]):
            print(f"   {a:<45} {100 * t / total:5.1f}%   ~{plain * 1e3 * t / total:.3f} ms/call")
        print("   -- subtrees (cumulative) --")
        for label, t in spots.items():
            if t:
                print(f"   {label:<78} {100 * t / total:5.1f}%   ~{plain * 1e3 * t / total:.3f} ms/call")
        if mine:
            print("   -- the router's own functions (tottime) --")
            for name, t in mine[:15]:
                print(f"   {name:<78} {100 * t / total:5.2f}%   ~{plain * 1e6 * t / total:.1f} µs/call")


# -- candidates ----------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A setting to try: module flags, per-call kwargs, or a context around each call."""

    name: str
    doc: str
    flags: dict[str, Any] = field(default_factory=dict)  # litellm.<name> = value
    kwargs: dict[str, Any] = field(default_factory=dict)  # added to every litellm request the router makes
    around: Callable[[], contextlib.AbstractContextManager[Any]] | None = None  # entered around each request


CALLBACK_LISTS = cl.CALLBACK_LISTS  # when all are empty, nobody consumes litellm's own success/failure logging


def callbacks_configured() -> bool:
    """Whether the application registered any litellm callback (Langfuse, a CustomLogger, ...)."""
    return any(getattr(litellm, name, None) for name in CALLBACK_LISTS)


@contextlib.contextmanager
def quiet_litellm_call() -> Iterator[None]:
    """The call counts as one of litellm's own nested calls, so litellm skips its success/failure logging for it;
    only while no litellm callback is registered, so an application's Langfuse & co. still see every call."""
    if callbacks_configured():
        yield
        return
    from litellm._internal_context import is_internal_call

    token = is_internal_call.set(True)
    try:
        yield
    finally:
        is_internal_call.reset(token)


CANDIDATES = [
    Candidate("no_log", 'per-call kwarg "no-log": True', kwargs={"no-log": True}),
    Candidate("turn_off_message_logging", "litellm.turn_off_message_logging = True",
              flags={"turn_off_message_logging": True}),
    Candidate("disable_streaming_logging", "litellm.disable_streaming_logging = True",
              flags={"disable_streaming_logging": True}),
    Candidate("logging_false", "litellm.logging = False", flags={"logging": False}),
    Candidate("suppress_debug_info_off", "litellm.suppress_debug_info = False (what the router turns on)",
              flags={"suppress_debug_info": False}),
    # litellm caches an OpenAI client per (key, base, timeout, ...), with the transport chosen at creation:
    # a timeout of its own gives this arm its own client, so the arms never share or flush one.
    Candidate("httpx_transport", "litellm.disable_aiohttp_transport = True (httpx's own transport)",
              flags={"disable_aiohttp_transport": True}, kwargs={"timeout": 29.5}),
    Candidate("quiet_call", "is_internal_call set around the request while no litellm callback is registered "
              "(skips litellm's own success/failure logging)", around=quiet_litellm_call),
]
# Not candidates, by finding: per-call input_cost_per_token/output_cost_per_token register the price in
# litellm's global price map (one call with 0 makes litellm.cost_per_token("gpt-4o-mini") answer 0 for good),
# which breaks the router's price-map fallback; litellm.disable_token_counter breaks the router's token
# estimate for streams that report no usage.


@contextlib.contextmanager
def applied(c: Candidate | None) -> Iterator[None]:
    """The candidate in force in this process for the duration of the block."""
    if c is None:
        yield
        return
    saved = {k: getattr(litellm, k) for k in c.flags}
    original_a, original_s = _litellm.acomplete, _litellm.complete
    for k, v in c.flags.items():
        setattr(litellm, k, v)

    async def acomplete(kwargs: dict[str, Any]) -> Any:
        kw = {**kwargs, **c.kwargs} if c.kwargs else kwargs
        if c.around is None:
            return await original_a(kw)
        with c.around():
            return await original_a(kw)

    def complete(kwargs: dict[str, Any]) -> Any:
        kw = {**kwargs, **c.kwargs} if c.kwargs else kwargs
        if c.around is None:
            return original_s(kw)
        with c.around():
            return original_s(kw)

    if c.kwargs or c.around is not None:
        _litellm.acomplete, _litellm.complete = acomplete, complete
    try:
        yield
    finally:
        _litellm.acomplete, _litellm.complete = original_a, original_s
        for k, v in saved.items():
            setattr(litellm, k, v)


FEATURES = """\
version: 1
defaults:
  model: direct
  retry: {{attempts: 1, backoff_s: 0}}
{circuit}providers:
  ok:   {{kind: openai, api_base: "{url}/ok/v1", api_key: {key}}}
  fail: {{kind: openai, api_base: "{url}/fail/v1", api_key: {key}}}
  orouter: {{kind: openrouter, api_base: "{url}/cost/v1", api_key: {key}}}
aliases:
  direct:   {{targets: [ok/bench-model]}}
  fallback: {{targets: [fail/bench-model, ok/bench-model]}}
  provider_cost: {{targets: [orouter/bench-model]}}
  price_map: {{targets: [ok/gpt-4o-mini]}}
  unpriced: {{targets: [ok/bench-model-unpriced]}}
pricing:
  ok/bench-model: {{input_per_1m: 1.0, output_per_1m: 2.0}}
"""


def _summary(res: router.Result) -> tuple[Any, ...]:
    return (
        res.text, res.usage.input_tokens, res.usage.output_tokens, res.cost_source, round(res.cost_usd, 12),
        tuple(a.outcome for a in res.attempts),
    )


PATHS = ("direct", "fallback", "provider_cost", "price_map", "unpriced")


async def features(r: router.Router) -> dict[str, Any]:
    """What the router reads from litellm, for one call per path."""
    return {alias: _summary(await r.agenerate(messages=cl.MESSAGES, model=alias)) for alias in PATHS}


def features_sync(r: router.Router) -> dict[str, Any]:
    """`features` through generate()."""
    return {alias: _summary(r.generate(messages=cl.MESSAGES, model=alias)) for alias in PATHS}


def features_router(url: str) -> router.Router:
    """A Router over every answer path the router reads from litellm."""
    circuit = "  circuit: {failure_threshold: 1000000000, failure_ratio: null}\n" if cl.has_circuits() else ""
    text = FEATURES.format(url=url, key=cl.API_KEY, circuit=circuit)
    return router.Router(router.parse_config(text, "features.yaml", env={}), registry=CollectorRegistry())


def user_callback_fires(loop: asyncio.AbstractEventLoop, r: router.Router) -> bool:
    """With an application's litellm callback registered, does it still see a router call (async and sync)?"""
    from litellm.integrations.custom_logger import CustomLogger

    class Counter(CustomLogger):
        seen = 0

        async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
            Counter.seen += 1

        def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
            Counter.seen += 1

    counter = Counter()
    litellm.callbacks.append(counter)
    try:
        async def call() -> None:
            before = asyncio.all_tasks()
            await r.agenerate(messages=cl.MESSAGES, model="direct")
            await cl.settle(before)

        loop.run_until_complete(call())
        async_seen = Counter.seen
        r.generate(messages=cl.MESSAGES, model="direct")
        cl.settle_sync()
        return async_seen >= 1 and Counter.seen >= 2
    finally:
        for name in CALLBACK_LISTS:
            lst = getattr(litellm, name)
            lst[:] = [cb for cb in lst if cb is not counter]


def check_features(loop: asyncio.AbstractEventLoop, url: str, candidates: list[Candidate]) -> dict[str, str]:
    """Each candidate's answer on every path, async and sync, against the baseline's: "ok" or what differs."""
    r = features_router(url)
    base = loop.run_until_complete(features(r))
    base_sync = features_sync(r)
    assert base["provider_cost"][3:5] == ("provider", PROVIDER_COST), base["provider_cost"]
    assert base == base_sync, (base, base_sync)
    assert user_callback_fires(loop, r), "a litellm callback does not see router calls even without a candidate"
    verdicts = {}
    for c in candidates:
        with applied(c):
            got = loop.run_until_complete(features(r))
            got_sync = features_sync(r)
            callbacks_ok = user_callback_fires(loop, r)
        diff = [f"{k}: {base[k]} → {got[k]}" for k in base if got[k] != base[k]]
        diff += [f"sync {k}: {base[k]} → {got_sync[k]}" for k in base if got_sync[k] != base[k]]
        if not callbacks_ok:
            diff.append("an application's litellm callback no longer sees router calls")
        verdicts[c.name] = "ok" if not diff else "CHANGES " + "; ".join(diff)
    return verdicts


def do_ab(runner: Runner, clients: cl.Clients, candidates: list[Candidate], rounds: int, n: int,
          concurrency: int) -> dict[str, Any]:
    """Interleaved rounds of the baseline and each candidate on the success path, the 503 fallback path and the
    sync path; prints and returns CPU per call and ratios."""
    verdicts = check_features(runner.loop, clients.url, candidates)
    vs = clients.variants()
    paths = {
        "agenerate": vs["router_async"],
        "agenerate, 503 then fallback": cl.Variant("fb", "fallback", "async", "raw_async",
                                                   clients.router_fallback_async),
        "generate (sync)": vs["router_sync"],
    }
    arms: list[Candidate | None] = [None, *candidates]
    names = ["baseline" if a is None else a.name for a in arms]
    cpu: dict[str, dict[str, list[float]]] = {p: {nm: [] for nm in names} for p in paths}
    rng = random.Random(3)
    for arm in arms:  # warm each arm once (new clients, lazy imports)
        with applied(arm):
            for v in paths.values():
                runner.sequential(v, 10)
    for _ in range(rounds):
        # Arms of one path run back to back, in a new order each time: a ratio compares batches seconds apart.
        for p in rng.sample(list(paths), len(paths)):
            v = paths[p]
            calls = max(10, n // 3) if p.startswith("agenerate, 503") else n
            for arm in rng.sample(arms, len(arms)):
                with applied(arm):
                    r = runner.concurrent(v, calls, concurrency) if concurrency > 1 and v.mode == "async" \
                        else runner.sequential(v, calls)
                cpu[p]["baseline" if arm is None else arm.name].append(r["cpu_s"])
    print(f"\nRouter client CPU per call, {rounds} interleaved rounds, concurrency {concurrency} "
          "(ratio = median of per-round ratios to the baseline)")
    out: dict[str, Any] = {"rounds": rounds, "calls": n, "concurrency": concurrency, "features": verdicts, "paths": {}}
    for p in paths:
        base = cpu[p]["baseline"]
        print(f"  {p}: baseline {statistics.median(base) * 1e3:.3f} ms")
        out["paths"][p] = {"baseline_ms": statistics.median(base) * 1e3}
        for c in candidates:
            xs = cpu[p][c.name]
            ratio = statistics.median(a / b for a, b in zip(xs, base, strict=True))
            out["paths"][p][c.name] = {"ms": statistics.median(xs) * 1e3, "ratio": ratio}
            print(f"     {c.name:<28} {statistics.median(xs) * 1e3:7.3f} ms  {ratio:6.3f}×")
    print("\nfeatures kept (text, usage, cost source and value, attempts; async and sync; an application's "
          "litellm callback still fires):")
    for c in candidates:
        print(f"  {c.name:<28} {verdicts[c.name]}\n  {'':<28} {c.doc}")
    return out


# -- garbage collection --------------------------------------------------------------------------------------


def do_gc(runner: Runner, clients: cl.Clients, n: int) -> None:
    """Time spent in the collector per call, with litellm's import-time heap as is and frozen."""
    import gc
    import time

    acc = {"t": 0.0, "t0": 0.0, "full": 0}

    def cb(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            acc["t0"] = time.perf_counter()
        else:
            acc["t"] += time.perf_counter() - acc["t0"]
            acc["full"] += info["generation"] == 2

    runner.collect = False  # no forced collections: the collector runs when it would in an application
    vs = clients.variants()
    gc.callbacks.append(cb)
    try:
        for frozen in (False, True):
            gc.unfreeze()
            if frozen:
                gc.collect()
                gc.freeze()
            for key, conc in (("litellm_async", 1), ("router_async", 1), ("litellm_async", 50), ("router_async", 50)):
                acc.update(t=0.0, full=0)
                r = runner.concurrent(vs[key], n, conc)
                print(f"  heap {'frozen  ' if frozen else 'as is   '} {vs[key].label:<26} c={conc:<3} "
                      f"CPU {r['cpu_s'] * 1e3:.3f} ms/call, of which GC {acc['t'] / n * 1e3:.3f} ms "
                      f"({acc['full']} full passes in {n} calls)")
    finally:
        gc.callbacks.remove(cb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--ab", action="store_true", help="A/B the candidate settings instead of profiling")
    ap.add_argument("--gc", action="store_true", help="time the garbage collector per call, heap as is vs frozen")
    ap.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--model", default=None, help="model name sent to litellm (default bench-model; try gpt-4o-mini)")
    args = ap.parse_args(argv)
    if args.model:
        cl.MODEL = args.model
    upstream_cpu, _ = pin()
    cl.quiet()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    with Upstream(cpu=upstream_cpu) as up:
        clients = cl.Clients(up.url)
        loop.run_until_complete(clients.astart())
        try:
            runner = Runner(loop, clients)
            vs = clients.variants()
            runner.warm_up([vs["litellm_async"], vs["router_async"]], 100)
            if args.gc:
                do_gc(runner, clients, args.calls * 5)
                return 0
            gc_info(freeze=True)  # as in the benchmark: full GC passes over litellm's heap would swamp the A/B
            if args.ab:
                names = [x for x in args.only.split(",") if x]
                unknown = set(names) - {c.name for c in CANDIDATES}
                if unknown:
                    ap.error(f"unknown candidates: {', '.join(sorted(unknown))}")
                chosen = [c for c in CANDIDATES if not names or c.name in names]
                do_ab(runner, clients, chosen, args.rounds, args.calls, args.concurrency)
            else:
                do_profile(runner, clients, args.calls * 5, max(args.concurrency, 1))
        finally:
            loop.run_until_complete(clients.aclose())
    loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
