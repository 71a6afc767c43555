"""Bounds at the door of the OpenAI API: the context length, the body size, the sampling rules of
the data path, and the node's generation slots (429 with Retry-After beyond its queue)."""
from __future__ import annotations

import asyncio

import pytest

from reconciler.datapath.wire import OpenRequest, SamplingParams
from reconciler.server.openai_api import MAX_BODY_BYTES
from reconciler.server.openai_errors import OpenAIError
from reconciler.server.openai_requests import (DEFAULT_MAX_TOKENS, GenerationOptions, completion_budget,
                                               refuse_surely_too_long, sampling_params)
from tests.inference.inference_helpers import AUTH, serve
from tests.inference.test_openai_errors import CHAT, chat, openai_error


def options(max_tokens: int | None) -> GenerationOptions:
    return GenerationOptions(model="tiny", params=SamplingParams(), max_tokens=max_tokens,
                             max_tokens_field="max_tokens",
                             stop=(), stream=False, include_usage=False)


@pytest.mark.parametrize(("prompt_tokens", "max_tokens", "context", "budget"), [
    (10, None, 2048, DEFAULT_MAX_TOKENS),
    (2000, None, 2048, 48),              # the default is cut to what fits after the prompt
    (2047, None, 2048, 1),
    (10, 2038, 2048, 2038),
    (10, 10**12, None, 10**12),          # no known context: only the parser's ceiling applies
])
def test_the_completion_budget_is_max_tokens_or_the_default_cut_to_the_context(prompt_tokens, max_tokens, context,
                                                                               budget):
    assert completion_budget(prompt_tokens=prompt_tokens, options=options(max_tokens), context_length=context,
                             prompt_param="prompt") == budget


@pytest.mark.parametrize(("prompt_tokens", "max_tokens", "param", "words"), [
    (2102, 512, "prompt",
     "prompt has 2102 tokens and max_tokens is 512: 2614 exceed the model's context length of 2048"),
    (10, 10**12, "max_tokens", f"{10**12 + 10} exceed the model's context length of 2048"),
    (2048, None, "prompt", "prompt has 2048 tokens: the model's context length is 2048, which leaves no room"),
])
def test_what_exceeds_the_context_is_a_400_naming_the_numbers(prompt_tokens, max_tokens, param, words):
    with pytest.raises(OpenAIError) as raised:
        completion_budget(prompt_tokens=prompt_tokens, options=options(max_tokens), context_length=2048,
                          prompt_param="prompt")
    assert raised.value.status == 400 and raised.value.param == param and raised.value.code == "context_length_exceeded"
    assert words in raised.value.message


@pytest.mark.parametrize(("chars", "max_tokens", "refused"), [
    (2 * 10 * 2048, None, True), (2 * 10 * 2047, None, False), (2 * 10 * 2000, 48, False), (2 * 10 * 2000, 49, True)])
def test_a_text_too_long_to_fit_whatever_its_tokens_is_refused_before_tokenizing(chars, max_tokens, refused):
    check = dict(chars=chars, max_token_chars=10, options=options(max_tokens), context_length=2048,
                 prompt_param="messages")
    if not refused:
        refuse_surely_too_long(**check)
        return
    with pytest.raises(OpenAIError, match="prompt has at least .* tokens .*context length of 2048") as raised:
        refuse_surely_too_long(**check)
    assert raised.value.param == ("messages" if max_tokens is None else "max_tokens") and raised.value.status == 400


@pytest.mark.parametrize(("body", "param"), [
    (chat(top_p=-0.1), "top_p"), (chat(top_p=1.01), "top_p"), (chat(temperature=-1), "temperature"),
    (chat(temperature=True), "temperature"), (chat(seed=2**64), "seed"), (chat(seed=-(2**63) - 1), "seed"),
    (chat(seed=1.5), "seed"), (chat(max_tokens=2**31), "max_tokens"), (chat(max_tokens=1e400), "max_tokens"),
])
async def test_every_value_the_data_path_refuses_is_a_400_at_the_api(client, twin, body, param):
    error = await openai_error(await client.post(CHAT, headers=AUTH, json=body), 400)
    assert error["param"] == param and error["message"].startswith(param + ":")
    assert twin.handles["tiny"].requests == []


@pytest.mark.parametrize("fields", [{"top_p": 0}, {"seed": -1}, {"seed": 2**64 - 1}, {"seed": -(2**63)},
                                    {"temperature": 2, "top_p": 0.5, "seed": 7}])
def test_what_the_api_accepts_the_wire_carries_to_a_stage_unchanged(fields):
    params = sampling_params(fields)
    spec = OpenRequest(shard="tiny-r0-s0", sampling=params)
    assert OpenRequest.model_validate_json(spec.model_dump_json()).sampling == params


def test_top_p_zero_means_greedy_and_any_64_bit_seed_maps_into_the_wire_range():
    assert sampling_params({"top_p": 0, "temperature": 0.8}) == SamplingParams(temperature=0.0, top_p=1.0)
    assert sampling_params({"seed": -1}).seed == 2**63 - 1
    assert sampling_params({"seed": 5}).seed == 5
    assert sampling_params({}).temperature == 1.0   # OpenAI's default


async def test_a_prompt_beyond_the_context_is_refused_before_generation(client, twin):
    twin.handles["tiny"].context_length = 16
    response = await client.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": list(range(1, 21)),
                                                                        "max_tokens": 4})
    error = await openai_error(response, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "prompt has 20 tokens and max_tokens is 4: 24 exceed the model's context length of 16" in error["message"]
    assert twin.handles["tiny"].requests == []


async def test_without_max_tokens_the_default_is_cut_to_fit_the_context(client, twin):
    twin.handles["tiny"].context_length = 16
    response = await client.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": list(range(1, 11))})
    assert response.status == 200
    assert twin.handles["tiny"].requests[0][2] == 6


@pytest.mark.parametrize("declared", [True, False])
async def test_a_body_over_the_limit_is_a_413_in_openai_shape(client, twin, declared):
    body = b'{"model": "tiny", "prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    data = body if declared else _chunks(body)  # without Content-Length, the server counts
    response = await client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"}, data=data)
    error = await openai_error(response, 413)
    assert error["code"] == "request_too_large" and str(MAX_BODY_BYTES) in error["message"]
    assert twin.handles["tiny"].requests == []


async def _chunks(body: bytes):
    for start in range(0, len(body), 64 * 1024):
        yield body[start:start + 64 * 1024]


async def test_beyond_the_slots_and_the_queue_a_request_is_a_429_with_retry_after(twin, metrics):
    twin.handles["tiny"].pause_s = 0.05
    async with await serve(twin, metrics=metrics, max_concurrent=1, max_queued=1) as client:
        long = {"model": "tiny", "prompt": "Hi", "max_tokens": 100, "stream": True}
        first = await client.post("/v1/completions", headers=AUTH, json=long)
        await first.content.readline()               # generating: the one slot is taken
        queued = asyncio.create_task(client.post("/v1/completions", headers=AUTH, json=long))
        while _sample(metrics, "exo_inference_queued") < 1:
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/completions", headers=AUTH, json=long)
        error = await openai_error(refused, 429)
        assert refused.headers["Retry-After"] == "1" and error["code"] == "rate_limit_exceeded"
        assert _sample(metrics, "exo_inference_rejected_total") == 1
        first.close()                                 # its client leaves: the queued one gets the slot
        second = await queued
        assert second.status == 200
        second.close()


async def test_a_queued_request_whose_client_leaves_leaves_the_queue(twin, metrics):
    twin.handles["tiny"].pause_s = 0.05
    async with await serve(twin, metrics=metrics, max_concurrent=1, max_queued=1) as client:
        long = {"model": "tiny", "prompt": "Hi", "max_tokens": 100, "stream": True}
        first = await client.post("/v1/completions", headers=AUTH, json=long)
        await first.content.readline()
        queued = asyncio.create_task(client.post("/v1/completions", headers=AUTH, json=long))
        while _sample(metrics, "exo_inference_queued") < 1:
            await asyncio.sleep(0.01)
        queued.cancel()                               # the client gives up while queued
        await asyncio.gather(queued, return_exceptions=True)
        while _sample(metrics, "exo_inference_queued") > 0:
            await asyncio.sleep(0.05)
        again = asyncio.create_task(client.post("/v1/completions", headers=AUTH, json=long))
        while _sample(metrics, "exo_inference_queued") < 1:
            await asyncio.sleep(0.01)                 # the queue has room again: queued, not refused
        first.close()
        assert (await again).status == 200
        (await again).close()
        assert len(twin.handles["tiny"].requests) == 2  # the one that left never generated


def _sample(metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0
