"""Tool calls on the chat API: the model's own template (the tiny model with a Hermes-style tool
template, read by mlx-lm's json_tools parser), calls cut out of the text into ``tool_calls``,
streamed and not, and required or named calls forced by constrained decoding on the real
random-weight model."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest

from reconciler.inference.backend import ModelCard
from reconciler.inference.local import LocalBackend

from tests.inference.backend_twin import ScriptedModel, TwinBackend
from tests.inference.conftest import backend, tiny_model_dir  # noqa: F401
from tests.inference.inference_helpers import AUTH, serve

CHAT = "/v1/chat/completions"
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "The forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "clock", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
             "additionalProperties": False}}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCRIPT = 'Let me look.<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


@pytest.fixture(scope="module")
def tools_model_dir() -> Path:
    from exo_ctl.model_builder.tools_model import build_tools_model

    return build_tools_model()


@pytest.fixture(scope="module")
def tools_tokenizer(tools_model_dir: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tools_model_dir)


@pytest.fixture(scope="module")
def tools_backend(tools_model_dir: Path):
    backend = LocalBackend({"tools": tools_model_dir})
    asyncio.run(backend.load())
    yield backend
    backend.close()


@pytest.fixture
def scripted(tools_tokenizer) -> TwinBackend:
    script = tools_tokenizer.encode(SCRIPT, add_special_tokens=False) + [min(tools_tokenizer.eos_token_ids)]
    card = ModelCard(name="tools", ready=True, state="Ready", created=1700000000, source="hf://org/tools")
    return TwinBackend(cards=[card], handles={"tools": ScriptedModel(tools_tokenizer, script)})


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_a_call_in_the_text_becomes_tool_calls_and_the_stream_says_the_same(scripted):
    body = {"model": "tools", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 100}
    async with await serve(scripted) as api:
        whole = (await (await api.post(CHAT, headers=AUTH, json=body)).json())["choices"][0]
        stream = await api.post(CHAT, headers=AUTH, json={**body, "stream": True})
        events = _events(await stream.text())
    assert whole["finish_reason"] == "tool_calls"
    assert whole["message"]["content"] == "Let me look."
    [call] = whole["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}
    deltas = [choice["delta"] for event in events for choice in event["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me look."
    [streamed] = [c for d in deltas for c in d.get("tool_calls", [])]
    assert streamed["index"] == 0 and streamed["function"] == call["function"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_choice_none_leaves_the_text_as_it_is(scripted):
    body = {"model": "tools", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "none", "max_tokens": 100}
    async with await serve(scripted) as api:
        answer = (await (await api.post(CHAT, headers=AUTH, json=body)).json())["choices"][0]
    assert answer["finish_reason"] == "stop" and "tool_calls" not in answer["message"]
    assert answer["message"]["content"] == SCRIPT


async def test_tool_results_go_through_the_models_template(scripted, tools_tokenizer):
    called = {"id": "call_1", "type": "function",
              "function": {"name": "weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [called]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    body = {"model": "tools", "messages": messages, "tools": TOOLS, "max_tokens": 100}
    async with await serve(scripted) as api:
        response = await api.post(CHAT, headers=AUTH, json=body)
        assert response.status == 200, await response.text()
    prompt = scripted.handles["tools"].requests[-1][0]
    text = tools_tokenizer.decode(prompt)
    assert '<tool_response>\nsunny, 21 C\n</tool_response>' in text
    assert '{"name": "weather", "arguments": {"city": "Paris", "days": 2}}' in text
    assert '"name": "clock"' in text  # the tools themselves, as the template lists them


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_required_call_from_a_weak_model_always_parses_and_matches_its_schema(tools_backend, seed):
    body = {"model": "tools", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
            "temperature": 1.0, "seed": seed, "max_tokens": 80}
    async with await serve(tools_backend) as api:
        answer = (await (await api.post(CHAT, headers=AUTH, json=body)).json())["choices"][0]
    assert answer["finish_reason"] == "tool_calls", answer
    [call] = answer["message"]["tool_calls"]
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


async def test_a_named_function_is_the_one_called_streamed_or_not(tools_backend):
    body = {"model": "tools", "messages": MESSAGES, "tools": TOOLS, "temperature": 0, "max_tokens": 80,
            "tool_choice": {"type": "function", "function": {"name": "weather"}}}
    async with await serve(tools_backend) as api:
        whole = (await (await api.post(CHAT, headers=AUTH, json=body)).json())["choices"][0]
        events = _events(await (await api.post(CHAT, headers=AUTH, json={**body, "stream": True})).text())
    [call] = whole["message"]["tool_calls"]
    assert call["function"]["name"] == "weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    [streamed] = [c for e in events for choice in e["choices"] for c in choice["delta"].get("tool_calls", [])]
    assert streamed["function"] == call["function"]


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name", "not one of"),
    ({"tool_choice": "always"}, "tool_choice", "must be auto"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name", "non-empty"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", '"function"'),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "response_format"),
])
async def test_a_bad_tools_request_is_a_400_naming_the_field(scripted, fields, param, words):
    body = {"model": "tools", "messages": MESSAGES, "tools": TOOLS, **fields}
    async with await serve(scripted) as api:
        response = await api.post(CHAT, headers=AUTH, json=body)
        error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == param and words in error["message"], error


async def test_a_model_without_a_tool_template_is_refused_by_name(backend):  # noqa: F811
    body = {"model": "exo/tiny", "messages": MESSAGES, "tools": TOOLS}
    async with await serve(backend) as api:
        response = await api.post(CHAT, headers=AUTH, json=body)
        error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == "tools" and "`exo/tiny`" in error["message"]


async def test_anthropic_tool_use_and_tool_result_blocks_map_onto_the_same_calls(scripted, tools_tokenizer):
    turn = [*MESSAGES,
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, {
                "type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo", "days": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"}]}]
    body = {"model": "tools", "max_tokens": 100, "messages": turn,
            "tools": [{"name": "weather", "input_schema": WEATHER}], "tool_choice": {"type": "auto"}}
    async with await serve(scripted) as api:
        answer = await (await api.post("/v1/messages", headers=AUTH, json=body)).json()
        stream = await (await api.post("/v1/messages", headers=AUTH, json={**body, "stream": True})).text()
    assert answer["stop_reason"] == "tool_use", answer
    assert answer["content"][0] == {"type": "text", "text": "Let me look."}
    assert answer["content"][1]["type"] == "tool_use" and answer["content"][1]["input"] == {"city": "Paris", "days": 2}
    text = tools_tokenizer.decode(scripted.handles["tools"].requests[0][0])
    assert 'Checking.<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo", "days": 1}}' in text
    assert "<tool_response>\nrain\n</tool_response>" in text
    events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: ")]
    started = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [b["type"] for b in started] == ["text", "tool_use"] and started[1]["name"] == "weather"
    partial = "".join(e["delta"]["partial_json"] for e in events if e.get("delta", {}).get("type") == "input_json_delta")
    assert json.loads(partial) == {"city": "Paris", "days": 2}
    assert [e for e in events if e["type"] == "message_delta"][0]["delta"]["stop_reason"] == "tool_use"
