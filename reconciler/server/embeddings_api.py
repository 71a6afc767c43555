"""``POST /v1/embeddings`` (OpenAI's shape) for deployments with ``spec.serving.embeddings: true``.

Each input's vector is the mean of its last hidden states after the model's final norm, pooled
by the pipeline's last stage (datapath/stage.py). Several inputs run as concurrent requests, so
the stages batch them. Auth: role ``inference``, like the rest of /v1.
"""
from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

from aiohttp import web

from reconciler.inference.backend import NotReady, PipelineError
from reconciler.server.openai_errors import OpenAIError
from reconciler.server.openai_requests import bad_field

MAX_INPUTS = 256  # inputs per request
CONCURRENT_INPUTS = 4  # pipeline requests at once per call (a deployment's default maxConcurrentRequests)
ENCODINGS = ("float", "base64")


def add_embeddings_routes(app: web.Application, api: Any) -> None:
    """``api``: the node's ``OpenAIApi`` (its model resolution, body reading and admission)."""
    embeddings = EmbeddingsApi(api)

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await embeddings.create(request)
        except OpenAIError as error:
            return error.response()

    app.router.add_post("/v1/embeddings", handle)


def parse_inputs(value: Any) -> list[str | list[int]]:
    """``input`` as a list of texts or token-id lists (pure)."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_id(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_field("input", "must be a string, a list of strings or a list of token-id lists", value)
    if len(value) > MAX_INPUTS:
        raise bad_field("input", f"at most {MAX_INPUTS} inputs per request, got {len(value)}", show_value=False)
    for index, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise bad_field(f"input[{index}]", "must not be empty", item)
        elif not (isinstance(item, list) and item and all(_is_id(t) for t in item)):
            raise bad_field(f"input[{index}]", "must be a non-empty string or list of token ids", item)
    return value


def _is_id(token: Any) -> bool:
    return isinstance(token, int) and not isinstance(token, bool) and 0 <= token < 1 << 31


class EmbeddingsApi:
    def __init__(self, api: Any) -> None:
        self.api = api

    async def create(self, request: web.Request) -> web.Response:
        from reconciler.server.openai_api import generation_failed, read_json_body

        body = await read_json_body(request)
        for name in body:
            if name not in ("input", "model", "encoding_format", "dimensions", "user"):
                raise bad_field(name, "is not supported by this server", body[name])
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_field("model", "required (a string)", model)
        inputs = parse_inputs(body.get("input"))
        encoding = body.get("encoding_format", "float")
        if encoding not in ENCODINGS:
            raise bad_field("encoding_format", "must be float or base64", encoding)
        dimensions = body.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
            raise bad_field("dimensions", "must be an integer", dimensions)
        handle = self.api.resolve(model)
        if not getattr(handle, "embeddings", False):
            raise OpenAIError(400, f"model: `{model}` does not serve embeddings (set spec.serving.embeddings: true "
                                   f"on its ModelDeployment)", param="model", code="invalid_value")
        ids = [self._ids(handle, item, index) for index, item in enumerate(inputs)]
        gate = asyncio.Semaphore(CONCURRENT_INPUTS)

        async def one(prompt: list[int]) -> list[float]:
            async with gate:
                return await handle.embed(prompt)

        async with self.api.slot(request):
            try:
                vectors = await asyncio.gather(*(one(prompt) for prompt in ids))
            except (PipelineError, NotReady) as failure:
                raise generation_failed(failure) from None
        if dimensions is not None and dimensions != len(vectors[0]):
            raise bad_field("dimensions", f"must be the model's hidden size, {len(vectors[0])} (vectors are not "
                                          f"truncated here)", dimensions)
        data = [{"object": "embedding", "index": index, "embedding": _encoded(vector, encoding)}
                for index, vector in enumerate(vectors)]
        tokens = sum(map(len, ids))
        return web.json_response({"object": "list", "data": data, "model": model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @staticmethod
    def _ids(handle: Any, item: str | list[int], index: int) -> list[int]:
        ids = handle.tokenizer.encode(item) if isinstance(item, str) else list(item)
        vocab = len(handle.tokenizer)
        if any(t >= vocab for t in ids):
            raise bad_field(f"input[{index}]", f"token ids must be below the vocabulary size {vocab}", show_value=False)
        limit = handle.context_length
        if limit and len(ids) > limit:
            raise bad_field(f"input[{index}]", f"is {len(ids)} tokens, more than the context length {limit}",
                            show_value=False)
        return ids


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
