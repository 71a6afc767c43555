"""``logprobs`` in OpenAI's two shapes: chat's list of token entries, and the completions API's
parallel lists (tokens, token_logprobs, top_logprobs, text_offset). Pure functions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.datapath.sampled import Sampled


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


def token_logprob(tokenizer: Any, sampled: Sampled) -> TokenLogprob:
    return TokenLogprob(token=_text(tokenizer, int(sampled)), logprob=sampled.logprob,
                        top=tuple((_text(tokenizer, token), logprob) for token, logprob in sampled.top))


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], *, text_offset: int) -> dict[str, Any]:
    """``text_offset``: where the first entry's token starts in the completion's text."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def _text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])
