"""Constrained decoding with llguidance: a grammar (from a JSON schema) masks the logits before
each draw, so whatever the model, the text parses. Runs where sampling runs (the last stage, or
the local backend), on the compute thread."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

_lock = threading.Lock()
_tokenizers: dict[tuple[int, int], Any] = {}  # (id of the HF tokenizer, vocabulary) -> LLTokenizer
_hf_tokenizers: dict[str, Any] = {}  # model directory -> its HF tokenizer (kept, so ids stay unique)


class GrammarError(ValueError):
    """A grammar llguidance cannot compile, or a token it did not allow."""


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The llguidance grammar for JSON matching ``schema`` (None: any JSON object). Raises
    GrammarError naming the problem when llguidance cannot compile it."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                     defaults={"whitespace_flexible": False})
    except ValueError as error:
        raise GrammarError(str(error)) from None
    problem = LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise GrammarError(problem)
    return grammar


def hf_tokenizer_of(model_dir: Path) -> Any:
    """The Hugging Face tokenizer of a model directory, loaded once per process."""
    with _lock:
        if str(model_dir) not in _hf_tokenizers:
            from mlx_lm.utils import load_tokenizer

            _hf_tokenizers[str(model_dir)] = load_tokenizer(model_dir)._tokenizer
        return _hf_tokenizers[str(model_dir)]


def _ll_tokenizer(hf_tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of the tokenizer, built once (about a second for a large vocabulary)."""
    key = (id(hf_tokenizer), vocab_size)
    with _lock:
        if key not in _tokenizers:
            import llguidance.hf

            _tokenizers[key] = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
        return _tokenizers[key]


class GrammarConstraint:
    """One request's matcher: ``mask(logits)`` before a draw, ``accept(token)`` after it."""

    def __init__(self, grammar: str, hf_tokenizer: Any) -> None:
        self._grammar, self._hf = grammar, hf_tokenizer
        self._matcher: Any = None  # built at the first mask, when the vocabulary size is known
        self._bits: np.ndarray | None = None

    def mask(self, logits: mx.array) -> mx.array:
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        vocab = logits.shape[-1]
        if self._matcher is None:
            self._matcher = LLMatcher(_ll_tokenizer(self._hf, vocab), self._grammar, log_level=0)
            self._bits = allocate_token_bitmask(1, vocab)
            self._check()
        fill_next_token_bitmask(self._matcher, self._bits)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:vocab].astype(bool)
        return mx.where(mx.array(allowed)[None], logits, mx.array(-float("inf"), dtype=logits.dtype))

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)
        self._check()

    def processor(self) -> Any:
        """As an mlx-lm logits processor (``generate_step``): accepts the last token, then masks."""
        calls = 0

        def process(tokens: mx.array, logits: mx.array) -> mx.array:
            nonlocal calls
            if calls:
                self.accept(int(tokens[-1].item()))
            calls += 1
            return self.mask(logits)

        return process

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"constrained decoding failed: {self._matcher.get_error()}")
