"""Structured output: ask a provider for JSON matching a pydantic model or a JSON Schema, and check the reply.

Where litellm knows a model takes a JSON Schema, it goes in `response_format`; elsewhere the request carries
a JSON-only instruction with the schema. Either way the reply is parsed and validated here, and a reply that
is not valid JSON or does not validate is an `invalid_response`: retried, then fallen back from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .engines import InvalidResponse


@dataclass(frozen=True)
class Format:
    """What the caller asked for: a pydantic model (`model`) or a bare JSON Schema."""

    name: str
    schema: dict[str, Any]
    model: type[BaseModel] | None = None


def make_format(response_format: Any) -> Format | None:
    """A `Format` from generate()'s `response_format=`: a pydantic model class or a JSON Schema dict."""
    if response_format is None:
        return None
    if isinstance(response_format, type) and issubclass(response_format, BaseModel):
        return Format(response_format.__name__, response_format.model_json_schema(), response_format)
    if isinstance(response_format, dict):
        if response_format.get("type") == "json_schema" and isinstance(response_format.get("json_schema"), dict):
            inner = response_format["json_schema"]
            return Format(str(inner.get("name", "response")), dict(inner.get("schema") or {}))
        if response_format.get("type") == "json_object":
            return Format("response", {"type": "object"})
        return Format(str(response_format.get("title", "response")), response_format)
    raise TypeError("response_format must be a pydantic model class or a JSON Schema dict")


def request_params(fmt: Format, schema_supported: bool) -> dict[str, Any]:
    """The response_format litellm gets for a model that takes JSON Schemas (else none: see `instruction`)."""
    if not schema_supported:
        return {}
    name = re.sub(r"[^A-Za-z0-9_-]", "_", fmt.name)[:64] or "response"
    return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": fmt.schema}}}


def instruction(fmt: Format) -> str:
    """A system instruction asking for JSON only, for models without schema support."""
    return (
        "Answer with one JSON value only: no prose, no code fences. It must validate against this JSON Schema:\n"
        + json.dumps(fmt.schema, separators=(",", ":"))
    )


def with_instruction(messages: list[dict[str, Any]], fmt: Format) -> list[dict[str, Any]]:
    """`messages` with the JSON-only instruction added to the system message (or as a new one)."""
    text = instruction(fmt)
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def parse(text: str, fmt: Format) -> Any:
    """The validated reply: an instance of `fmt.model`, or the JSON value; raises InvalidResponse saying why not."""
    m = _FENCE.match(text)
    body = m.group(1) if m else text
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidResponse(
            f"the answer is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if fmt.model is not None:
        try:
            return fmt.model.model_validate(value)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in exc.errors(include_input=False, include_url=False)
            )
            raise InvalidResponse(f"the answer does not match {fmt.name}: {problems}") from None
    import jsonschema  # a litellm dependency; only needed for bare JSON Schemas

    errors = sorted(jsonschema.Draft202012Validator(fmt.schema).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.path) or '(root)'}: {e.message}" for e in errors[:5])
        raise InvalidResponse(f"the answer does not match the schema: {problems}")
    return value
