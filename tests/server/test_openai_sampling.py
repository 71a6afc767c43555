"""The sampling fields of the OpenAI API reach the model, or are refused naming the field."""
from __future__ import annotations

import pytest

from reconciler.datapath.wire import PENALTY_WINDOW
from tests.inference.conftest import backend, client, metrics, tiny_model_dir, tokenizer, twin  # noqa: F401
from tests.inference.inference_helpers import AUTH, serve

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Name a few rivers of Europe, please, one per line."}]


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": MESSAGES, **fields}


async def test_every_sampling_field_reaches_the_backend_with_the_prompts_tail(client, twin):
    fields = {"temperature": 0.7, "top_p": 0.9, "seed": 3, "top_k": 40, "min_p": 0.05, "presence_penalty": 0.5,
              "frequency_penalty": -0.25, "repetition_penalty": 1.1, "logit_bias": {"17": -100, "5": 2.5}}
    response = await client.post(CHAT, headers=AUTH, json=chat(**fields))
    assert response.status == 200, await response.text()
    prompt_ids, params, _ = twin.handles["tiny"].requests[-1]
    for field, value in fields.items():
        assert getattr(params, field) == value
    assert params.prompt_tail == prompt_ids[-PENALTY_WINDOW:]


async def test_without_penalties_no_prompt_travels_and_a_huge_top_k_means_off(client, twin):
    response = await client.post(CHAT, headers=AUTH, json=chat(top_k=10**6))
    assert response.status == 200, await response.text()
    _, params, _ = twin.handles["tiny"].requests[-1]
    assert params.prompt_tail == [] and params.top_k == 0


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"presence_penalty": 2.5}, "presence_penalty", "from -2 to 2"),
    ({"frequency_penalty": "high"}, "frequency_penalty", "number"),
    ({"repetition_penalty": 0}, "repetition_penalty", "above 0"),
    ({"top_k": -3}, "top_k", "integer from 0"),
    ({"min_p": 2}, "min_p", "from 0 to 1"),
    ({"logit_bias": {"seven": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"3": 150}}, "logit_bias", "-100 to 100"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "vocabulary size"),
    ({"logit_bias": [1, 2]}, "logit_bias", "dictionary"),
])
async def test_a_bad_sampling_field_is_a_400_naming_it(client, fields, param, words):
    response = await client.post(CHAT, headers=AUTH, json=chat(**fields))
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["param"] == param and words in error["message"], error


async def _greedy_text(api, **fields) -> str:
    response = await api.post(CHAT, headers=AUTH, json=chat(temperature=0, max_tokens=24, **fields))
    assert response.status == 200, await response.text()
    return (await response.json())["choices"][0]["message"]["content"]


async def test_penalties_and_bias_change_what_the_real_model_writes(backend, tokenizer):  # noqa: F811
    async with await serve(backend) as api:
        plain = await _greedy_text(api, model="exo/tiny")
        assert plain == await _greedy_text(api, model="exo/tiny")  # greedy is repeatable
        for fields in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 3.0},
                       {"logit_bias": {str(tokenizer.encode(plain, add_special_tokens=False)[0]): -100}}):
            assert await _greedy_text(api, model="exo/tiny", **fields) != plain, fields
