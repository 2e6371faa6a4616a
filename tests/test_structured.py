"""Structured output end to end: `generate(response_format=...)` → real litellm → the loopback `Upstream`.

A model litellm knows to take JSON Schemas gets one in `response_format`; any other model gets a JSON-only
instruction in its system message. Either way the reply is validated by the router, and a reply that does
not validate is an `invalid_response`: retried, then fallen back from. Expectations come from the scripted
replies, the request bodies the upstream received, and pydantic / jsonschema's own messages. Every test runs
on both engines: the direct engine reads which models take a JSON Schema from LiteLLM's model map, as a file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jsonschema
import litellm
import pytest
from conftest import BOTH_ENGINES, MakeRouter, Sleeps, standard_config
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError

from router import AllTargetsFailedError, Attempt, Router
from router.sandbox import Reply, Upstream

SCHEMA_MODEL = "gpt-4o-mini"  # in litellm's model map with supports_response_schema

CONFIG = standard_config(
    aliases=f"""
    pair: {{targets: [a/model-a, b/model-b]}}
    smart: {{targets: [a/{SCHEMA_MODEL}]}}
    """
)

PROMPT = "who wrote the first program?"


class Person(BaseModel):
    name: str
    age: int


ADA = Person(name="Ada", age=36)
ADA_JSON = '{"name": "Ada", "age": 36}'

CITY_SCHEMA: dict[str, Any] = {
    "title": "City",
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city"],
}


@pytest.fixture
def r(make_router: MakeRouter) -> Router:
    return make_router(CONFIG)


def routes(up: Upstream) -> list[str]:
    return [rec.route for rec in up.history]


def trail(attempts: Sequence[Attempt]) -> list[tuple[str, str]]:
    return [(a.provider, a.outcome) for a in attempts]


def compact(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"))


def pydantic_problem(value: Any) -> str:
    """pydantic's own 'field: message' for the first thing wrong with `value` as a Person."""
    try:
        Person.model_validate(value)
    except ValidationError as exc:
        e = exc.errors()[0]
        return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
    raise AssertionError(f"{value!r} is a valid Person")


def schema_problem(value: Any) -> str:
    """jsonschema's own 'field: message' for the first thing wrong with `value` under CITY_SCHEMA."""
    e = next(jsonschema.Draft202012Validator(CITY_SCHEMA).iter_errors(value))
    return f"{'.'.join(str(p) for p in e.path)}: {e.message}"


# -- the parsed value beside the text -----------------------------------------------------------------------


@BOTH_ENGINES
def test_pydantic_model_is_parsed_beside_the_text(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text=ADA_JSON))

    res = r.generate(PROMPT, response_format=Person)

    assert isinstance(res.parsed, Person) and res.parsed == ADA
    assert (res.text, res.provider) == (ADA_JSON, "a")
    assert routes(up) == ["a"]


@BOTH_ENGINES
@pytest.mark.asyncio
async def test_async_pydantic_model_is_parsed_beside_the_text(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text=ADA_JSON))

    res = await r.agenerate(PROMPT, response_format=Person)

    assert isinstance(res.parsed, Person) and res.parsed == ADA
    assert res.text == ADA_JSON


@BOTH_ENGINES
def test_plain_calls_have_nothing_parsed(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text=ADA_JSON))

    res = r.generate(PROMPT)

    assert res.parsed is None and res.text == ADA_JSON
    body = up.requests("a")[0].body
    assert "response_format" not in body and body["messages"] == [{"role": "user", "content": PROMPT}]


@BOTH_ENGINES
def test_schema_capable_model_gets_the_schema_in_response_format(r: Router, up: Upstream) -> None:
    assert litellm.supports_response_schema(model=SCHEMA_MODEL, custom_llm_provider="openai")
    up.enqueue("a", Reply(text=ADA_JSON))

    res = r.generate(PROMPT, model="smart", response_format=Person)

    assert res.parsed == ADA
    body = up.requests("a")[0].body
    assert body["model"] == SCHEMA_MODEL
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Person", "schema": Person.model_json_schema()},
    }
    assert body["messages"] == [{"role": "user", "content": PROMPT}]  # no instruction needed


@BOTH_ENGINES
def test_unknown_model_gets_a_json_only_instruction_with_the_schema(r: Router, up: Upstream) -> None:
    assert not litellm.supports_response_schema(model="model-a", custom_llm_provider="openai")
    up.enqueue("a", Reply(text=ADA_JSON))

    res = r.generate(PROMPT, response_format=Person)

    assert res.parsed == ADA
    body = up.requests("a")[0].body
    assert "response_format" not in body
    system, user = body["messages"]
    assert system["role"] == "system"
    assert "JSON" in system["content"] and compact(Person.model_json_schema()) in system["content"]
    assert user == {"role": "user", "content": PROMPT}


@BOTH_ENGINES
def test_the_instruction_joins_the_callers_system_message(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text=ADA_JSON))

    r.generate(PROMPT, system="Be terse.", response_format=Person)

    messages = up.requests("a")[0].body["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]  # one system message, not two
    assert messages[0]["content"].startswith("Be terse.")
    assert compact(Person.model_json_schema()) in messages[0]["content"]


@BOTH_ENGINES
@pytest.mark.parametrize("alias", ["chat", "smart"])
def test_json_schema_dict_parses_to_a_dict(alias: str, r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text='{"city": "Paris", "population": 2100000}'))

    res = r.generate(PROMPT, model=alias, response_format=CITY_SCHEMA)

    assert res.parsed == {"city": "Paris", "population": 2100000}
    body = up.requests("a")[0].body
    if alias == "smart":
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "City", "schema": CITY_SCHEMA},
        }
    else:
        assert "response_format" not in body
        assert compact(CITY_SCHEMA) in body["messages"][0]["content"]


@BOTH_ENGINES
def test_openai_style_json_schema_response_format_is_accepted(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text='{"city": "Oslo"}'))
    wrapped = {"type": "json_schema", "json_schema": {"name": "where", "schema": CITY_SCHEMA}}

    res = r.generate(PROMPT, model="smart", response_format=wrapped)

    assert res.parsed == {"city": "Oslo"}
    assert up.requests("a")[0].body["response_format"] == wrapped


@BOTH_ENGINES
@pytest.mark.parametrize(
    "text",
    [f"```json\n{ADA_JSON}\n```", f"```\n{ADA_JSON}\n```", f"  ```json\n{ADA_JSON}```  \n"],
    ids=["json-fence", "bare-fence", "fence-with-spaces"],
)
def test_a_fenced_json_reply_is_accepted(text: str, r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text=text))

    res = r.generate(PROMPT, response_format=Person)

    assert res.parsed == ADA and res.text == text
    assert trail(res.attempts) == [("a", "success")]


# -- a reply that does not validate is retried, then fallen back from ---------------------------------------

INVALID = {
    "not-json": "not json",
    "wrong-type": '{"name": "Ada", "age": "thirty-six"}',
    "missing-field": '{"name": "Ada"}',
    "prose-around-json": f"Sure! Here it is: {ADA_JSON}",
}


def check_invalid_then_b(res: Any, up: Upstream, sleeps: Sleeps, registry: CollectorRegistry) -> None:
    assert res.parsed == ADA and (res.provider, res.text) == ("b", ADA_JSON)
    assert trail(res.attempts) == [("a", "invalid_response"), ("a", "invalid_response"), ("b", "success")]
    assert all(a.error for a in res.attempts[:-1])
    assert routes(up) == ["a", "a", "b"]  # retry.attempts on a, then b
    assert len(sleeps) == 1
    a = {"alias": "chat", "provider": "a", "model": "model-a"}
    assert registry.get_sample_value("llm_router_attempts_total", {**a, "outcome": "invalid_response"}) == 2
    fallback = {"alias": "chat", "from_provider": "a", "to_provider": "b", "reason": "invalid_response"}
    assert registry.get_sample_value("llm_router_fallbacks_total", fallback) == 1
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "chat", "outcome": "success"}) == 1


@BOTH_ENGINES
@pytest.mark.parametrize("bad", INVALID.values(), ids=INVALID.keys())
def test_invalid_reply_is_retried_then_fallen_back_from(
    bad: str, r: Router, up: Upstream, sleeps: Sleeps, registry: CollectorRegistry
) -> None:
    up.enqueue("a", Reply(text=bad), Reply(text=bad))
    up.enqueue("b", Reply(text=ADA_JSON))

    res = r.generate(PROMPT, response_format=Person)

    check_invalid_then_b(res, up, sleeps, registry)


@BOTH_ENGINES
@pytest.mark.asyncio
@pytest.mark.parametrize("bad", INVALID.values(), ids=INVALID.keys())
async def test_async_invalid_reply_is_retried_then_fallen_back_from(
    bad: str, r: Router, up: Upstream, sleeps: Sleeps, registry: CollectorRegistry
) -> None:
    up.enqueue("a", Reply(text=bad), Reply(text=bad))
    up.enqueue("b", Reply(text=ADA_JSON))

    res = await r.agenerate(PROMPT, response_format=Person)

    check_invalid_then_b(res, up, sleeps, registry)


@BOTH_ENGINES
def test_an_invalid_reply_then_a_valid_one_on_retry_stays_on_a(r: Router, up: Upstream, sleeps: Sleeps) -> None:
    up.enqueue("a", Reply(text="not json"), Reply(text=ADA_JSON))

    res = r.generate(PROMPT, response_format=Person)

    assert (res.parsed, res.provider) == (ADA, "a")
    assert trail(res.attempts) == [("a", "invalid_response"), ("a", "success")]
    assert routes(up) == ["a", "a"] and len(sleeps) == 1


ALL_INVALID = {
    "pydantic-wrong-type": (
        Person,
        '{"name": "Ada", "age": "thirty-six"}',
        pydantic_problem({"name": "Ada", "age": "thirty-six"}),
    ),
    "pydantic-missing-field": (Person, '{"name": "Ada"}', pydantic_problem({"name": "Ada"})),
    "schema-wrong-type": (CITY_SCHEMA, '{"city": 75}', schema_problem({"city": 75})),
    "not-json": (Person, "not json", "not valid JSON"),
}


@BOTH_ENGINES
@pytest.mark.parametrize(("fmt", "bad", "problem"), ALL_INVALID.values(), ids=ALL_INVALID.keys())
def test_every_target_invalid_says_what_was_wrong(
    fmt: Any, bad: str, problem: str, r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    up.enqueue("a", Reply(text=bad), Reply(text=bad))
    up.enqueue("b", Reply(text=bad), Reply(text=bad))

    with pytest.raises(AllTargetsFailedError) as info:
        r.generate(PROMPT, model="pair", response_format=fmt)

    err = info.value
    assert err.outcome == "invalid_response"
    assert trail(err.attempts) == [("a", "invalid_response")] * 2 + [("b", "invalid_response")] * 2
    assert problem in (err.attempts[-1].error or "")
    assert problem in str(err)
    assert routes(up) == ["a", "a", "b", "b"]
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "pair", "outcome": "invalid_response"}) == 1


def test_the_validation_message_names_the_field_and_the_problem() -> None:
    # The expectations above are built from pydantic's and jsonschema's messages; pin what they contain.
    assert pydantic_problem({"name": "Ada", "age": "thirty-six"}).startswith("age: ")
    assert "integer" in pydantic_problem({"name": "Ada", "age": "thirty-six"})
    assert pydantic_problem({"name": "Ada"}) == "age: Field required"
    assert schema_problem({"city": 75}) == "city: 75 is not of type 'string'"


# -- streaming and structured output do not mix ------------------------------------------------------------


@BOTH_ENGINES
@pytest.mark.parametrize("fmt", [Person, CITY_SCHEMA], ids=["pydantic", "json-schema"])
def test_stream_with_response_format_is_a_type_error(
    fmt: Any, r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    with pytest.raises(TypeError, match="stream=True or response_format"):
        r.generate(PROMPT, stream=True, response_format=fmt)

    assert up.history == []  # refused before any request
    assert registry.get_sample_value("llm_router_in_flight", {"alias": "chat"}) in (None, 0)


@BOTH_ENGINES
@pytest.mark.asyncio
async def test_async_stream_with_response_format_is_a_type_error(r: Router, up: Upstream) -> None:
    with pytest.raises(TypeError, match="stream=True or response_format"):
        await r.agenerate(PROMPT, stream=True, response_format=Person)

    assert up.history == []


@BOTH_ENGINES
def test_response_format_of_another_kind_is_a_type_error(r: Router, up: Upstream) -> None:
    with pytest.raises(TypeError, match="pydantic model class or a JSON Schema dict"):
        r.generate(PROMPT, response_format=ADA)  # an instance, not the class

    assert up.history == []
