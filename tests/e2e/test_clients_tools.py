"""Tool calls through real clients (``openai``, langchain-openai's ``bind_tools``) against two real
``exo`` nodes serving the tiny model with a tool template over two stages: the call is forced by
constrained decoding at the last stage, the result goes back through the template, and the
streamed and non-streamed forms agree."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from harness.serving import client_for

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "The forecast", "parameters": WEATHER}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCED = {"type": "function", "function": {"name": "weather"}}


@pytest.fixture(scope="module")
def model_dir(tools_model: Path) -> Path:
    return tools_model


@pytest.fixture(scope="module")
def node(tools_node):
    return tools_node


@pytest.fixture(scope="module")
def openai_client(node):
    return client_for(node)


def test_a_tool_round_trip_with_the_openai_client_streamed_and_not(openai_client, model_dir):
    from mlx_lm.utils import load_tokenizer

    first = openai_client.chat.completions.create(model="tools", messages=MESSAGES, tools=TOOLS, tool_choice=FORCED,
                                                  temperature=0, max_tokens=60)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    stream = openai_client.chat.completions.create(model="tools", messages=MESSAGES, tools=TOOLS, tool_choice=FORCED,
                                                   temperature=0, max_tokens=60, stream=True)
    chunks = [c for c in stream if c.choices]
    [streamed] = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    messages = [*MESSAGES, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = openai_client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, temperature=0,
                                                   max_tokens=8, tool_choice="none")
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.tool_calls is None
    expected = load_tokenizer(model_dir).apply_chat_template(
        [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "weather", "arguments": json.loads(call.function.arguments)}}]},
         {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}],
        tools=TOOLS, add_generation_prompt=True)
    assert answer.usage.prompt_tokens == len(expected)  # the call and its result went through the template


def test_langchain_bind_tools_gets_a_call_that_matches_the_tool(openai_client):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Pick(BaseModel):
        """Pick a colour."""

        colour: str = Field(json_schema_extra={"enum": ["red", "blue"]})
        score: int = Field(ge=0, le=9)

    chat = ChatOpenAI(model="tools", base_url=str(openai_client.base_url), api_key=openai_client.api_key,
                      max_retries=0, temperature=0.8, max_tokens=80, http_client=openai_client._client)
    message = chat.bind_tools([Pick], tool_choice="Pick", strict=True).invoke("Pick a colour.")
    [call] = message.tool_calls
    assert call["name"] == "Pick"
    picked = Pick(**call["args"])
    assert picked.colour in ("red", "blue") and 0 <= picked.score <= 9


def test_anthropic_tool_use_blocks_round_trip_streamed_and_not(node):
    import anthropic

    client = anthropic.Anthropic(base_url=node.api_url, auth_token=node.secret, api_key=None, max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(trust_env=False, timeout=60))
    fields = {"model": "tools", "max_tokens": 60, "messages": MESSAGES, "extra_body": {"temperature": 0},
              "tools": [{"name": "weather", "description": "The forecast", "input_schema": WEATHER}],
              "tool_choice": {"type": "tool", "name": "weather"}}
    message = client.messages.create(**fields)
    assert message.stop_reason == "tool_use"
    [use] = [block for block in message.content if block.type == "tool_use"]
    assert use.name == "weather"
    jsonschema.validate(use.input, WEATHER)
    with client.messages.stream(**fields) as stream:
        final = stream.get_final_message()
    [streamed] = [block for block in final.content if block.type == "tool_use"]
    assert (streamed.name, streamed.input, final.stop_reason) == (use.name, use.input, "tool_use")

    turn = [*MESSAGES, {"role": "assistant", "content": [use.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    answer = client.messages.create(**{**fields, "messages": turn, "tool_choice": {"type": "none"}, "max_tokens": 8})
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.content[0].type == "text"
