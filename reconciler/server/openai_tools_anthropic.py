"""The Messages API's tool use as the chat API's tools: ``tools`` / ``tool_choice``, and the
``tool_use`` / ``tool_result`` content blocks of the conversation (pure translations)."""
from __future__ import annotations

import json
from typing import Any

from reconciler.server.openai_requests import bad_field

CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def anthropic_tools(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``tools`` and ``tool_choice`` fields the body's tool fields mean."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    out: dict[str, Any] = {}
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_field("tools", "must be a list of tools", tools)
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("input_schema", {}), dict):
                raise bad_field(f"tools[{index}]", "must be an object with a name and an input_schema object", tool)
        out["tools"] = [{"type": "function", "function": {
            "name": tool.get("name"), "description": tool.get("description", ""),
            "parameters": tool.get("input_schema") or {"type": "object"}}} for tool in tools]
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in CHOICES:
            out["tool_choice"] = CHOICES[kind]
        else:
            raise bad_field("tool_choice.type", "must be auto, any, tool or none", kind)
    return out


def anthropic_messages(messages: list[Any]) -> list[Any]:
    """The conversation with ``tool_use`` blocks as assistant tool calls and ``tool_result``
    blocks as ``tool`` messages (other messages unchanged)."""
    out: list[Any] = []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not any(
                isinstance(b, dict) and b.get("type") in ("tool_use", "tool_result") for b in content):
            out.append(message)
            continue
        texts = [b for b in content if isinstance(b, dict) and b.get("type") == "text"]
        calls, results = [], []
        for block in content:
            if not isinstance(block, dict):
                raise bad_field(f"messages[{index}].content", "must be a list of content blocks", block)
            if block.get("type") == "tool_use":
                calls.append({"id": block.get("id"), "type": "function", "function": {
                    "name": block.get("name"), "arguments": json.dumps(block.get("input", {}))}})
            elif block.get("type") == "tool_result":
                results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                "content": _result_text(block.get("content", ""), f"messages[{index}]")})
        if calls:
            out.append({"role": "assistant", "content": texts, "tool_calls": calls})
        else:
            out.extend(results + ([{"role": message["role"], "content": texts}] if texts else []))
    return out


def _result_text(content: Any, path: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "".join(str(b.get("text", "")) for b in content)
    raise bad_field(f"{path}.content", "a tool_result's content must be a string or text blocks", content)


def tool_use_blocks(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat API's tool calls as ``tool_use`` content blocks."""
    return [{"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
             "input": json.loads(call["function"]["arguments"])} for call in tool_calls]
