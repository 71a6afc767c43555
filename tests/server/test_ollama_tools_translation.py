"""Ollama's tools onto the chat API's: tool calls get ids and JSON-text arguments on the way in
and objects on the way out, parameters are closed, and generate still refuses tools."""
from __future__ import annotations

import json

import pytest

from reconciler.server.ollama_api import ollama_tool_calls, openai_body
from reconciler.server.openai_errors import OpenAIError

TOOL = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_a_chat_body_with_tools_and_a_past_call_reads_as_the_openai_body():
    call = {"function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    body = {"model": "m", "tools": [TOOL], "options": {"tool_choice": "required"},
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "content": "sunny", "tool_name": "weather"}]}
    translated = openai_body(body, chat=True)
    assert translated["tool_choice"] == "required"
    assert translated["tools"][0]["function"]["parameters"]["additionalProperties"] is False
    [openai_call] = translated["messages"][1]["tool_calls"]
    assert openai_call["type"] == "function" and openai_call["id"]
    assert json.loads(openai_call["function"]["arguments"]) == {"city": "Oslo"}


def test_answered_calls_carry_their_arguments_as_objects():
    calls = [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Lima"}'}}]
    assert ollama_tool_calls(calls) == [{"function": {"name": "weather", "arguments": {"city": "Lima"}}}]


def test_generate_refuses_tools_naming_the_field():
    with pytest.raises(OpenAIError) as refused:
        openai_body({"model": "m", "prompt": "hi", "tools": [TOOL]}, chat=False)
    assert refused.value.status == 400 and refused.value.message.startswith("tools:")
