"""A twin of the inference backend: real tokenizer, scripted token ids, scripted failures."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from reconciler.inference.backend import ModelCard, NotReady, PipelineError, SamplingParams


class ScriptedModel:
    """A ``ModelHandle`` whose "generation" is ``script``, cut at ``max_tokens``; it can fail after
    ``fail_after`` tokens and wait ``pause_s`` before each token. It records every request."""

    def __init__(self, tokenizer: Any, script: list[int], *, fail_after: int | None = None,
                 pause_s: float = 0.0, context_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.script = list(script)
        self.fail_after = fail_after
        self.pause_s = pause_s
        self.requests: list[tuple[list[int], SamplingParams, int]] = []
        self.produced = 0
        self.cancelled = asyncio.Event()  # set when a consumer closed the stream before its end

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int) -> AsyncIterator[int]:
        self.requests.append((list(prompt_ids), params, max_tokens))
        try:
            for index, token in enumerate(self.script[:max_tokens]):
                if index == self.fail_after:
                    raise PipelineError("stage 1 on node-b stopped answering")
                if self.pause_s:
                    await asyncio.sleep(self.pause_s)
                self.produced += 1
                yield token
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled.set()
            raise


class TwinBackend:
    def __init__(self, *, cards: list[ModelCard], handles: dict[str, ScriptedModel], retry_after: float = 2.5) -> None:
        self.cards, self.handles, self.retry_after = cards, handles, retry_after

    def models(self) -> list[ModelCard]:
        return list(self.cards)

    def resolve(self, model: str) -> ScriptedModel:
        for card in self.cards:
            if card.answers_to(model):
                if not card.ready:
                    raise NotReady(f"model {card.name} is not ready: {card.state}", retry_after=self.retry_after)
                return self.handles[card.name]
        raise KeyError(model)
