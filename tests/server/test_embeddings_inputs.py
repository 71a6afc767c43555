"""``input`` of /v1/embeddings: every OpenAI form becomes a list of texts or token-id lists, and
anything else is a 400 naming the field."""
from __future__ import annotations

import pytest

from reconciler.server.embeddings_api import MAX_INPUTS, parse_inputs
from reconciler.server.openai_errors import OpenAIError


@pytest.mark.parametrize(("value", "inputs"), [
    ("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]])])
def test_each_openai_input_form_becomes_a_list_of_inputs(value, inputs):
    assert parse_inputs(value) == inputs


@pytest.mark.parametrize(("value", "param"), [
    ("", "input[0]"), ([], "input"), (None, "input"), ([[1], []], "input[1]"), (["a", 3], "input[1]"),
    ([[1, -1]], "input[0]"), ([True], "input[0]"), (["x"] * (MAX_INPUTS + 1), "input")])
def test_bad_inputs_are_refused_naming_the_field(value, param):
    with pytest.raises(OpenAIError) as refused:
        parse_inputs(value)
    assert refused.value.status == 400 and refused.value.message.startswith(param + ":")
