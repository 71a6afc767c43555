"""A sampled token id with its log-probabilities, as TOKEN frames carry it (no MLX here)."""

from __future__ import annotations

from typing import Any

from reconciler.datapath.wire import WireError


class Sampled(int):
    """A sampled token id that also carries its log-probability and the ``top`` most likely
    (token id, log-probability) pairs, most likely first: what ``logprobs`` asks for."""

    logprob: float
    top: tuple[tuple[int, float], ...]

    def __new__(cls, token: int, *, logprob: float, top: tuple[tuple[int, float], ...] = ()) -> Sampled:
        sampled = super().__new__(cls, token)
        sampled.logprob, sampled.top = logprob, top
        return sampled

    def meta(self) -> dict[str, Any]:
        """As a TOKEN frame's metadata."""
        return {"logprob": self.logprob, "top": [list(pair) for pair in self.top]}

    @classmethod
    def from_meta(cls, token: int, meta: dict[str, Any]) -> Sampled:
        try:
            top = tuple((int(t), float(lp)) for t, lp in meta.get("top", ()))
            return cls(token, logprob=float(meta["logprob"]), top=top)
        except (KeyError, TypeError, ValueError):
            raise WireError(f"TOKEN metadata is not a token's log-probabilities: {str(meta)[:120]}") from None


def token_meta(token: int) -> dict[str, Any] | None:
    """A TOKEN frame's metadata: the log-probabilities when the request asked for them."""
    return token.meta() if isinstance(token, Sampled) else None
