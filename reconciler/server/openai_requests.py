"""Request bodies of the OpenAI-compatible API, checked into plain values (pure functions).

Every problem is a 400 ``OpenAIError`` that names the field (``param``). Fields that this server
does not know are ignored, as OpenAI clients send many; fields whose non-default values it
cannot honour (tools, audio, ...) are refused rather than silently dropped. Sampling
fields are checked by the data path's own ``SamplingParams``, so what passes here runs there.

``max_tokens`` is checked against the model's context length once the prompt is tokenized
(``completion_budget``); when a request does not give it, it defaults to
``DEFAULT_MAX_TOKENS`` cut to what fits after the prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from reconciler.datapath.grammar import GrammarError, json_grammar
from reconciler.datapath.wire import MAX_GRAMMAR_CHARS, MAX_TOP_LOGPROBS, PENALTY_WINDOW
from reconciler.inference.backend import SamplingParams
from reconciler.server.openai_errors import OpenAIError
from reconciler.server.openai_tools import ToolRequest, parse_tools

DEFAULT_MAX_TOKENS = 512
MAX_TOKENS_LIMIT = (1 << 31) - 1   # beyond any context; the real bound is the model's context length
OPENAI_DEFAULT_TEMPERATURE = 1.0
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "logit_bias")
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")
MAX_STOP_STRINGS = 4
MAX_CHOICES = 8  # n per request (and at most the node's generation slots)
MAX_COMPLETION_LOGPROBS = 5  # the completions API's logprobs (OpenAI's bound)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class GenerationOptions:
    model: str
    params: SamplingParams
    max_tokens: int | None     # None: not given (see completion_budget)
    max_tokens_field: str      # the field clients set it with, for errors
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    n: int = 1                 # choices, generated concurrently
    tools: ToolRequest | None = None  # the chat request's tools (see openai_tools)


@dataclass(frozen=True)
class ChatRequest:
    options: GenerationOptions
    messages: tuple[dict[str, Any], ...]   # {"role", "content"} with text content (and tool calls)


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
    _refuse_unsupported(body, {"functions": (None, []), "audio": (None,)})
    options = _options(body, max_tokens_fields=("max_completion_tokens", "max_tokens"),
                       logprobs=_chat_logprobs(body))
    options = replace(options, tools=parse_tools(body))
    grammar = response_grammar(body.get("response_format"))
    if grammar is not None:
        options = replace(options, params=options.params.model_copy(update={"grammar": grammar}))
    return ChatRequest(options=options, messages=_messages(body))


def response_grammar(response_format: Any) -> str | None:
    """The llguidance grammar ``response_format`` asks for: None for text, any JSON object for
    json_object, the schema's JSON for json_schema (strict or not: decoding is always constrained)."""
    if response_format is None:
        return None
    kinds = ("text", "json_object", "json_schema")
    if not isinstance(response_format, dict) or response_format.get("type") not in kinds:
        kind = response_format.get("type") if isinstance(response_format, dict) else response_format
        raise bad_field("response_format.type", f"must be one of {', '.join(kinds)}", kind)
    if response_format["type"] == "text":
        return None
    schema, param = None, "response_format"
    if response_format["type"] == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_field("response_format.json_schema", "must be an object with a schema object", spec)
        schema, param = spec.get("schema", {}), "response_format.json_schema.schema"
    try:
        grammar = json_grammar(schema)
    except GrammarError as error:
        raise bad_field(param, f"cannot be decoded to: {error}", show_value=False) from None
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise bad_field(param, f"compiles to {len(grammar)} characters, at most {MAX_GRAMMAR_CHARS}", show_value=False)
    return grammar


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    _refuse_unsupported(body, {"best_of": (None, 1), "echo": (None, False), "suffix": (None, "")})
    logprobs = _integer(body, "logprobs", default=None, minimum=0, maximum=MAX_COMPLETION_LOGPROBS)
    return CompletionRequest(options=_options(body, max_tokens_fields=("max_tokens",), logprobs=logprobs),
                             prompt=_prompt(body))


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """How many alternatives each token's log-probability comes with (None: no logprobs)."""
    wanted = _boolean(body, "logprobs", default=False)
    top = _integer(body, "top_logprobs", default=None, minimum=0, maximum=MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise bad_field("top_logprobs", "only allowed when logprobs is true", top)
    return (top or 0) if wanted else None


# --- shared options ----------------------------------------------------------------------------

def _options(body: dict[str, Any], *, max_tokens_fields: tuple[str, ...], logprobs: int | None) -> GenerationOptions:
    model = body.get("model")
    if model is None:
        raise OpenAIError(400, "model: required (the deployment name or its served name)", param="model",
                          code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise bad_field("model", "must be a non-empty string", model)
    n = _integer(body, "n", default=1, minimum=1, maximum=MAX_CHOICES)
    stream = _boolean(body, "stream", default=False)
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise bad_field("stream_options", "only allowed when stream is true", show_value=False)
        if not isinstance(stream_options, dict):
            raise bad_field("stream_options", "must be an object", stream_options)
        include_usage = _boolean(stream_options, "include_usage", default=False, path="stream_options.")
    max_tokens_field = next((f for f in max_tokens_fields if body.get(f) is not None), max_tokens_fields[-1])
    max_tokens = _integer(body, max_tokens_field, default=None, minimum=1, maximum=MAX_TOKENS_LIMIT)
    params = sampling_params(body).model_copy(update={"logprobs": logprobs})
    return GenerationOptions(model=model, params=params, max_tokens=max_tokens,
                             max_tokens_field=max_tokens_field, stop=_stops(body), stream=stream,
                             include_usage=include_usage, n=n)


def sampling_params(body: dict[str, Any]) -> SamplingParams:
    """The request's sampling fields, checked by ``SamplingParams`` itself (OpenAI's default
    temperature is 1)."""
    fields = {field: body[field] for field in SAMPLING_FIELDS if body.get(field) is not None}
    fields.setdefault("temperature", OPENAI_DEFAULT_TEMPERATURE)
    try:
        return SamplingParams(**fields)
    except ValidationError as error:
        raise validation_failed(error, fields) from None


def bind_sampling(params: SamplingParams, *, prompt_ids: list[int], vocab_size: int) -> SamplingParams:
    """The request's sampling once its prompt is known: logit_bias ids checked against the
    vocabulary, the prompt's tail for the penalties, and a top_k that keeps every token dropped."""
    update: dict[str, Any] = {}
    too_big = [token for token in params.logit_bias if int(token) >= vocab_size]
    if too_big:
        raise bad_field("logit_bias", f"token ids must be below the vocabulary size {vocab_size}", too_big[0])
    if any(getattr(params, penalty) for penalty in PENALTIES):
        update["prompt_tail"] = prompt_ids[-PENALTY_WINDOW:]
    if params.top_k >= vocab_size:
        update["top_k"] = 0
    return params.model_copy(update=update) if update else params


def validation_failed(error: ValidationError, fields: dict[str, Any]) -> OpenAIError:
    """The first problem of a SamplingParams ValidationError as a 400 naming the field, worded
    from the field's own bounds ("must be a number from 0 to 2")."""
    first = error.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or "body"
    message = first["msg"].removeprefix("Value error, ")
    rule = _field_rule(param) or message[:1].lower() + message[1:]
    return bad_field(param, rule, fields.get(param), show_value=param in fields)


def _field_rule(name: str) -> str | None:
    info = SamplingParams.model_fields.get(name)
    if info is None:
        return None
    bounds = {key: getattr(bound, key) for bound in info.metadata for key in ("ge", "gt", "le", "lt")
              if hasattr(bound, key)}
    integer = "int" in str(info.annotation)
    if not bounds:
        return None
    low = bounds.get("ge", bounds.get("gt"))
    high = bounds.get("le", bounds["lt"] - 1 if integer and "lt" in bounds else bounds.get("lt"))
    if integer:
        return f"must be an integer from {low} to {high}"
    if "gt" in bounds:
        return f"must be a number above {low:g} and at most {high:g}"
    return f"must be a number from {low:g} to {high:g}"


def completion_budget(*, prompt_tokens: int, options: GenerationOptions, context_length: int | None,
                      prompt_param: str) -> int:
    """How many tokens the completion may have: ``max_tokens``, or the default cut to what fits
    after the prompt. A 400 (OpenAI's code ``context_length_exceeded``) when they do not fit."""
    requested = options.max_tokens
    if context_length is None:
        return DEFAULT_MAX_TOKENS if requested is None else requested
    if requested is None:
        if prompt_tokens >= context_length:
            raise _context_exceeded(f"prompt has {prompt_tokens} tokens: the model's context length is "
                                    f"{context_length}, which leaves no room for a completion", prompt_param)
        return min(DEFAULT_MAX_TOKENS, context_length - prompt_tokens)
    if prompt_tokens + requested > context_length:
        param = prompt_param if prompt_tokens >= context_length else options.max_tokens_field
        raise _context_exceeded(f"prompt has {prompt_tokens} tokens and {options.max_tokens_field} is {requested}: "
                                f"{prompt_tokens + requested} exceed the model's context length of {context_length}",
                                param)
    return requested


def refuse_surely_too_long(*, chars: int, max_token_chars: int, options: GenerationOptions,
                           context_length: int | None, prompt_param: str) -> None:
    """Refuse, before tokenizing, a text so long it cannot fit: a token covers at most
    ``max_token_chars`` characters (its longest vocabulary entry), halved for normalizers that
    merge characters. Texts near the bound are left to the exact count after tokenization."""
    if context_length is None or max_token_chars < 1:
        return
    at_least = chars // (2 * max_token_chars)
    if at_least == 0 or at_least + (options.max_tokens or 1) <= context_length:
        return
    asked = f" and {options.max_tokens_field} is {options.max_tokens}" if options.max_tokens else ""
    param = prompt_param if at_least >= context_length else options.max_tokens_field
    raise _context_exceeded(f"prompt has at least {at_least} tokens ({chars} characters){asked}: more than the "
                            f"model's context length of {context_length} allows", param)


def _context_exceeded(message: str, param: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="context_length_exceeded")


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
    checked: dict[str, Any] = {"role": role, "content": content}
    if role == "tool" and isinstance(message.get("tool_call_id"), str):
        checked["tool_call_id"] = message["tool_call_id"]
    if role == "assistant" and message.get("tool_calls"):
        checked["tool_calls"] = _tool_calls(message["tool_calls"], f"{path}.tool_calls")
    return checked


def _tool_calls(calls: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise bad_field(path, "must be a list of tool calls", calls)
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_field(f"{path}[{index}].function", "must be an object with a name and arguments", call)
    return calls


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


def _integer(body: dict[str, Any], field: str, *, default: Any, minimum: int, maximum: int | None = None) -> Any:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if maximum is not None and _is_int(value) and value > maximum:
        raise bad_field(field, f"must be an integer from {minimum} to {maximum}", value)
    if not _is_int(value) or value < minimum:
        raise bad_field(field, f"must be an integer >= {minimum}", value)
    return value


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
