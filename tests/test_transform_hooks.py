"""Hooks that transform: a request rewritten before it leaves, an answer rewritten before the caller sees it, plain
and streamed, with the PII redactor of examples/pii_redactor.py over the real loopback upstream.

What the provider received is read from the upstream's log; what the cache and tracing saw, from their own state.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeRouter, standard_config
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from router import Call, Hook, HookFailedError, Router, Target
from router.sandbox import Reply, Upstream

_spec = importlib.util.spec_from_file_location(
    "pii_redactor", Path(__file__).parent.parent / "examples" / "pii_redactor.py"
)
assert _spec is not None and _spec.loader is not None
pii = importlib.util.module_from_spec(_spec)
sys.modules["pii_redactor"] = pii
_spec.loader.exec_module(pii)

EMAIL, PHONE = "jane.doe@example.com", "+1 415 555 0100"
PROMPT = f"Write to {EMAIL} or call {PHONE} about the order."
MODES = ["sync", "async"]


def call(r: Router, mode: str, *args: Any, **kwargs: Any) -> Any:
    if mode == "sync":
        return r.generate(*args, **kwargs)
    import asyncio

    return asyncio.run(r.agenerate(*args, **kwargs))


def stream_text(r: Router, mode: str, *args: Any, **kwargs: Any) -> tuple[list[str], Any]:
    """The deltas the caller was given, and the stream's Result."""
    if mode == "sync":
        s = r.generate(*args, stream=True, **kwargs)
        deltas = list(s)
        return deltas, s.result
    import asyncio

    async def read() -> tuple[list[str], Any]:
        s = await r.agenerate(*args, stream=True, **kwargs)
        return [d async for d in s], s.result

    return asyncio.run(read())


def sent(up: Upstream, route: str = "a") -> str:
    return json.dumps([m for r in up.requests(route) for m in r.messages])


@pytest.mark.parametrize("masked", [
    ("mail me at a.b-c@mail.example.co.uk now", "mail me at [email] now"),
    ("call (415) 555-0100 today", "call [phone] today"),
    ("order 12345 shipped in 2024", "order 12345 shipped in 2024"),
])  # fmt: skip
def test_the_redactor_masks_emails_and_phone_numbers_only(masked: tuple[str, str]) -> None:
    assert pii.mask(masked[0]) == masked[1]


@pytest.mark.parametrize("mode", MODES)
def test_the_prompt_is_masked_before_it_leaves_and_the_answer_before_the_caller_sees_it(
    make_router: MakeRouter, up: Upstream, mode: str
) -> None:
    r = make_router(hooks=[pii.PiiRedactor()])
    up.enqueue("a", Reply(text=f"Sure, I will reach {EMAIL} at {PHONE}."))
    res = call(r, mode, PROMPT, model="single", system=f"Support agent; escalate to {EMAIL}")
    assert EMAIL not in sent(up) and "415 555" not in sent(up)
    assert "Write to [email] or call [phone] about the order." in sent(up)
    assert "escalate to [email]" in sent(up)
    assert res.text == "Sure, I will reach [email] at [phone]."


@pytest.mark.parametrize("mode", MODES)
def test_a_streamed_answer_is_masked_as_it_comes_even_when_the_pii_is_split_across_deltas(
    make_router: MakeRouter, up: Upstream, mode: str
) -> None:
    r = make_router(hooks=[pii.PiiRedactor()])
    text = f"Reach me at {EMAIL} or {PHONE}. Thanks!"
    cuts = [0, 14, 21, 30, 38, 42, 45, len(text)]  # inside the email and inside the phone number
    chunks = [text[a:b] for a, b in itertools.pairwise(cuts)]
    frames = [
        b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "model": "model-a",
                                "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]}).encode()
        + b"\n\n"
        for c in chunks
    ]  # fmt: skip
    done = {"id": "x", "object": "chat.completion.chunk", "model": "model-a",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}  # fmt: skip
    frames += [b"data: " + json.dumps(done).encode() + b"\n\n", b"data: [DONE]\n\n"]
    up.enqueue("a", Reply(raw_stream=frames, chunk_delays=0.01))
    deltas, result = stream_text(r, mode, "hi", model="single")
    joined = "".join(deltas)
    assert joined == "Reach me at [email] or [phone]. Thanks!"
    assert not any("@" in d or "415" in d or "0100" in d for d in deltas)
    assert result.text == joined
    assert result.usage.output_tokens == 12  # billing is the provider's, whatever the caller was shown


def test_the_cache_keys_on_the_masked_request(make_router: MakeRouter, up: Upstream) -> None:
    aliases = "cached: {targets: [a/model-a], cache: {ttl_s: 60}}"
    r = make_router(standard_config(aliases=aliases), hooks=[pii.PiiRedactor()])
    up.route("a").set_default(Reply(text="noted"))
    first = r.generate("Remind alice@example.com", model="cached")
    second = r.generate("Remind bob@example.org", model="cached")  # the same request once masked
    assert not first.cached and second.cached
    assert len(up.requests("a")) == 1


def test_tracing_records_the_masked_prompt(
    make_router: MakeRouter, up: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_tracing import _EXPORTER, _global_provider, call_span

    _global_provider()
    _EXPORTER.clear()
    r = make_router(extra="tracing: {capture_content: true}", hooks=[pii.PiiRedactor()])
    up.enqueue("a", Reply(text=f"ok {EMAIL}"))
    r.generate(PROMPT, model="single")
    span = call_span(_EXPORTER)
    recorded = json.dumps(dict(span.attributes or {}))
    _EXPORTER.clear()
    assert "[email]" in recorded and EMAIL not in recorded


class Person(BaseModel):
    name: str
    email: str


def test_a_structured_answer_is_parsed_from_the_rewritten_text(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(hooks=[pii.PiiRedactor()])
    up.enqueue("a", Reply(text=json.dumps({"name": "Jane", "email": EMAIL})))
    res = r.generate("who?", model="single", response_format=Person)
    assert res.parsed == Person(name="Jane", email="[email]")


class Broken(Hook):
    def __init__(self, where: str) -> None:
        self.where = where

    def rewrite_request(self, call: Call, target: Target, request: Mapping[str, Any]) -> Mapping[str, Any] | None:
        if self.where == "request":
            raise RuntimeError("the redactor's model file is missing")
        return None

    def rewrite_text(self, call: Call, text: str, final: bool) -> str:
        if self.where == "text":
            raise RuntimeError("the redactor's model file is missing")
        return text


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_request_rewrite_fails_the_call_before_anything_is_sent(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, mode: str
) -> None:
    r = make_router(hooks=[Broken("request")])
    with pytest.raises(HookFailedError) as err:
        call(r, mode, PROMPT, model="single")
    assert isinstance(err.value.__cause__, RuntimeError) and err.value.method == "rewrite_request"
    assert up.requests("a") == []
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "single", "outcome": "hook_failed"}) == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_text_rewrite_fails_the_call_and_counts_the_answered_attempt(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, mode: str
) -> None:
    r = make_router(hooks=[Broken("text")])
    up.enqueue("a", Reply(text=f"ok {EMAIL}"))
    with pytest.raises(HookFailedError):
        call(r, mode, PROMPT, model="single")
    labels = {"alias": "single", "provider": "a", "model": "model-a", "outcome": "success"}
    assert registry.get_sample_value("llm_router_attempts_total", labels) == 1
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "single", "outcome": "hook_failed"}) == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_stream_rewrite_stops_the_stream_and_counts_it(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, mode: str
) -> None:
    r = make_router(hooks=[Broken("text")])
    up.enqueue("a", Reply(text="one two three four five six seven eight nine ten"))
    with pytest.raises(HookFailedError):
        stream_text(r, mode, "hi", model="single")
    labels = {"alias": "single", "provider": "a", "model": "model-a", "outcome": "cancelled"}
    assert registry.get_sample_value("llm_router_attempts_total", labels) == 1
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "single", "outcome": "hook_failed"}) == 1
    assert registry.get_sample_value("llm_router_in_flight", {"alias": "single"}) == 0
