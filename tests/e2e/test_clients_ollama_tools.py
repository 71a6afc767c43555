"""Tool calls through the official ``ollama`` client against a two real ``exo`` nodes serving the tiny
model with a tool template: Ollama's ``tools`` and ``message.tool_calls`` (arguments as objects)
go the chat API's tools path, a call forced by constrained decoding, streamed and not."""
from __future__ import annotations

from pathlib import Path

import jsonschema
import ollama
import pytest


pytestmark = pytest.mark.slow

# What the ollama client's Tool model keeps of a schema (it drops minimum, additionalProperties, ...).
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "enum": [1, 2, 3, 4, 5, 6, 7]}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "The forecast", "parameters": WEATHER}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# The tools as the template sees them: as the client sends them, the parameters closed (Ollama's
# take only the properties they list).
SENT = ollama.Tool.model_validate(TOOLS[0]).model_dump(exclude_none=True)
CLOSED = [{**SENT, "function": {**SENT["function"],
                                "parameters": {"additionalProperties": False, **SENT["function"]["parameters"]}}}]
FORCED = {"temperature": 0, "num_predict": 60, "tool_choice": {"type": "function", "function": {"name": "weather"}}}


@pytest.fixture(scope="module")
def model_dir(tools_model: Path) -> Path:
    return tools_model


@pytest.fixture(scope="module")
def client(tools_node):
    return ollama.Client(host=tools_node.api_url, headers={"Authorization": f"Bearer {tools_node.secret}"},
                         trust_env=False)


def test_a_forced_call_comes_back_as_ollama_tool_calls_streamed_and_not(client):
    whole = client.chat(model="tools", messages=MESSAGES, tools=TOOLS, options=FORCED)
    [call] = whole.message.tool_calls
    assert call.function.name == "weather" and whole.done_reason == "stop"
    jsonschema.validate(dict(call.function.arguments), WEATHER)
    assert "<tool_call>" not in whole.message.content
    parts = list(client.chat(model="tools", messages=MESSAGES, tools=TOOLS, options=FORCED, stream=True))
    [streamed] = [c for p in parts for c in (p.message.tool_calls or [])]
    assert (streamed.function.name, dict(streamed.function.arguments)) == ("weather", dict(call.function.arguments))
    assert parts[-1].done and parts[-1].done_reason == "stop"


def test_a_call_and_its_result_go_back_through_the_template(client, model_dir):
    from mlx_lm.utils import load_tokenizer

    call = {"function": {"name": "weather", "arguments": {"city": "Oslo", "days": 2}}}
    turn = [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sunny, 21 C", "tool_name": "weather"}]
    answer = client.chat(model="tools", messages=turn, tools=TOOLS, options={"temperature": 0, "num_predict": 4,
                                                                             "tool_choice": "none"})
    assert answer.done and not answer.message.tool_calls
    expected = load_tokenizer(model_dir).apply_chat_template(
        [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [call]},
         {"role": "tool", "content": "sunny, 21 C"}], tools=CLOSED, add_generation_prompt=True)
    assert answer.prompt_eval_count == len(expected)


def test_show_lists_tools_and_generate_refuses_them(client):
    assert "tools" in client.show("tools").capabilities
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="tools", prompt="hi", options={"tool_choice": "required"})
    assert refused.value.status_code == 400 and "tool_choice" in refused.value.error
