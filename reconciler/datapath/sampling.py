"""Per-request sampling at the last stage: mlx-lm's logits processors and samplers.

The penalties (presence, frequency, repetition) look at the last ``PENALTY_WINDOW`` tokens, as
mlx-lm's processors do by default: the prompt's tail (sent in OPEN) and the tokens drawn since.
A request that asks for ``logprobs`` gets ``Sampled`` ids: the log-probabilities after the
processors, before filters and temperature (as mlx-lm's generate_step reports them).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import mlx.core as mx

from reconciler.datapath.grammar import GrammarConstraint, GrammarError, hf_tokenizer_of
from reconciler.datapath.sampled import Sampled
from reconciler.datapath.wire import PENALTY_WINDOW, SamplingParams


def make_processors(params: SamplingParams) -> list[Any]:
    """mlx-lm's logits processors for the request's bias and penalties (empty when none is set)."""
    from mlx_lm.sample_utils import make_logits_processors

    bias = {int(token): value for token, value in params.logit_bias.items()}
    return make_logits_processors(
        logit_bias=bias or None, repetition_penalty=params.repetition_penalty,
        repetition_context_size=PENALTY_WINDOW, presence_penalty=params.presence_penalty,
        presence_context_size=PENALTY_WINDOW, frequency_penalty=params.frequency_penalty,
        frequency_context_size=PENALTY_WINDOW,
    )  # fmt: skip


def make_filters(params: SamplingParams, vocab_size: int) -> list[Any]:
    """mlx-lm's filters over log-probabilities, chained in make_sampler's order."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    filters: list[Any] = []
    if 0 < params.top_p < 1.0:
        filters.append(lambda logprobs: apply_top_p(logprobs, params.top_p))
    if params.min_p > 0.0:
        filters.append(lambda logprobs: apply_min_p(logprobs, params.min_p))
    if 0 < params.top_k < vocab_size:  # k >= vocabulary keeps every token
        filters.append(lambda logprobs: apply_top_k(logprobs, params.top_k))
    return filters


def with_logprobs(token: int, logprobs: mx.array, count: int) -> Sampled:
    """``token`` with its log-probability under ``logprobs`` (1, vocabulary) and the top ``count``."""
    row = logprobs[0]
    top: tuple[tuple[int, float], ...] = ()
    if count > 0:
        count = min(count, row.shape[-1])
        ids = mx.argpartition(-row, kth=count - 1)[:count]
        pairs = zip(ids.tolist(), row[ids].astype(mx.float32).tolist())
        top = tuple(sorted(pairs, key=lambda pair: -pair[1]))
    return Sampled(token, logprob=float(row[token].astype(mx.float32).item()), top=top)


class RequestSampler:
    """mlx-lm's sampling for one request, with the request's own random key.

    mlx_lm.sample_utils.make_sampler draws from mlx's global random state (its
    ``categorical_sampling`` is compiled over ``mx.random.state``, which mlx lets one reseed with an
    int but never set to a key), so requests sharing a process would share one stream and a seeded
    request would depend on the others. So this runs mlx-lm's logits processors, chains its filters
    as make_sampler does (``apply_top_p``, ``apply_min_p``, ``apply_top_k``) and draws
    ``categorical(logprobs / temp)`` with a key split off the request's: the same tokens as
    mlx-lm's generate_step after ``mx.random.seed(seed)``."""

    def __init__(self, params: SamplingParams, *, model_dir: Path | None = None) -> None:
        self.params = params
        self._model_dir = model_dir  # its tokenizer, for a grammar
        self._constraint: GrammarConstraint | None = None
        self.temperature = params.temperature
        # An OPEN without a seed (the pipeline client always sends one) draws its own.
        self._seed = secrets.randbits(62) if params.seed is None else params.seed
        self._key: Any = None  # made on the compute thread, at the first draw (MLX streams are per thread)
        self._processors: list[Any] | None = None  # likewise built at the first draw
        self._filters: list[Any] = []
        self._history = list(params.prompt_tail)  # what the penalties look at

    def __call__(self, logits: mx.array) -> int:
        """The next token from the last position's logits, shape (1, vocabulary)."""
        if self._processors is None:
            self._processors = make_processors(self.params)
            if self.temperature != 0:
                self._filters = make_filters(self.params, logits.shape[-1])
            if self.params.grammar is not None:
                if self._model_dir is None:
                    raise GrammarError("this stage does not know its model's tokenizer, needed for a grammar")
                self._constraint = GrammarConstraint(self.params.grammar, hf_tokenizer_of(self._model_dir))
        if self._processors:
            tokens = mx.array(self._history, dtype=mx.int32)
            for process in self._processors:
                logits = process(tokens, logits)
        if self._constraint is not None:
            logits = self._constraint.mask(logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = self._draw(logprobs)
        if self._constraint is not None:
            self._constraint.accept(token)
        if self._processors:
            self._history = (self._history + [token])[-PENALTY_WINDOW:]
        if self.params.logprobs is not None:
            return with_logprobs(token, logprobs, self.params.logprobs)
        return token

    def _draw(self, logprobs: mx.array) -> int:
        if self.temperature == 0:
            return int(mx.argmax(logprobs, axis=-1).item())
        for apply in self._filters:
            logprobs = apply(logprobs)
        self._key, draw = mx.random.split(self._key if self._key is not None else mx.random.key(self._seed))
        return int(mx.random.categorical(logprobs * (1.0 / self.temperature), key=draw).item())
