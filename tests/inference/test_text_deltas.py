"""Text pieces from token ids: stop strings held back, found across tokens, and cut."""
from __future__ import annotations

import pytest

from reconciler.inference.text import TextDeltas, find_stop, stop_prefix_length


class CharDetokenizer:
    """Each token id is one character's code point; text is released at once."""

    def __init__(self) -> None:
        self.text, self.offset, self.finalized = "", 0, False

    def add_token(self, token: int) -> None:
        self.text += chr(token)

    def finalize(self) -> None:
        self.finalized = True

    @property
    def last_segment(self) -> str:
        segment, self.offset = self.text[self.offset:], len(self.text)
        return segment


def run(text: str, stops: list[str]) -> tuple[list[str], bool]:
    deltas = TextDeltas(CharDetokenizer(), stops=stops)
    pieces = []
    for char in text:
        pieces.append(deltas.push(ord(char)))
        if deltas.stopped:
            break
    pieces.append(deltas.finish())
    return pieces, deltas.stopped


@pytest.mark.parametrize(("text", "stops", "prefix"), [
    ("hell", ["llo"], 2), ("hello", ["lo!"], 2), ("hello", ["x"], 0), ("hello", ["hello"], 0),
    ("abab", ["abc", "bab!"], 3),
])
def test_the_held_tail_is_the_longest_that_could_still_become_a_stop(text, stops, prefix):
    assert stop_prefix_length(text, stops) == prefix


def test_the_earliest_stop_string_wins():
    assert find_stop("one two three", ["three", "two"]) == 4
    assert find_stop("one", ["two"]) == -1


def test_a_stop_string_split_over_tokens_is_found_and_nothing_of_it_is_sent():
    pieces, stopped = run("say END now", ["END"])
    assert stopped and "".join(pieces) == "say "
    assert pieces[:5] == ["s", "a", "y", " ", ""]


def test_a_false_start_of_a_stop_string_is_released_when_it_breaks_off():
    pieces, stopped = run("EN and more", ["END"])
    assert not stopped and "".join(pieces) == "EN and more"
    assert pieces[:3] == ["", "", "EN "]


def test_text_held_at_the_end_is_flushed_by_finish():
    pieces, stopped = run("the E", ["END"])
    assert not stopped and pieces[-1] == "E" and "".join(pieces) == "the E"


def test_without_stop_strings_text_flows_unchanged():
    pieces, _ = run("héllo 🎉", [])
    assert pieces[:-1] == list("héllo 🎉") and pieces[-1] == ""
