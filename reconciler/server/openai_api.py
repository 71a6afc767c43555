"""The OpenAI-compatible API of a node: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, streaming (server-sent events) or not, over an ``InferenceBackend``.

The app's auth middleware guards ``/v1/`` (the cluster token is the API key). A client that
leaves mid-request cancels its generation (the backend's token iterator is closed).

Checked at the door, before any compute: the body size (413), the fields (400), the prompt and
``max_tokens`` against the model's context length (400); then the request waits for one of the
node's generation slots, or gets a 429 with Retry-After when the queue is full.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web

from reconciler.datapath.sampled import Sampled
from reconciler.datapath.wire import SEED_RANGE
from reconciler.inference.backend import InferenceBackend, ModelHandle, NotReady, PipelineError
from reconciler.inference.text import TextDeltas
from reconciler.metrics import NodeMetrics
from reconciler.server.admission import Overloaded, RequestAdmission
from reconciler.server.bodies import read_body
from reconciler.server.errors import ApiError
from reconciler.server.anthropic_api import add_anthropic_routes
from reconciler.server.embeddings_api import add_embeddings_routes
from reconciler.server.ollama_api import add_ollama_routes
from reconciler.server.openai_errors import OpenAIError
from reconciler.server.openai_logprobs import TokenLogprob, chat_logprobs, completion_logprobs, token_logprob
from reconciler.server.openai_requests import (
    ChatRequest,
    CompletionRequest,
    GenerationOptions,
    bad_field,
    bind_sampling,
    completion_budget,
    parse_chat_request,
    refuse_surely_too_long,
    parse_completion_request,
    parse_json_body,
)
from reconciler.server.openai_tools import ToolCallSplitter, check_tool_support, template_messages, tool_grammar

CLIENT_GONE = "499"  # the metrics status of a request whose client left (nginx's convention)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Handler = Callable[[web.Request], Any]
# Writes the response for a request's choices: (response, status for the metrics).
Answer = Callable[[web.Request, list["_Generation"]], Awaitable[tuple[web.StreamResponse, int | str]]]
MAX_BODY_BYTES = 1 << 20       # a /v1 request body beyond this is a 413
DEFAULT_MAX_CONCURRENT = 8     # requests generating at once on this entry node
DEFAULT_MAX_QUEUED = 32        # requests waiting for a slot; beyond: 429
RETRY_AFTER_S = 1


def add_openai_routes(app: web.Application, *, backend: InferenceBackend, metrics: NodeMetrics | None = None,
                      clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                      max_concurrent: int = DEFAULT_MAX_CONCURRENT, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
    admission = RequestAdmission(max_running=max_concurrent, max_queued=max_queued)
    if metrics:
        metrics.inference_queued.set_function(lambda: admission.queued)
    api = OpenAIApi(backend=backend, metrics=metrics, clock=clock, monotonic=monotonic, admission=admission)
    app.router.add_get("/v1/models", _answering_errors(api.list_models))
    app.router.add_get("/v1/models/{model:.+}", _answering_errors(api.get_model))
    app.router.add_post("/v1/chat/completions", _answering_errors(api.chat_completions))
    app.router.add_post("/v1/completions", _answering_errors(api.completions))
    add_ollama_routes(app, api, clock=clock)
    add_anthropic_routes(app, api)
    add_embeddings_routes(app, api)


def _answering_errors(handler: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OpenAIError as error:
            return error.response()
    return handle


# --- response shapes ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Shape:
    """How chat and text completions differ on the wire."""

    chat: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    @property
    def id_prefix(self) -> str:
        return "chatcmpl-" if self.chat else "cmpl-"

    def choice(self, text: str, finish_reason: str | None, *, index: int = 0, logprobs: dict | None = None,
               tool_calls: list[dict] | None = None) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text or (None if tool_calls else "")}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def delta(self, text: str | None, finish_reason: str | None, *, first: bool = False, index: int = 0,
              logprobs: dict | None = None) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


CHAT, TEXT = _Shape(chat=True), _Shape(chat=False)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


# --- one generation ----------------------------------------------------------------------------

class _Generation:
    """One request's generation: token ids → text pieces, with the counts, the finish reason and
    the metrics. Iterate ``pieces()`` (and close it to cancel)."""

    def __init__(self, *, handle: ModelHandle, prompt_ids: list[int], options: GenerationOptions,
                 max_tokens: int, observe: "_Observer", index: int = 0) -> None:
        self.handle, self.prompt_ids, self.options, self.observe = handle, prompt_ids, options, observe
        self.max_tokens, self.index = max_tokens, index
        seed = options.params.seed  # each choice draws its own sequence
        self.params = options.params if not index or seed is None else options.params.model_copy(
            update={"seed": (seed + index) % SEED_RANGE})
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stop_string = False  # ended by one of the request's stop strings
        self.logprobs: list[TokenLogprob] = []  # one per completion token, when the request asked
        self._logprobs_taken = 0
        self._text_offset = 0
        tools = options.tools
        self.splitter = ToolCallSplitter(handle.tokenizer, tools) if tools and tools.choice != "none" else None
        self.tool_calls: list[dict] = []

    def take_logprobs(self, shape: _Shape) -> dict | None:
        """The log-probabilities of the tokens since the last take, in the shape's form."""
        if self.options.params.logprobs is None:
            return None
        entries = self.logprobs[self._logprobs_taken:]
        self._logprobs_taken = len(self.logprobs)
        if shape.chat:
            return chat_logprobs(entries)
        taken = completion_logprobs(entries, text_offset=self._text_offset)
        self._text_offset += sum(len(e.token) for e in entries)
        return taken

    async def pieces(self) -> AsyncIterator[str]:
        """The content's text pieces; with tools, the calls are cut out into ``tool_calls``."""
        if self.splitter is None:
            async with contextlib.aclosing(self._text()) as text:
                async for piece in text:
                    yield piece
            return
        async with contextlib.aclosing(self._text()) as text:
            async for piece in text:
                if shown := self.splitter.push(piece):
                    yield shown
        tail, self.tool_calls = self.splitter.finish()
        if tail:
            yield tail
        if self.tool_calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"

    async def _text(self) -> AsyncIterator[str]:
        tokenizer = self.handle.tokenizer
        eos = set(tokenizer.eos_token_ids)
        text = TextDeltas(tokenizer.detokenizer, stops=self.options.stop)
        self.observe.started(len(self.prompt_ids))
        tokens = self.handle.generate(self.prompt_ids, self.params, max_tokens=self.max_tokens)
        async with contextlib.aclosing(tokens):
            async for token in tokens:
                self.observe.token()
                if token in eos:
                    self.finish_reason = "stop"
                    break
                self.completion_tokens += 1
                if isinstance(token, Sampled):
                    self.logprobs.append(token_logprob(tokenizer, token))
                piece = text.push(token)
                if piece:
                    yield piece
                if text.stopped:
                    self.finish_reason, self.stop_string = "stop", True
                    return
                if self.completion_tokens >= self.max_tokens:
                    self.finish_reason = "length"
                    break
            else:
                self.finish_reason = "stop"  # the backend ended the stream: an end of sequence
        tail = text.finish()
        if tail:
            yield tail


class _Observer:
    """The metrics of one request (a no-op without a ``NodeMetrics``)."""

    def __init__(self, metrics: NodeMetrics | None, *, model: str, monotonic: Callable[[], float]) -> None:
        self.metrics, self.model, self.monotonic = metrics, model, monotonic
        self.received = monotonic()
        self.last_token: float | None = None
        self.generated = 0
        self.in_flight = False
        self.done = False

    def started(self, prompt_tokens: int) -> None:
        if self.metrics:
            self.metrics.prompt_tokens.labels(self.model).inc(prompt_tokens)
            self.metrics.inference_in_flight.labels(self.model).inc()
            self.in_flight = True

    def token(self) -> None:
        now = self.monotonic()
        if self.metrics:
            if self.last_token is None:
                self.metrics.time_to_first_token.labels(self.model).observe(now - self.received)
            else:
                self.metrics.inter_token_seconds.labels(self.model).observe(now - self.last_token)
        self.last_token = now

    def finished(self, status: int | str, *, completion_tokens: int = 0) -> None:
        if not self.metrics or self.done:
            return
        self.done = True
        self.metrics.inference_requests.labels(self.model, str(status)).inc()
        if completion_tokens:
            self.metrics.generated_tokens.labels(self.model).inc(completion_tokens)
        if self.in_flight:
            self.metrics.inference_in_flight.labels(self.model).dec()
            self.in_flight = False


# --- the API -----------------------------------------------------------------------------------

class OpenAIApi:
    def __init__(self, *, backend: InferenceBackend, metrics: NodeMetrics | None, clock: Callable[[], float],
                 monotonic: Callable[[], float], admission: RequestAdmission) -> None:
        self.backend, self.metrics, self.clock, self.monotonic = backend, metrics, clock, monotonic
        self.admission = admission

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [_model_object(card) for card in self.backend.models()]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for card in self.backend.models():
            if card.answers_to(name):
                return web.json_response(_model_object(card))
        raise _model_not_found(name)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, parse=parse_chat_request, answer=partial(self._respond, shape=CHAT))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, parse=parse_completion_request, answer=partial(self._respond, shape=TEXT))

    async def generate(self, request: web.Request, *, parse: Callable[[Any], ChatRequest | CompletionRequest],
                       answer: Answer) -> web.StreamResponse:
        """Parse the body into a chat or text request, resolve the model, tokenize and check the
        bounds (each failure counted as a finished request), wait for a slot, then ``answer``
        with the request's choices (also what the Anthropic and Ollama dialects answer through)."""
        observe = self._observer(None)
        try:
            parsed = parse(await read_json_body(request))
            observe = self._observer(parsed.options.model)
            handle = self.resolve(parsed.options.model)
            chat = isinstance(parsed, ChatRequest)
            ids = _chat_prompt_ids(handle, parsed) if chat else _completion_prompt_ids(handle, parsed)
            max_tokens = completion_budget(prompt_tokens=len(ids), options=parsed.options,
                                           context_length=handle.context_length,
                                           prompt_param="messages" if chat else "prompt")
            params = bind_sampling(parsed.options.params, prompt_ids=ids, vocab_size=len(handle.tokenizer))
            if chat and parsed.options.tools and parsed.options.tools.forced:
                if params.grammar is not None:
                    raise bad_field("tool_choice", "a required tool call cannot also have a response_format",
                                    show_value=False)
                params = params.model_copy(update={"grammar": tool_grammar(handle.tokenizer, parsed.options.tools)})
            if parsed.options.n > self.admission.max_running:
                raise bad_field("n", f"at most {self.admission.max_running} choices per request on this node",
                                parsed.options.n)
            reserved = getattr(handle, "max_requests", None)  # the stages' KV slots (cluster models)
            if reserved is not None and parsed.options.n > reserved:
                raise bad_field("n", f"at most {reserved} choices per request: the deployment's stages reserve KV "
                                     f"cache for {reserved} requests at once (spec.resources.maxConcurrentRequests)",
                                parsed.options.n)
            options = dataclasses.replace(parsed.options, params=params)
            async with self.slot(request):
                runs = [_Generation(handle=handle, prompt_ids=ids, options=options, max_tokens=max_tokens,
                                    observe=observe, index=index) for index in range(options.n)]
                status: int | str = CLIENT_GONE
                try:
                    response, status = await answer(request, runs)
                    return response
                except OpenAIError as error:
                    status = error.status
                    raise
                finally:
                    observe.finished(status, completion_tokens=sum(run.completion_tokens for run in runs))
        except OpenAIError as error:
            observe.finished(error.status)  # a no-op when the response already counted it
            raise

    @contextlib.asynccontextmanager
    async def slot(self, request: web.Request) -> AsyncIterator[None]:
        """One of the node's generation slots for this request (429 with Retry-After when none frees)."""
        try:
            async with self.admission.slot():
                yield
        except Overloaded as error:
            if self.metrics:
                self.metrics.inference_rejected.inc()
            raise OpenAIError(429, f"too many requests: {error}; retry after {RETRY_AFTER_S}s",
                              code="rate_limit_exceeded", type="requests",
                              headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def _observer(self, model: str | None) -> _Observer:
        # Label by the deployment name; requests for unknown models share "" (no label explosion).
        label = next((card.name for card in self.backend.models() if model and card.answers_to(model)), "")
        return _Observer(self.metrics, model=label, monotonic=self.monotonic)

    def resolve(self, model: str) -> ModelHandle:
        try:
            return self.backend.resolve(model)
        except KeyError:
            raise _model_not_found(model) from None
        except NotReady as error:
            raise _not_ready(error) from None

    async def _respond(self, request: web.Request, runs: list[_Generation], *,
                       shape: _Shape) -> tuple[web.StreamResponse, int | str]:
        head = {"id": shape.id_prefix + secrets.token_hex(12), "created": int(self.clock()),
                "model": runs[0].options.model}
        if runs[0].options.stream:
            return await _stream(request, runs=runs, head=head, shape=shape)
        response = await _complete(request, runs=runs, head=head, shape=shape)
        return response, response.status if not client_gone(request) else CLIENT_GONE


async def all_pieces(runs: list[_Generation]) -> AsyncIterator[tuple[_Generation, str]]:
    """Every choice's text pieces as they come: one choice is its own stream; n choices generate
    concurrently (one task each), and a failure of one ends them all."""
    if len(runs) == 1:
        async with contextlib.aclosing(runs[0].pieces()) as stream:
            async for piece in stream:
                yield runs[0], piece
        return
    queue: asyncio.Queue[tuple[_Generation, str | None | Exception]] = asyncio.Queue()

    async def pump(run: _Generation) -> None:
        try:
            async with contextlib.aclosing(run.pieces()) as stream:
                async for piece in stream:
                    queue.put_nowait((run, piece))
            queue.put_nowait((run, None))
        except (PipelineError, NotReady) as failure:
            queue.put_nowait((run, failure))

    tasks = [asyncio.create_task(pump(run), name=f"openai-choice-{run.index}") for run in runs]
    try:
        ongoing = len(runs)
        while ongoing:
            run, piece = await queue.get()
            if isinstance(piece, Exception):
                raise piece
            if piece is None:
                ongoing -= 1
            else:
                yield run, piece
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def whole_texts(runs: list[_Generation], *, request: web.Request | None = None) -> dict[int, str] | None:
    """Each choice's whole text by index (the non-streamed answers of every dialect); None when
    ``request``'s client left (generation is cancelled). A failed generation is an OpenAIError."""
    pieces: dict[int, list[str]] = {run.index: [] for run in runs}
    try:
        async with contextlib.aclosing(all_pieces(runs)) as stream:
            async for run, piece in stream:
                pieces[run.index].append(piece)
                if request is not None and client_gone(request):
                    return None
    except (PipelineError, NotReady) as failure:
        raise generation_failed(failure) from None
    return {index: "".join(parts) for index, parts in pieces.items()}


async def _complete(request: web.Request, *, runs: list[_Generation], head: dict, shape: _Shape) -> web.Response:
    texts = await whole_texts(runs, request=request)
    if texts is None:
        return web.Response(status=499)  # nobody reads it; generation is cancelled
    choices = [shape.choice(texts[run.index], run.finish_reason, index=run.index,
                            logprobs=run.take_logprobs(shape), tool_calls=run.tool_calls) for run in runs]
    body = {**head, "object": shape.object, "choices": choices,
            "usage": usage(len(runs[0].prompt_ids), sum(run.completion_tokens for run in runs))}
    return web.json_response(body, dumps=lambda data: json.dumps(data, ensure_ascii=False))


async def _stream(request: web.Request, *, runs: list[_Generation], head: dict,
                  shape: _Shape) -> tuple[web.StreamResponse, int | str]:
    response = web.StreamResponse(headers=SSE_HEADERS)
    include_usage = runs[0].options.include_usage

    def chunk(choice: dict | None) -> bytes:
        data = {**head, "object": shape.chunk_object, "choices": [choice] if choice else []}
        if include_usage:
            data["usage"] = None
        return sse(data)

    try:
        await response.prepare(request)
        if shape.chat:
            for run in runs:
                await response.write(chunk(shape.delta(None, None, first=True, index=run.index)))
        try:
            async with contextlib.aclosing(all_pieces(runs)) as stream:
                async for run, piece in stream:
                    await response.write(chunk(shape.delta(piece, None, index=run.index,
                                                           logprobs=run.take_logprobs(shape))))
        except (PipelineError, NotReady) as failure:
            error = generation_failed(failure)
            await response.write(sse(error.body()))
            await response.write_eof()
            return response, error.status
        for run in runs:
            if run.tool_calls:
                calls = [{"index": i, **call} for i, call in enumerate(run.tool_calls)]
                await response.write(chunk({"index": run.index, "delta": {"tool_calls": calls}, "logprobs": None,
                                            "finish_reason": None}))
            await response.write(chunk(shape.delta(None, run.finish_reason, index=run.index,
                                                   logprobs=run.take_logprobs(shape))))
        if include_usage:
            completion_tokens = sum(run.completion_tokens for run in runs)
            await response.write(sse({**head, "object": shape.chunk_object, "choices": [],
                                      "usage": usage(len(runs[0].prompt_ids), completion_tokens)}))
        await response.write(sse("[DONE]"))
        await response.write_eof()
    except ConnectionResetError:  # the client left: the generation was closed on the way out
        return response, CLIENT_GONE
    return response, 200


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# --- prompts -----------------------------------------------------------------------------------

def _chat_prompt_ids(handle: ModelHandle, chat: ChatRequest) -> list[int]:
    _refuse_surely_too_long(handle, chat.options, sum(len(m["content"]) for m in chat.messages), param="messages")
    tools = chat.options.tools
    if tools:
        check_tool_support(handle.tokenizer, model=chat.options.model, tools=tools)
    extra = {"tools": list(tools.tools)} if tools else {}
    try:
        ids = handle.tokenizer.apply_chat_template(template_messages(chat.messages), add_generation_prompt=True,
                                                   **extra)
    except Exception as error:  # jinja's or the tokenizer's complaint about these messages
        raise OpenAIError(400, f"messages: the model's chat template rejected them: {error}", param="messages",
                          code="invalid_value") from None
    return _checked_ids(list(ids), param="messages")


def _completion_prompt_ids(handle: ModelHandle, completion: CompletionRequest) -> list[int]:
    tokenizer = handle.tokenizer
    if isinstance(completion.prompt, tuple):
        ids = list(completion.prompt)
        vocab = len(tokenizer)
        if any(t >= vocab for t in ids):
            raise OpenAIError(400, f"prompt: token ids must be below the vocabulary size {vocab}, got "
                                   f"{max(ids)}", param="prompt", code="invalid_value")
        return _checked_ids(ids, param="prompt")
    _refuse_surely_too_long(handle, completion.options, len(completion.prompt), param="prompt")
    # Like mlx_lm: add the BOS token unless the text already starts with it.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = bos is None or not completion.prompt.startswith(bos)
    return _checked_ids(list(tokenizer.encode(completion.prompt, add_special_tokens=add_special)), param="prompt")


def _refuse_surely_too_long(handle: ModelHandle, options: GenerationOptions, chars: int, *, param: str) -> None:
    """Tokenizing a megabyte takes seconds: refuse at once a text that cannot fit."""
    refuse_surely_too_long(chars=chars, max_token_chars=_max_token_chars(handle.tokenizer), options=options,
                           context_length=handle.context_length, prompt_param=param)


_MAX_TOKEN_CHARS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _max_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry, in characters (0 when the tokenizer does not say)."""
    if tokenizer not in _MAX_TOKEN_CHARS:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        _MAX_TOKEN_CHARS[tokenizer] = max(map(len, vocab), default=0)
    return _MAX_TOKEN_CHARS[tokenizer]


def _checked_ids(ids: list[int], *, param: str) -> list[int]:
    if not ids:
        raise OpenAIError(400, f"{param}: the prompt is empty after tokenization", param=param, code="invalid_value")
    return ids


async def read_json_body(request: web.Request) -> dict[str, Any]:
    """The body as JSON, at most ``MAX_BODY_BYTES`` (413 beyond, told by Content-Length or counted)."""
    try:
        raw = await read_body(request, limit=MAX_BODY_BYTES)
    except ApiError as error:  # the resource API's Status error; /v1 answers in OpenAI's shape
        raise OpenAIError(error.code, f"the {error.message}", code="request_too_large") from None
    return parse_json_body(raw)


# --- errors and model objects ------------------------------------------------------------------

def _model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist on this cluster (see GET /v1/models)",
                       param="model", code="model_not_found")


def _not_ready(error: NotReady) -> OpenAIError:
    retry_after = max(1, math.ceil(error.retry_after))
    return OpenAIError(503, f"{error.message} (retry after {retry_after}s)", code="model_not_ready",
                       headers={"Retry-After": str(retry_after)})


def generation_failed(failure: PipelineError | NotReady) -> OpenAIError:
    if isinstance(failure, NotReady):
        return _not_ready(failure)
    return OpenAIError(502, f"generation failed: {failure.message}", code="pipeline_error")


def _model_object(card: Any) -> dict:
    return {"id": card.name, "object": "model", "created": card.created, "owned_by": "exo",
            "served_name": card.served_name, "ready": card.ready, "state": card.state, "source": card.source}
