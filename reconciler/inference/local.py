"""A single-process backend: whole models loaded with mlx_lm, generated with mlx_lm.

Every MLX call (loading, prefill, each decode step) runs on one compute thread, never on the
event loop. Requests are served one at a time, so a request with a ``seed`` draws exactly what
``mx.random.seed(seed)`` followed by mlx_lm's own generation would; the distributed pipeline
backend implements the same interface for models split across nodes.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.inference.backend import ModelCard, NotReady, SamplingParams
from reconciler.inference.context import read_context_length
from reconciler.runtime.shard_model import ComputeThread

log = logging.getLogger(__name__)


class LocalModel:
    """A loaded model; implements ``ModelHandle``."""

    def __init__(self, *, model: Any, tokenizer: Any, compute: ComputeThread, turn: asyncio.Lock,
                 context_length: int | None = None) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._context_length = context_length
        self._compute = compute
        self._turn = turn

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def context_length(self) -> int | None:
        return self._context_length

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int) -> AsyncIterator[int]:
        if not prompt_ids:
            raise ValueError("prompt_ids: must hold at least one token")
        eos = set(self._tokenizer.eos_token_ids)
        async with self._turn:
            steps = await self._compute.run(_start_generation, self._model, list(prompt_ids), params,
                                            max_tokens, self._tokenizer._tokenizer)
            try:
                for _ in range(max_tokens):
                    token = await self._compute.run(next, steps, None)
                    if token is None:
                        return
                    yield token
                    if token in eos:
                        return
            finally:
                await self._compute.run(steps.close)


def _start_generation(model: Any, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                      hf_tokenizer: Any) -> Iterator[int]:
    """On the compute thread: seed (when asked) and set up mlx_lm's generator of token ids."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    from reconciler.datapath.grammar import GrammarConstraint
    from reconciler.datapath.sampling import make_processors, with_logprobs

    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler = make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k)
    processors = make_processors(params)
    if params.grammar is not None:
        processors.append(GrammarConstraint(params.grammar, hf_tokenizer).processor())
    steps = generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens, sampler=sampler,
                          logits_processors=processors)
    if params.logprobs is None:
        return (int(token) for token, _logprobs in steps)
    return (with_logprobs(int(token), logprobs[None], params.logprobs) for token, logprobs in steps)


@dataclass
class _Entry:
    path: Path
    served_name: str | None
    created: int
    state: str = "Pending"
    handle: LocalModel | None = None


class LocalBackend:
    """Serves whole models from local directories; implements ``InferenceBackend``.

    Models are ``Pending`` until ``await load()``, which loads them one by one (``Loading``,
    then ``Ready`` or ``Failed: <reason>``); call ``close()`` to stop the compute thread."""

    def __init__(self, models: Mapping[str, Path], *, served_names: Mapping[str, str] | None = None,
                 retry_after_s: float = 2.0) -> None:
        served = dict(served_names or {})
        unknown = sorted(set(served) - set(models))
        if unknown:
            raise ValueError(f"served_names: no model named {', '.join(unknown)}")
        self._entries = {name: _Entry(path=Path(path), served_name=served.get(name), created=_created(Path(path)))
                         for name, path in models.items()}
        self._retry_after_s = retry_after_s
        self._compute = ComputeThread("local-backend")
        self._turn = asyncio.Lock()

    async def load(self) -> None:
        for name, entry in self._entries.items():
            if entry.handle is not None:
                continue
            entry.state = "Loading"
            problem = _model_dir_problem(entry.path)
            if problem:
                entry.state = f"Failed: {problem}"
                continue
            try:
                model, tokenizer = await self._compute.run(_load_on_compute_thread, entry.path)
            except Exception as error:  # a broken model directory: reported in its state
                log.warning("cannot load model %s from %s: %s", name, entry.path, error)
                entry.state = f"Failed: {type(error).__name__}: {error}"
                continue
            entry.handle = LocalModel(model=model, tokenizer=tokenizer, compute=self._compute, turn=self._turn,
                                      context_length=read_context_length(entry.path))
            entry.state = "Ready"

    def models(self) -> list[ModelCard]:
        return [ModelCard(name=name, ready=entry.handle is not None, state=entry.state, created=entry.created,
                          source=str(entry.path), served_name=entry.served_name)
                for name, entry in self._entries.items()]

    def resolve(self, model: str) -> LocalModel:
        for card in self.models():
            if card.answers_to(model):
                entry = self._entries[card.name]
                if entry.handle is None:
                    raise NotReady(f"model {card.name} is not ready: {entry.state}", retry_after=self._retry_after_s)
                return entry.handle
        raise KeyError(model)

    def close(self) -> None:
        for entry in self._entries.values():
            entry.handle = None
        self._compute.close()


def _load_on_compute_thread(path: Path) -> tuple[Any, Any]:
    import mlx_lm

    return mlx_lm.load(str(path))


def _model_dir_problem(path: Path) -> str | None:
    """Why ``path`` is not a model directory, or None. (mlx_lm.load would treat a missing path
    as a hub repository name and try to download it.)"""
    if not path.is_dir():
        return f"{path}: no such directory"
    if not (path / "config.json").is_file():
        return f"{path}: no config.json"
    return None


def _created(path: Path) -> int:
    try:
        return int((path / "config.json").stat().st_mtime)
    except OSError:
        return 0
