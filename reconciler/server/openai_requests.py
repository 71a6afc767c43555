"""Request bodies of the OpenAI-compatible API, checked into plain values (pure functions).

Every problem is a 400 ``OpenAIError`` that names the field (``param``). Fields that this server
does not know are ignored, as OpenAI clients send many; fields whose non-default values it
cannot honour (n > 1, logprobs, tools, ...) are refused rather than silently dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from reconciler.inference.backend import SamplingParams
from reconciler.server.openai_errors import OpenAIError

DEFAULT_MAX_TOKENS = 512
MAX_STOP_STRINGS = 4
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class GenerationOptions:
    model: str
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    options: GenerationOptions
    messages: tuple[dict[str, str], ...]   # {"role", "content"} with text content


@dataclass(frozen=True)
class CompletionRequest:
    options: GenerationOptions
    prompt: str | tuple[int, ...]          # text, or token ids


def bad_field(param: str, problem: str, value: Any = None, *, show_value: bool = True) -> OpenAIError:
    shown = f", got {_show(value)}" if show_value else ""
    return OpenAIError(400, f"{param}: {problem}{shown}", param=param, code="invalid_value")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise OpenAIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
    return body


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    _refuse_unsupported(body, {"logprobs": (None, False), "top_logprobs": (None, 0),
                               "tools": (None, []), "functions": (None, []), "audio": (None,)})
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad_field("response_format", 'only {"type": "text"} is supported', response_format)
    return ChatRequest(options=_options(body, max_tokens_fields=("max_completion_tokens", "max_tokens")),
                       messages=_messages(body))


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    _refuse_unsupported(body, {"logprobs": (None, 0), "best_of": (None, 1), "echo": (None, False),
                               "suffix": (None, "")})
    return CompletionRequest(options=_options(body, max_tokens_fields=("max_tokens",)), prompt=_prompt(body))


# --- shared options ----------------------------------------------------------------------------

def _options(body: dict[str, Any], *, max_tokens_fields: tuple[str, ...]) -> GenerationOptions:
    model = body.get("model")
    if model is None:
        raise OpenAIError(400, "model: required (the deployment name or its served name)", param="model",
                          code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise bad_field("model", "must be a non-empty string", model)
    n = _integer(body, "n", default=1, minimum=1)
    if n != 1:
        raise bad_field("n", "only 1 choice per request is supported", n)
    stream = _boolean(body, "stream", default=False)
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise bad_field("stream_options", "only allowed when stream is true", show_value=False)
        if not isinstance(stream_options, dict):
            raise bad_field("stream_options", "must be an object", stream_options)
        include_usage = _boolean(stream_options, "include_usage", default=False, path="stream_options.")
    params = SamplingParams(
        max_tokens=_max_tokens(body, max_tokens_fields),
        temperature=_number(body, "temperature", default=1.0, minimum=0.0, maximum=2.0),
        top_p=_number(body, "top_p", default=1.0, minimum=0.0, maximum=1.0),
        seed=_seed(body),
    )
    return GenerationOptions(model=model, params=params, stop=_stops(body), stream=stream,
                             include_usage=include_usage)


def _max_tokens(body: dict[str, Any], fields: tuple[str, ...]) -> int:
    for field in fields:
        if body.get(field) is not None:
            return _integer(body, field, default=DEFAULT_MAX_TOKENS, minimum=1)
    return DEFAULT_MAX_TOKENS


def _seed(body: dict[str, Any]) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if not _is_int(seed) or not -2**63 <= seed < 2**64:
        raise bad_field("seed", "must be an integer", seed)
    return seed % 2**64  # mx.random.seed takes an unsigned 64-bit value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_field("stop", "must be a string or a list of strings", stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_field("stop", f"at most {MAX_STOP_STRINGS} stop strings", len(stops))
    if any(not s for s in stops):
        raise bad_field("stop", "stop strings must not be empty", stop)
    return tuple(stops)


# --- chat messages and completion prompts ------------------------------------------------------

def _messages(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
    messages = body.get("messages")
    if messages is None:
        raise OpenAIError(400, "messages: required (a list of {role, content})", param="messages",
                          code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "must be a non-empty list", messages)
    return tuple(_message(message, f"messages[{i}]") for i, message in enumerate(messages))


def _message(message: Any, path: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise bad_field(path, "must be an object with role and content", message)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise bad_field(f"{path}.role", f"must be one of {', '.join(CHAT_ROLES)}", role)
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        content = "".join(_text_part(part, f"{path}.content[{j}]") for j, part in enumerate(content))
    if not isinstance(content, str):
        raise bad_field(f"{path}.content", "must be a string or a list of text parts", content)
    return {"role": role, "content": content}


def _text_part(part: Any, path: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, dict) else part
        raise bad_field(f"{path}.type", 'only "text" content parts are supported', kind)
    if not isinstance(part.get("text"), str):
        raise bad_field(f"{path}.text", "must be a string", part.get("text"))
    return part["text"]


def _prompt(body: dict[str, Any]) -> str | tuple[int, ...]:
    prompt = body.get("prompt")
    if prompt is None:
        raise OpenAIError(400, "prompt: required (a string or a list of token ids)", param="prompt",
                          code="missing_required_parameter")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return tuple(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_field("prompt", f"only one prompt per request is supported, got {len(prompt)}", show_value=False)
    raise bad_field("prompt", "must be a string or a non-empty list of token ids (integers >= 0)", prompt)


# --- scalar fields -----------------------------------------------------------------------------

def _refuse_unsupported(body: dict[str, Any], defaults: dict[str, tuple[Any, ...]]) -> None:
    for field, allowed in defaults.items():
        if field in body and body[field] not in allowed:
            raise bad_field(field, "is not supported by this server", body[field])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict[str, Any], field: str, *, default: int, minimum: int) -> int:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or value < minimum:
        raise bad_field(field, f"must be an integer >= {minimum}", value)
    return value


def _number(body: dict[str, Any], field: str, *, default: float, minimum: float, maximum: float) -> float:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value <= maximum:
        raise bad_field(field, f"must be a number from {minimum:g} to {maximum:g}", value)
    return float(value)


def _boolean(body: dict[str, Any], field: str, *, default: bool, path: str = "") -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_field(path + field, "must be true or false", value)
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
