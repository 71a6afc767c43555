"""Tool calls of the chat API: ``tools`` / ``tool_choice`` checked into a ``ToolRequest``, the
model's own chat template and mlx-lm's tool-call parser for its family, and constrained decoding
(an llguidance grammar) when a call is required, so even a weak model writes one that parses.

The calls are cut out of the generated text by ``ToolCallSplitter``: text before a call is
content; each call (between the parser's start and end markers) becomes a ``tool_calls`` entry.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from reconciler.datapath.wire import MAX_GRAMMAR_CHARS
from reconciler.server.openai_errors import OpenAIError

CHOICE_MODES = ("auto", "none", "required")
# The parsers whose call text a grammar can write: json_tools reads <tool_call>{name, arguments}</tool_call>.
CONSTRAINABLE_PARSERS = ("json_tools",)


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[dict[str, Any], ...]   # OpenAI's [{"type": "function", "function": {...}}]
    choice: str                         # auto, none, required, or "function" (a named one)
    name: str | None = None             # the function tool_choice names

    @property
    def functions(self) -> list[dict[str, Any]]:
        return [tool["function"] for tool in self.tools]

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")


def _bad(param: str, problem: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {problem}", param=param, code="invalid_value")


def parse_tools(body: dict[str, Any]) -> ToolRequest | None:
    """The request's tools and tool_choice (None without tools, or with an empty list)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list):
        raise _bad("tools", "must be a list of function tools")
    names: list[str] = []
    for index, tool in enumerate(tools):
        path = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise _bad(f"{path}.type", 'must be "function" with a function object')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise _bad(f"{path}.function.name", "must be a non-empty string of at most 64 characters")
        if name in names:
            raise _bad(f"{path}.function.name", f"{name!r} is given twice")
        if not isinstance(function.get("parameters", {}), dict):
            raise _bad(f"{path}.function.parameters", "must be a JSON schema object")
        names.append(name)
    if choice is None or choice in CHOICE_MODES:
        return ToolRequest(tools=tuple(tools), choice=choice or "auto")
    function = choice.get("function") if isinstance(choice, dict) else None
    named = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(named, str):
        raise _bad("tool_choice", 'must be auto, none, required or {"type": "function", "function": {"name"}}')
    if named not in names:
        raise _bad("tool_choice.function.name", f"{named!r} is not one of the tools ({', '.join(names)})")
    return ToolRequest(tools=tuple(tools), choice="function", name=named)


def template_messages(messages: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The messages as chat templates read them: tool call arguments as objects, not JSON text."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{**call, "function": {**call["function"], "arguments": _arguments(call["function"])}}
                     for call in message["tool_calls"]]
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def _arguments(function: dict[str, Any]) -> Any:
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return arguments
    return arguments


def check_tool_support(tokenizer: Any, *, model: str, tools: ToolRequest) -> None:
    """A 400 naming the model when its template or tokenizer cannot call tools (or, for a
    required call, when its call format has no grammar here)."""
    template = getattr(tokenizer, "chat_template", None)
    if not getattr(tokenizer, "has_tool_calling", False) or not isinstance(template, str) or "tools" not in template:
        raise OpenAIError(400, f"tools: the model `{model}` has no tool-call format (its chat template and "
                               f"tokenizer name no tool parser mlx-lm knows)", param="tools", code="invalid_value")
    parser = parser_name(tokenizer)
    if tools.forced and parser not in CONSTRAINABLE_PARSERS:
        raise OpenAIError(400, f"tool_choice: a required call is not supported for the model `{model}` (its "
                               f"tool parser {parser} has no grammar here; use auto)", param="tool_choice",
                          code="invalid_value")


def parser_name(tokenizer: Any) -> str | None:
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    return getattr(inner, "init_kwargs", {}).get("tool_parser_type")


def tool_grammar(tokenizer: Any, tools: ToolRequest) -> str:
    """The llguidance (lark) grammar of one call to the named function, or to any of the tools,
    written in the parser's format with the arguments matching the function's parameters."""
    from llguidance import LLMatcher

    functions = [f for f in tools.functions if tools.name in (None, f["name"])]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": f["name"]},
                             "arguments": f.get("parameters") or {"type": "object"}}} for f in functions]
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}),
              "x-guidance": {"whitespace_flexible": False}}
    start, end = json.dumps(tokenizer.tool_call_start + "\n"), json.dumps("\n" + tokenizer.tool_call_end)
    grammar = f"start: {start} call {end}\ncall: %json {json.dumps(schema)}\n"
    problem = LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise _bad("tools", f"the parameters cannot be decoded to: {problem}")
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise _bad("tools", f"the parameters compile to {len(grammar)} characters, at most {MAX_GRAMMAR_CHARS}")
    return grammar


class ToolCallSplitter:
    """Generated text → content and tool calls: ``push`` a piece, get the content that is surely
    not part of a call; ``finish`` at the end for the rest and the parsed calls."""

    def __init__(self, tokenizer: Any, tools: ToolRequest) -> None:
        self.start, self.end = tokenizer.tool_call_start, tokenizer.tool_call_end
        self.parse, self.tools = tokenizer.tool_parser, list(tools.tools)
        self._held = ""        # text that may begin a call
        self._calls: list[str] = []
        self.in_call = False

    def push(self, piece: str) -> str:
        self._held += piece
        shown = []
        while True:
            if not self.in_call:
                at = self._held.find(self.start)
                if at < 0:
                    keep = _partial_suffix(self._held, self.start)
                    shown.append(self._held[:len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep:]
                    return "".join(shown)
                shown.append(self._held[:at])
                self._held, self.in_call = self._held[at + len(self.start):], True
            at = self._held.find(self.end)
            if at < 0:
                return "".join(shown)
            self._calls.append(self._held[:at])
            self._held, self.in_call = self._held[at + len(self.end):], False

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The held text (a call cut short by the end of generation, kept as its text) and the calls."""
        tail = "" if not self.in_call else self.start
        tail, self._held = tail + self._held, ""
        calls = []
        for text in self._calls:
            try:
                parsed = self.parse(text, self.tools)
            except ValueError:  # json's errors too: a call the model garbled stays text
                tail = self.start + text + self.end + tail
                continue
            for call in parsed if isinstance(parsed, list) else [parsed]:
                calls.append({"id": call.get("id") or "call_" + secrets.token_hex(12), "type": "function",
                              "function": {"name": call["name"],
                                           "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}})
        return tail, calls


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could begin ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
