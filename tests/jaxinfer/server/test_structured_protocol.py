"""Structured output on the HTTP API (issue 17): chat's `response_format` and vLLM's
`structured_outputs` map onto SamplingParams' json_schema / regex / choice (protocol level:
the engine side is tests/jaxinfer/test_structured.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic")

from jaxinfer import InvalidRequestError  # noqa: E402
from jaxinfer.server.protocol import JSON_OBJECT, ChatCompletionRequest, CompletionRequest  # noqa: E402

MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat(**kw):
    return ChatCompletionRequest(model="m", messages=MSG, **kw).sampling(16, None)


def test_response_format():
    assert chat(response_format={"type": "text"}).constraint is None
    assert chat(response_format={"type": "json_object"}).json_schema == JSON_OBJECT
    p = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}})
    assert p.json_schema == SCHEMA
    with pytest.raises(InvalidRequestError, match="json_schema.schema"):
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(InvalidRequestError, match="not supported"):
        chat(response_format={"type": "yaml"})


def test_structured_outputs_on_both_endpoints():
    c = CompletionRequest(model="m", prompt="x", structured_outputs={"regex": "[0-9]+"}).sampling(16, None)
    assert c.regex == "[0-9]+"
    c = CompletionRequest(model="m", prompt="x", structured_outputs={"choice": ["a", "b"]}).sampling(16, None)
    assert c.choice == ("a", "b")
    assert chat(structured_outputs={"json": SCHEMA}).json_schema == SCHEMA
    assert chat(structured_outputs={"json_object": True}).json_schema == JSON_OBJECT
    with pytest.raises(InvalidRequestError, match="at most one"):
        chat(structured_outputs={"regex": "a", "choice": ["a"]})
    with pytest.raises(InvalidRequestError, match="cannot both"):
        chat(structured_outputs={"regex": "a"}, response_format={"type": "json_object"})
