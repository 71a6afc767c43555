"""The interface between the OpenAI-compatible API and whatever runs the model.

The API asks a backend for its models and resolves a request's ``model`` to a handle; a handle
has the model's tokenizer and generates token ids for a prompt. The single-process backend
(``reconciler.inference.local``) and the distributed pipeline implement the same two protocols.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from reconciler.datapath.wire import SamplingParams

__all__ = ["InferenceBackend", "ModelCard", "ModelHandle", "NotReady", "PipelineError", "SamplingParams"]


@dataclass(frozen=True)
class ModelCard:
    """One servable model as ``GET /v1/models`` lists it."""

    name: str                 # the deployment name; requests may use it or ``served_name``
    ready: bool
    state: str                # "Ready", "Loading 2/3 shards", "Unschedulable: ...", ...
    created: int              # unix seconds
    source: str               # where the weights come from (hf://org/name or a path)
    served_name: str | None = None

    def answers_to(self, model: str) -> bool:
        return model == self.name or (self.served_name is not None and model == self.served_name)


class NotReady(Exception):
    """The model exists but cannot serve now; the client may retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class PipelineError(Exception):
    """Generation failed part-way (a stage died or refused); ``message`` is fit for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelHandle(Protocol):
    """A resolved, ready model."""

    @property
    def tokenizer(self) -> Any:
        """An mlx_lm ``TokenizerWrapper``: apply_chat_template, encode, eos_token_ids, detokenizer."""
        ...

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt + completion) the model takes, from its config; None if unknown."""
        ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int) -> AsyncIterator[int]:
        """Sampled token ids, at most ``max_tokens``. The stream may include an
        end-of-sequence id (the caller stops there) or simply end early (also a stop). Closing the
        iterator (``aclose()``) cancels the request; a failure raises ``PipelineError``."""
        ...


class InferenceBackend(Protocol):
    def models(self) -> list[ModelCard]:
        ...

    def resolve(self, model: str) -> ModelHandle:
        """The handle of the model named ``model`` (deployment or served name). Raises
        ``KeyError`` for an unknown model and ``NotReady`` for one that cannot serve yet."""
        ...
