"""Embedding requests in real stage servers (real sockets, real MLX): the last stage pools the
normed hidden states over every prefill chunk into single-process mlx-lm's mean, beside
generating requests, and a stage that cannot pool refuses at OPEN."""
import asyncio

import numpy as np
import pytest

from reconciler.datapath import PipelineClient
from reconciler.datapath.pipeline import RouteError
from tests.datapath.test_batching import PROMPTS, SPLITS, BatchingStages, ForwardOnlyShard, collect, settled


def mean_normed_hidden(model_path, prompt):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(model_path)
    return np.array(model.model(mx.array([prompt])).astype(mx.float32).mean(axis=1)[0])


async def test_vectors_pooled_over_chunks_beside_generation_equal_mlx_lm_and_free_their_caches(
        tiny_model, reference_tokens):
    expected = [mean_normed_hidden(tiny_model, p) for p in PROMPTS[:3]]
    tokens = reference_tokens(tiny_model, PROMPTS[3], max_tokens=10)
    async with BatchingStages(tiny_model, SPLITS[2]) as stages, PipelineClient(prefill_chunk=4) as client:
        *vectors, generated = await asyncio.gather(*(client.embed(stages.route, p) for p in PROMPTS[:3]),
                                                   collect(client, stages.route, PROMPTS[3], max_tokens=10))
        assert await settled(stages)
    assert generated == tokens
    for vector, reference in zip(vectors, expected):
        np.testing.assert_allclose(np.array(vector), reference, rtol=0.02, atol=0.02)


async def test_a_last_stage_that_cannot_pool_refuses_the_embedding_request(tiny_model):
    async with BatchingStages(tiny_model, SPLITS[1], wrap=ForwardOnlyShard) as stages, PipelineClient() as client:
        with pytest.raises(RouteError, match="cannot pool hidden states"):
            await client.embed(stages.route, PROMPTS[0])
