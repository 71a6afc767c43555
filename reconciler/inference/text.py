"""Generated token ids → text pieces that are safe to send: whole characters, stop strings cut.

The detokenizer (mlx_lm's streaming detokenizer) releases text only once its bytes form whole
characters. On top of it, any tail that could still grow into a stop string is held back until
it either becomes one (generation stops, the stop text is dropped) or cannot.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found, default=-1)


class TextDeltas:
    """Feed token ids with ``push``; each call returns the text now safe to send (maybe "")."""

    def __init__(self, detokenizer: Any, *, stops: Sequence[str] = ()) -> None:
        self._detokenizer = detokenizer
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False  # a stop string was found: generation should end

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self._detokenizer.add_token(token)
        return self._release(self._detokenizer.last_segment, final=False)

    def finish(self) -> str:
        """Generation ended: flush what the detokenizer and the stop check still hold."""
        if self.stopped:
            return ""
        self._detokenizer.finalize()
        return self._release(self._detokenizer.last_segment, final=True)

    def _release(self, segment: str, *, final: bool) -> str:
        text = self._held + segment
        at = find_stop(text, self._stops)
        if at >= 0:
            self.stopped, self._held = True, ""
            return text[:at]
        keep = 0 if final else stop_prefix_length(text, self._stops)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]
