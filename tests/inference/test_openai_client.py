"""The official ``openai`` client against a real node API server on 127.0.0.1, backed by real MLX
inference on the tiny model: greedy output equals mlx_lm's own, streamed or not."""
from __future__ import annotations

import openai
import pytest

from reconciler.metrics import NodeMetrics
from tests.inference.inference_helpers import TOKEN, serve

MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def greedy(tiny_model_dir):
    """mlx_lm's own greedy generation: (text, token count) for prompt token ids."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny_model_dir))

    def generate(prompt_ids: list[int]) -> tuple[str, int]:
        responses = list(mlx_lm.stream_generate(model, tokenizer, prompt=prompt_ids, max_tokens=MAX_TOKENS))
        ended_by_eos = responses[-1].finish_reason == "stop"
        return "".join(r.text for r in responses), len(responses) - ended_by_eos

    return generate


def openai_client(port: int, api_key: str = TOKEN) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0,
                              http_client=openai.DefaultAsyncHttpxClient(trust_env=False))


async def test_chat_through_the_openai_client_equals_mlx_lm_greedy_generation(backend, greedy):
    tokenizer = backend.resolve("tiny").tokenizer
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    expected_text, expected_tokens = greedy(prompt_ids)
    assert expected_text.strip()
    metrics = NodeMetrics(node="node-a")
    async with await serve(backend, metrics=metrics) as server, openai_client(server.port) as client:
        reply = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                     temperature=0)
        assert reply.choices[0].message.content == expected_text
        assert reply.choices[0].finish_reason == ("length" if expected_tokens == MAX_TOKENS else "stop")
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt_ids), expected_tokens)

        stream = await client.chat.completions.create(model="exo/tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text
        assert chunks[-1].usage.completion_tokens == expected_tokens
    assert metrics.registry.get_sample_value("exo_generated_tokens_total", {"model": "tiny"}) == 2 * expected_tokens


async def test_text_completion_through_the_openai_client_equals_mlx_lm_greedy_generation(backend, greedy):
    prompt = "The quick brown fox"
    expected_text, expected_tokens = greedy(backend.resolve("tiny").tokenizer.encode(prompt))
    async with await serve(backend) as server, openai_client(server.port) as client:
        reply = await client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].text == expected_text
        assert reply.usage.completion_tokens == expected_tokens
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True)
        assert "".join([chunk.choices[0].text async for chunk in stream]) == expected_text


async def test_the_openai_client_lists_models_and_raises_its_own_errors(backend):
    async with await serve(backend) as server, openai_client(server.port) as client:
        models = await client.models.list()
        assert [(m.id, m.state) for m in models.data] == [("tiny", "Ready")]
        with pytest.raises(openai.NotFoundError, match="llama-70b") as missing:
            await client.chat.completions.create(model="llama-70b", messages=MESSAGES)
        assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
        with pytest.raises(openai.BadRequestError, match="temperature") as bad:
            await client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=9)
        assert bad.value.param == "temperature"
        async with openai_client(server.port, api_key="wrong") as intruder:
            with pytest.raises(openai.AuthenticationError) as refused:
                await intruder.models.list()
            assert refused.value.code == "invalid_api_key"
