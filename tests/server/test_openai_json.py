"""``response_format`` json_object and json_schema: the real (random-weight) tiny model's output
always parses and validates, because llguidance masks every draw."""
from __future__ import annotations

import json

import jsonschema
import pytest

from tests.inference.conftest import backend, tiny_model_dir, tokenizer  # noqa: F401
from tests.inference.inference_helpers import AUTH, serve

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["colour", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
]


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_a_weak_models_output_always_matches_the_json_schema(backend, schema):  # noqa: F811
    async with await serve(backend) as api:
        for seed in (1, 2):
            body = {"model": "exo/tiny", "messages": MESSAGES, "response_format": _json_schema(schema),
                    "temperature": 1.0, "seed": seed, "max_tokens": 60}
            answer = (await (await api.post(CHAT, headers=AUTH, json=body)).json())["choices"][0]
            assert answer["finish_reason"] == "stop", answer
            jsonschema.validate(json.loads(answer["message"]["content"]), schema)


async def test_json_object_mode_writes_an_object_and_the_stream_writes_the_same(backend):  # noqa: F811
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["a"],
              "additionalProperties": False}
    body = {"model": "exo/tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 40}
    async with await serve(backend) as api:
        plain = await (await api.post(CHAT, headers=AUTH, json=body)).json()
        shaped = await (await api.post(CHAT, headers=AUTH, json={**body, "response_format": _json_schema(schema)}))\
            .json()
        stream = await api.post(CHAT, headers=AUTH, json={**body, "response_format": _json_schema(schema),
                                                          "stream": True})
        events = [json.loads(line[6:]) for line in (await stream.text()).splitlines() if line.startswith("data: {")]
        anything = await (await api.post(CHAT, headers=AUTH, json={**body, "max_tokens": 80,
                                                                    "response_format": {"type": "json_object"}}))\
            .json()
    with pytest.raises(ValueError):
        json.loads(plain["choices"][0]["message"]["content"])  # unconstrained, the model writes no JSON
    text = shaped["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), schema)
    assert "".join(c["delta"].get("content", "") for e in events for c in e["choices"]) == text
    if anything["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(anything["choices"][0]["message"]["content"]), dict)
    else:
        assert anything["choices"][0]["message"]["content"].startswith("{")
