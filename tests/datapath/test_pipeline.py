import asyncio
import contextlib
import time

import pytest

from reconciler.datapath import PipelineClient, RouteError, StageAddress, StageLost, StagesBusy

PROMPT = [1, 5, 9, 33, 7, 100, 42, 8, 9, 10, 11]
SPLITS = {
    1: [(0, 6)],
    2: [(0, 3), (3, 6)],
    3: [(0, 2), (2, 4), (4, 6)],
}


async def collect(client, route, prompt, **kwargs):
    return [token async for token in client.generate(route, prompt, **kwargs)]


async def wait_until(predicate, timeout_s=3.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.parametrize("stage_count", [1, 2, 3])
async def test_greedy_tokens_through_n_stages_match_single_process_mlx_lm(tiny_model, stages, reference_tokens, stage_count):
    expected = reference_tokens(tiny_model, PROMPT, max_tokens=24, prefill_step_size=4)
    async with stages(tiny_model, SPLITS[stage_count]) as running, PipelineClient(prefill_chunk=4) as client:
        assert await collect(client, running.route, PROMPT, max_tokens=24) == expected
        assert await wait_until(lambda: running.active_requests() == [0] * stage_count)


async def test_a_model_with_tied_embeddings_decodes_like_mlx_lm_across_two_stages(tiny_tied_model, stages, reference_tokens):
    expected = reference_tokens(tiny_tied_model, PROMPT, max_tokens=16)
    async with stages(tiny_tied_model, SPLITS[2]) as running, PipelineClient() as client:
        assert await collect(client, running.route, PROMPT, max_tokens=16) == expected


async def test_seeded_sampling_draws_the_same_tokens_as_mlx_lm_with_that_seed(tiny_model, stages, reference_tokens):
    expected = reference_tokens(tiny_model, PROMPT, max_tokens=20, temperature=0.9, top_p=0.8, seed=1234)
    async with stages(tiny_model, SPLITS[2]) as running, PipelineClient() as client:
        first = await collect(client, running.route, PROMPT, max_tokens=20, temperature=0.9, top_p=0.8, seed=1234)
        again = await collect(client, running.route, PROMPT, max_tokens=20, temperature=0.9, top_p=0.8, seed=1234)
        other = await collect(client, running.route, PROMPT, max_tokens=20, temperature=0.9, top_p=0.8, seed=99)
    assert first == again == expected
    assert other != first


async def test_concurrent_requests_get_the_same_tokens_as_sequential_ones(tiny_model, stages):
    prompts = [PROMPT, [3, 1, 4, 1, 5, 9, 2, 6], [7] * 30, [200, 100]]
    async with stages(tiny_model, SPLITS[3]) as running, PipelineClient(prefill_chunk=8) as client:
        sequential = [await collect(client, running.route, p, max_tokens=16) for p in prompts]
        concurrent = await asyncio.gather(*(collect(client, running.route, p, max_tokens=16) for p in prompts))
        assert await wait_until(lambda: running.active_requests() == [0, 0, 0])
    assert list(concurrent) == sequential
    assert len({tuple(tokens) for tokens in sequential}) == len(prompts)


async def test_a_stop_id_ends_the_stream_without_being_yielded(tiny_model, stages, reference_tokens):
    expected = reference_tokens(tiny_model, PROMPT, max_tokens=12)
    stop = expected[5]
    cut = expected.index(stop)
    async with stages(tiny_model, SPLITS[2]) as running, PipelineClient() as client:
        assert await collect(client, running.route, PROMPT, max_tokens=12, stop_ids=[stop]) == expected[:cut]


async def test_closing_the_token_stream_early_frees_the_request_on_every_stage(tiny_model, stages):
    async with stages(tiny_model, SPLITS[3]) as running, PipelineClient() as client:
        tokens = client.generate(running.route, PROMPT, max_tokens=10_000)
        async with contextlib.aclosing(tokens):
            for _ in range(3):
                await anext(tokens)
            assert running.active_requests() == [1, 1, 1]
        assert await wait_until(lambda: running.active_requests() == [0, 0, 0])


async def test_a_client_that_disconnects_mid_request_leaves_no_cache_behind(tiny_model, stages):
    async with stages(tiny_model, SPLITS[2]) as running:
        client = PipelineClient()
        tokens = client.generate(running.route, PROMPT, max_tokens=10_000)
        await anext(tokens)
        await client.aclose()  # connections drop while the generator is still open
        assert await wait_until(lambda: running.active_requests() == [0, 0])
        with pytest.raises(StageLost):
            await anext(tokens)


async def test_losing_a_stage_mid_request_raises_quickly_and_a_new_route_works(tiny_model, stages, reference_tokens):
    expected = reference_tokens(tiny_model, PROMPT, max_tokens=8)
    async with stages(tiny_model, SPLITS[2]) as running, stages(tiny_model, [(3, 6)]) as spare:
        async with PipelineClient() as client:
            tokens = client.generate(running.route, PROMPT, max_tokens=10_000)
            await anext(tokens)
            await running.servers[1].stop()
            started = time.monotonic()
            with pytest.raises(StageLost, match=f":{running.servers[1].port}"):
                async for _ in tokens:
                    pass
            assert time.monotonic() - started < 5
            new_route = [running.route[0], StageAddress(host="127.0.0.1", port=spare.servers[0].port, shard="stage0")]
            assert await collect(client, new_route, PROMPT, max_tokens=8) == expected


async def test_a_stage_that_stops_answering_is_declared_lost_within_the_deadline():
    async def silent(reader, writer):
        await reader.read()  # accepts and reads, never answers: a hung process

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    route = [StageAddress(host="127.0.0.1", port=server.sockets[0].getsockname()[1], shard="s")]
    started = time.monotonic()
    async with PipelineClient(heartbeat_interval_s=0.2, dead_after_s=1.0) as client:
        with pytest.raises(StageLost, match="did not answer"):
            await collect(client, route, PROMPT, max_tokens=4)
    assert time.monotonic() - started < 5
    server.close()


async def test_a_route_to_an_unreachable_port_fails_with_the_stage_named():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    route = [StageAddress(host="127.0.0.1", port=port, shard="gone")]
    async with PipelineClient() as client:
        with pytest.raises(StageLost, match=f"gone@127.0.0.1:{port}"):
            await collect(client, route, PROMPT, max_tokens=4)


async def test_an_unknown_shard_or_a_route_that_ends_early_is_refused_by_the_stage(tiny_model, stages):
    async with stages(tiny_model, SPLITS[2]) as running, PipelineClient() as client:
        wrong_name = [running.route[0].model_copy(update={"shard": "nope"}), running.route[1]]
        with pytest.raises(RouteError, match="shard 'nope' is not served here"):
            await collect(client, wrong_name, PROMPT, max_tokens=4)
        with pytest.raises(RouteError, match=r"layers \[0, 3\) of 6, but the route has no next stage"):
            await collect(client, running.route[:1], PROMPT, max_tokens=4)
        assert await wait_until(lambda: running.active_requests() == [0, 0])


async def test_a_stage_refuses_as_busy_a_request_beyond_those_it_reserved_memory_for(tiny_model, stages):
    async with stages(tiny_model, SPLITS[2]) as running, PipelineClient() as client:
        running.servers[1].set_request_limit("stage1", 1)
        holding = client.generate(running.route, PROMPT, max_tokens=50)
        first = await holding.__anext__()  # one request runs on both stages
        with pytest.raises(StagesBusy, match="stage1' already runs 1 requests"):
            await collect(client, running.route, PROMPT, max_tokens=4)
        assert await wait_until(lambda: running.active_requests() == [1, 1])  # the refused one is gone
        await holding.aclose()
        assert await wait_until(lambda: running.active_requests() == [0, 0])
        again = await collect(client, running.route, PROMPT, max_tokens=4)  # the slot is free again
        assert again[0] == first


async def test_the_next_token_is_computed_while_the_caller_still_holds_this_one(tiny_model, stages, reference_tokens):
    expected = reference_tokens(tiny_model, PROMPT, max_tokens=3)
    async with stages(tiny_model, SPLITS[2]) as running, PipelineClient() as client:
        last = running.servers[-1]
        steps = []
        last.step_observer = lambda name, rows, waits: steps.append(rows)
        tokens = client.generate(running.route, PROMPT, max_tokens=3)
        async with contextlib.aclosing(tokens):
            assert await anext(tokens) == expected[0]
            before = len(steps)
            # The caller has not asked for the second token, yet the last stage runs its step.
            assert await wait_until(lambda: len(steps) == before + 1)
            assert [t async for t in tokens] == expected[1:]
        assert len(steps) == before + 2  # no step beyond max_tokens
        assert await wait_until(lambda: running.active_requests() == [0, 0])
