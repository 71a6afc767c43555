"""The Ollama API on the node's port: ``POST /api/chat``, ``POST /api/generate``, ``GET /api/tags``
and ``POST /api/show``, each a thin translation onto the OpenAI API's request path (the same
parsing, bounds, admission and generation), answering in Ollama's shapes (NDJSON when streaming,
which is Ollama's default). Auth: role ``inference``, like /v1 (server/auth.py's route table).

``options`` that change what is generated are honoured (temperature, top_p, top_k, min_p, seed,
num_predict, stop, repeat_penalty, presence_penalty, frequency_penalty) or refused with 400;
the runtime ones (num_ctx, num_gpu, num_thread, ...) are the deployment's business and ignored.
``tools`` in /api/chat go the chat API's tools path (openai_tools.py): Ollama's tool calls carry
their arguments as objects, and its tool parameters are closed (only the listed properties);
``options.tool_choice`` (an exo extension, the OpenAI values) forces a call.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from reconciler.inference.backend import NotReady, PipelineError
from reconciler.server.openai_errors import OpenAIError
from reconciler.server.openai_requests import bad_field, parse_chat_request, parse_completion_request

NDJSON = "application/x-ndjson"
OLLAMA_DEFAULT_TEMPERATURE = 0.8
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
           "num_predict": "max_tokens", "stop": "stop", "repeat_penalty": "repetition_penalty",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
           "tool_choice": "tool_choice"}
RUNTIME_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread",
                             "numa", "low_vram", "vocab_only", "num_keep"})
REFUSED = {"images": (None, []), "tools": (None, []), "think": (None, False), "logprobs": (None, False),
           "suffix": (None, ""), "context": (None, []), "template": (None, "")}


OLLAMA_PATHS = frozenset({"/api/chat", "/api/generate", "/api/tags", "/api/show"})


def ollama_error_response(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    """Ollama's error shape: ``{"error": "..."}``."""
    return web.json_response({"error": message}, status=status, headers=headers)


def add_ollama_routes(app: web.Application, api: Any, *, clock: Callable[[], float] = time.time) -> None:
    """``api``: the node's ``OpenAIApi``."""
    ollama = OllamaApi(api, clock=clock)
    app.router.add_post("/api/chat", _answering_errors(ollama.chat))
    app.router.add_post("/api/generate", _answering_errors(ollama.generate))
    app.router.add_get("/api/tags", _answering_errors(ollama.tags))
    app.router.add_post("/api/show", _answering_errors(ollama.show))


def _answering_errors(handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OpenAIError as error:  # Ollama's error shape: {"error": "..."}
            return ollama_error_response(error.status, error.message, headers=error.headers)
    return handle


def openai_body(body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    """An Ollama chat or generate body as the OpenAI body it means (pure)."""
    for field, allowed in REFUSED.items():
        if field == "tools" and chat:
            continue
        if field in body and body[field] not in allowed:
            raise bad_field(field, "is not supported on the Ollama API of this server", body[field])
    translated: dict[str, Any] = {"model": body.get("model"), "stream": body.get("stream", True),
                                  "temperature": OLLAMA_DEFAULT_TEMPERATURE}
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad_field("options", "must be an object", options)
    for name, value in options.items():
        if name in OPTIONS:
            if not (name == "num_predict" and isinstance(value, int) and value < 0):  # -1: until the end
                translated[OPTIONS[name]] = value
        elif name not in RUNTIME_OPTIONS:
            raise bad_field(f"options.{name}", "is not supported by this server", value)
    fmt = body.get("format")
    if fmt == "json":
        translated["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        translated["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise bad_field("format", 'must be "json" or a JSON schema', fmt)
    if chat:
        translated["messages"] = _chat_messages(body.get("messages"))
        if body.get("tools") not in (None, []):
            translated["tools"] = _closed_tools(body["tools"])
    elif body.get("raw"):
        translated["prompt"] = body.get("prompt")
    else:  # Ollama applies the model's template to a generate prompt
        system = [{"role": "system", "content": body["system"]}] if body.get("system") else []
        translated["messages"] = [*system, {"role": "user", "content": body.get("prompt")}]
    if "response_format" in translated and "messages" not in translated:
        raise bad_field("format", "needs raw: false (constrained output goes through the chat path)", fmt)
    return translated


def _closed_tools(tools: Any) -> Any:
    """Ollama's tools as OpenAI's function tools. Ollama's tool schema cannot say
    ``additionalProperties`` (its clients drop it), so parameters take only the properties they list."""
    if not isinstance(tools, list):
        return tools  # the tools parser names what is wrong
    out = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        parameters = function.get("parameters") if isinstance(function, dict) else None
        if isinstance(parameters, dict) and parameters.get("type") == "object" and "properties" in parameters:
            tool = {**tool, "function": {**function, "parameters": {"additionalProperties": False, **parameters}}}
        out.append(tool)
    return out


def _chat_messages(messages: Any) -> Any:
    """Ollama's messages as the chat API's: a tool call gets an id and its arguments as JSON text."""
    if not isinstance(messages, list):
        return messages  # the chat parser names what is wrong
    out = []
    for index, message in enumerate(messages):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list):
            message = {**message, "tool_calls": [_openai_call(call, f"{index}_{n}") for n, call in enumerate(calls)]}
        out.append(message)
    return out


def _openai_call(call: Any, number: str) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call  # the chat parser refuses it, naming the field
    arguments = function.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{number}", "type": "function", "function": {**function, "arguments": text}}


def ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat API's tool calls in Ollama's shape: the function's name and arguments as an object."""
    return [{"function": {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}}
            for call in calls]


class OllamaApi:
    def __init__(self, api: Any, *, clock: Callable[[], float]) -> None:
        self.api, self.clock = api, clock

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.api.generate(request, parse=lambda body: parse_chat_request(openai_body(body, chat=True)),
                                       answer=self._answer(field="message"))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        def parse(body: dict[str, Any]) -> Any:
            translated = openai_body(body, chat=False)
            if translated.get("prompt", "") == "" and not translated.get("messages", [{}])[-1].get("content"):
                raise _Loaded(str(body.get("model")))
            return (parse_chat_request if "messages" in translated else parse_completion_request)(translated)

        try:
            return await self.api.generate(request, parse=parse, answer=self._answer(field="response"))
        except _Loaded as loaded:  # an empty prompt only loads the model, in Ollama
            self.api.resolve(loaded.model)
            return web.json_response({"model": loaded.model, "created_at": self._now(), "response": "",
                                      "done": True, "done_reason": "load"})

    async def tags(self, request: web.Request) -> web.Response:
        models = [{"name": card.name, "model": card.name, "modified_at": _iso(card.created), "size": 0,
                   "digest": "", "details": {"format": "mlx", "family": "", "parameter_size": "",
                                             "quantization_level": ""}}
                  for card in self.api.backend.models() if card.ready]
        return web.json_response({"models": models})

    async def show(self, request: web.Request) -> web.Response:
        from reconciler.server.openai_api import read_json_body

        body = await read_json_body(request)
        name = body.get("model") or body.get("name")
        card = next((c for c in self.api.backend.models() if isinstance(name, str) and c.answers_to(name)), None)
        if card is None:
            raise OpenAIError(404, f"model '{name}' not found", param="model")
        handle = self.api.resolve(card.name)
        template = getattr(handle.tokenizer, "chat_template", None) or ""
        return web.json_response({
            "modelfile": "", "parameters": "", "template": template, "modified_at": _iso(card.created),
            "details": {"format": "mlx", "family": "", "parameter_size": "", "quantization_level": ""},
            "model_info": {"general.source": card.source, "context_length": handle.context_length},
            "capabilities": ["completion", *(["tools"] if getattr(handle.tokenizer, "has_tool_calling", False)
                                             else [])]})

    def _answer(self, *, field: str) -> Callable[..., Any]:
        async def answer(request: web.Request, runs: list[Any]) -> tuple[web.StreamResponse, int | str]:
            from reconciler.server.openai_api import CLIENT_GONE, all_pieces, client_gone, generation_failed, whole_texts

            run, started = runs[0], time.monotonic_ns()
            model = run.options.model

            def line(piece: str, **extra: Any) -> dict[str, Any]:
                content = {"role": "assistant", "content": piece} if field == "message" else piece
                return {"model": model, "created_at": self._now(), field: content, "done": False, **extra}

            def final() -> dict[str, Any]:
                elapsed = time.monotonic_ns() - started
                reason = "stop" if run.finish_reason == "tool_calls" else run.finish_reason  # Ollama's word
                return line("", done=True, done_reason=reason, total_duration=elapsed, load_duration=0,
                            prompt_eval_count=len(run.prompt_ids), prompt_eval_duration=0,
                            eval_count=run.completion_tokens, eval_duration=elapsed)

            if not run.options.stream:
                text = (await whole_texts(runs))[run.index]
                whole = final()
                whole[field] = line(text)[field]
                if run.tool_calls:
                    whole[field]["tool_calls"] = ollama_tool_calls(run.tool_calls)
                return web.json_response(whole), 200
            response = web.StreamResponse(headers={"Content-Type": NDJSON})
            try:
                await response.prepare(request)
                try:
                    async with contextlib.aclosing(all_pieces(runs)) as stream:
                        async for _, piece in stream:
                            await response.write(_ndjson(line(piece)))
                except (PipelineError, NotReady) as failure:
                    error = generation_failed(failure)
                    await response.write(_ndjson({"error": error.message}))
                    await response.write_eof()
                    return response, error.status
                if run.tool_calls:  # known once the text is through, as in Ollama: their own line
                    calls = line("")
                    calls[field]["tool_calls"] = ollama_tool_calls(run.tool_calls)
                    await response.write(_ndjson(calls))
                await response.write(_ndjson(final()))
                await response.write_eof()
            except ConnectionResetError:
                return response, CLIENT_GONE
            return response, 200 if not client_gone(request) else CLIENT_GONE

        return answer

    def _now(self) -> str:
        return datetime.fromtimestamp(self.clock(), tz=timezone.utc).isoformat().replace("+00:00", "Z")


class _Loaded(Exception):
    def __init__(self, model: str) -> None:
        self.model = model


def _ndjson(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


def _iso(unix_seconds: int) -> str:
    return datetime.fromtimestamp(unix_seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")
