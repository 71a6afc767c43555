"""The Anthropic Messages API on the node's port: ``POST /v1/messages``, streamed (Anthropic's
server-sent events) or not, a thin translation onto the OpenAI API's request path (the same
parsing, bounds, admission and generation). Auth: role ``inference``, as every /v1 route
(``Authorization: Bearer`` or the SDK's default ``x-api-key``). Tool use goes through the chat API's
tools (openai_tools); ``thinking`` is refused with 400.
"""
from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable
from typing import Any

from aiohttp import web

from reconciler.inference.backend import NotReady, PipelineError
from reconciler.server.openai_errors import OpenAIError
from reconciler.server.openai_requests import bad_field, parse_chat_request
from reconciler.server.openai_tools_anthropic import anthropic_messages, anthropic_tools, tool_use_blocks

ANTHROPIC_DEFAULT_TEMPERATURE = 1.0
REFUSED = {"thinking": (None,), "output_config": (None,),
           "container": (None,)}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def add_anthropic_routes(app: web.Application, api: Any) -> None:
    """``api``: the node's ``OpenAIApi``."""
    app.router.add_post("/v1/messages", _answering_errors(AnthropicApi(api).messages))


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def _answering_errors(handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OpenAIError as error:
            return web.json_response(error_body(error.status, error.message), status=error.status,
                                     headers=error.headers)
    return handle


def openai_body(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages API body as the OpenAI chat body it means (pure)."""
    for field, allowed in REFUSED.items():
        if field in body and body[field] not in allowed:
            raise bad_field(field, "is not supported on the Messages API of this server yet", body[field])
    if body.get("max_tokens") is None:
        raise OpenAIError(400, "max_tokens: required", param="max_tokens", code="missing_required_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "must be a non-empty list", messages)
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            role = message.get("role") if isinstance(message, dict) else message
            raise bad_field(f"messages[{index}].role", "must be user or assistant", role)
    system = body.get("system")
    if isinstance(system, list):
        system = "".join(block.get("text", "") if isinstance(block, dict) else "" for block in system)
    if system is not None and not isinstance(system, str):
        raise bad_field("system", "must be a string or a list of text blocks", system)
    translated: dict[str, Any] = {
        "model": body.get("model"), "max_tokens": body["max_tokens"], "stream": body.get("stream", False),
        "messages": ([{"role": "system", "content": system}] if system else []) + anthropic_messages(messages),
        "temperature": body.get("temperature", ANTHROPIC_DEFAULT_TEMPERATURE), **anthropic_tools(body)}
    for ours, theirs in (("top_p", "top_p"), ("top_k", "top_k"), ("stop", "stop_sequences")):
        if body.get(theirs) is not None:
            translated[ours] = body[theirs]
    return translated


class AnthropicApi:
    def __init__(self, api: Any) -> None:
        self.api = api

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self.api.generate(request, parse=lambda body: parse_chat_request(openai_body(body)),
                                       answer=self._answer)

    async def _answer(self, request: web.Request, runs: list[Any]) -> tuple[web.StreamResponse, int | str]:
        from reconciler.server.openai_api import CLIENT_GONE, all_pieces, client_gone, generation_failed, whole_texts

        run = runs[0]
        message = {"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant",
                   "model": run.options.model}

        def stop() -> dict[str, Any]:
            stops = run.options.stop
            if run.stop_string:
                return {"stop_reason": "stop_sequence", "stop_sequence": stops[0] if len(stops) == 1 else None}
            reasons = {"length": "max_tokens", "tool_calls": "tool_use"}
            return {"stop_reason": reasons.get(run.finish_reason, "end_turn"), "stop_sequence": None}

        if not run.options.stream:
            text = (await whole_texts(runs))[run.index]
            blocks = ([{"type": "text", "text": text}] if text or not run.tool_calls else [])
            body = {**message, "content": blocks + tool_use_blocks(run.tool_calls), **stop(),
                    "usage": {"input_tokens": len(run.prompt_ids), "output_tokens": run.completion_tokens}}
            return web.json_response(body), 200
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            await response.write(_event("message_start", {"message": {
                **message, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(run.prompt_ids), "output_tokens": 0}}}))
            await response.write(_event("content_block_start", {"index": 0,
                                                                "content_block": {"type": "text", "text": ""}}))
            try:
                async with contextlib.aclosing(all_pieces(runs)) as stream:
                    async for _, piece in stream:
                        await response.write(_event("content_block_delta", {
                            "index": 0, "delta": {"type": "text_delta", "text": piece}}))
            except (PipelineError, NotReady) as failure:
                error = generation_failed(failure)
                await response.write(_event("error", error_body(error.status, error.message)))
                await response.write_eof()
                return response, error.status
            await response.write(_event("content_block_stop", {"index": 0}))
            for index, block in enumerate(tool_use_blocks(run.tool_calls), start=1):
                await response.write(_event("content_block_start", {"index": index,
                                                                    "content_block": {**block, "input": {}}}))
                await response.write(_event("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(block["input"])}}))
                await response.write(_event("content_block_stop", {"index": index}))
            await response.write(_event("message_delta", {"delta": stop(),
                                                          "usage": {"output_tokens": run.completion_tokens}}))
            await response.write(_event("message_stop", {}))
            await response.write_eof()
        except ConnectionResetError:
            return response, CLIENT_GONE
        return response, 200 if not client_gone(request) else CLIENT_GONE


def _event(kind: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps({"type": kind, **data} if kind != "error" else data, ensure_ascii=False)
    return f"event: {kind}\ndata: {payload}\n\n".encode()
