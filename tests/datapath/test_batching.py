"""Continuous batching in real stage servers (real sockets, real MLX): concurrent requests share
batched forwards and still get, token for token, what single-process mlx-lm gives each alone."""
import asyncio
import concurrent.futures
import contextlib

import pytest

from reconciler.datapath import PipelineClient, StageServer
from reconciler.datapath.batcher import PREFILL_STEP_TOKENS, Job, ShardBatcher
from reconciler.datapath.wire import Frame, Kind, Tensor
from reconciler.runtime import open_shard

PROMPTS = [
    [1, 5, 9, 33, 7, 100, 42, 8, 9, 10, 11],
    [3, 1, 4, 1, 5, 9, 2, 6],
    [7] * 30,
    [200, 100],
    [42],
    list(range(60, 100)),
    [11, 22, 33, 44, 55],
    [300, 301, 302, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
]
SPLITS = {1: [(0, 6)], 2: [(0, 3), (3, 6)]}


class BatchingStages:
    """Stage servers over one loaded shard each, recording the rows of every compute step."""

    def __init__(self, model_path, ranges, *, max_batch_size=8, wrap=None) -> None:
        self.model_path, self.ranges, self.max_batch_size, self.wrap = model_path, ranges, max_batch_size, wrap
        self.servers, self.shards, self.steps = [], [], []

    async def __aenter__(self):
        for index, (start, end) in enumerate(self.ranges):
            shard = await open_shard(self.model_path, start=start, end=end)
            self.shards.append(shard)
            server = StageServer(max_batch_size=self.max_batch_size)
            server.step_observer = lambda name, rows, waits: self.steps.append((name, rows))
            server.add_shard(f"stage{index}", self.wrap(shard) if self.wrap else shard)
            await server.start()
            self.servers.append(server)
        return self

    async def __aexit__(self, *exc):
        for server in self.servers:
            await server.stop()
        for shard in self.shards:
            shard.close()

    @property
    def route(self):
        return [server.address(f"stage{i}") for i, server in enumerate(self.servers)]

    def widest_step(self) -> int:
        return max(rows for _, rows in self.steps)


class ForwardOnlyShard:
    """The interface a shard without batching offers (a tensor-parallel rank: forward and make_cache)."""

    def __init__(self, shard) -> None:
        self._shard = shard
        self.compute, self.start, self.end = shard.compute, shard.start, shard.end
        self.num_layers, self.is_last, self.path = shard.num_layers, shard.is_last, shard.path

    def make_cache(self):
        return self._shard.make_cache()

    def forward(self, x, *, cache):
        assert x.shape[0] == 1, "a forward-only shard is given one request at a time"
        return self._shard.forward(x, cache=cache)


async def collect(client, route, prompt, **kwargs):
    return [token async for token in client.generate(route, prompt, **kwargs)]


@pytest.mark.parametrize("stage_count", [1, 2])
async def test_eight_concurrent_greedy_requests_run_batched_and_each_equals_mlx_lm_alone(
        tiny_model, reference_tokens, stage_count):
    expected = [reference_tokens(tiny_model, p, max_tokens=20, prefill_step_size=16) for p in PROMPTS]
    assert len({tuple(e) for e in expected}) == len(PROMPTS)
    async with BatchingStages(tiny_model, SPLITS[stage_count]) as stages, PipelineClient(prefill_chunk=16) as client:
        got = await asyncio.gather(*(collect(client, stages.route, p, max_tokens=20) for p in PROMPTS))
        assert await settled(stages)
    assert list(got) == expected
    assert stages.widest_step() >= 4, stages.steps


async def settled(stages) -> bool:
    for _ in range(300):
        if all(s.kv_caches() == 0 and s.active_requests() == 0 for s in stages.servers):
            return True
        await asyncio.sleep(0.01)
    return False


async def test_seeded_sampling_inside_a_batch_draws_what_that_request_draws_alone(tiny_model, reference_tokens):
    sampled = reference_tokens(tiny_model, PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.8, seed=77)
    greedy = [reference_tokens(tiny_model, p, max_tokens=16) for p in PROMPTS[1:4]]
    async with BatchingStages(tiny_model, SPLITS[2]) as stages, PipelineClient() as client:
        got = await asyncio.gather(
            collect(client, stages.route, PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.8, seed=77),
            *(collect(client, stages.route, p, max_tokens=16) for p in PROMPTS[1:4]))
    assert list(got) == [sampled, *greedy]
    assert stages.widest_step() >= 2


async def test_no_step_runs_more_rows_than_the_batch_size_limit(tiny_model, reference_tokens):
    expected = [reference_tokens(tiny_model, p, max_tokens=12) for p in PROMPTS[:6]]
    async with BatchingStages(tiny_model, SPLITS[1], max_batch_size=2) as stages, PipelineClient() as client:
        got = await asyncio.gather(*(collect(client, stages.route, p, max_tokens=12) for p in PROMPTS[:6]))
    assert list(got) == expected
    assert stages.widest_step() == 2


async def test_a_request_leaving_the_batch_early_frees_its_cache_and_the_others_go_on(tiny_model, reference_tokens):
    expected = [reference_tokens(tiny_model, p, max_tokens=24) for p in PROMPTS[:4]]

    async def leave_after_three(client, route):
        tokens = client.generate(route, PROMPTS[4], max_tokens=1000)
        async with contextlib.aclosing(tokens):
            return [await anext(tokens) for _ in range(3)]

    async with BatchingStages(tiny_model, SPLITS[2]) as stages, PipelineClient() as client:
        *got, early = await asyncio.gather(*(collect(client, stages.route, p, max_tokens=24) for p in PROMPTS[:4]),
                                           leave_after_three(client, stages.route))
        assert await settled(stages), [(s.kv_caches(), s.active_requests()) for s in stages.servers]
    assert got == expected
    assert early == reference_tokens(tiny_model, PROMPTS[4], max_tokens=3)


async def test_a_shard_without_batching_support_serves_concurrent_requests_one_at_a_time(tiny_model,
                                                                                          reference_tokens):
    expected = [reference_tokens(tiny_model, p, max_tokens=10) for p in PROMPTS[:4]]
    async with BatchingStages(tiny_model, SPLITS[2], wrap=ForwardOnlyShard) as stages, PipelineClient() as client:
        got = await asyncio.gather(*(collect(client, stages.route, p, max_tokens=10) for p in PROMPTS[:4]))
    assert list(got) == expected
    assert stages.widest_step() == 1


class Prompt:
    """A request as the batcher sees one (the stage's own request object is opaque to it)."""

    embed = False

    def __init__(self, name: str) -> None:
        self.name = name


def chunk(request: Prompt, tokens: int) -> Job:
    tensor = Tensor("int32", (1, tokens), bytes(4 * tokens))
    return Job(request, Frame(Kind.FORWARD, 1, tensor=tensor), source=None, size=4 * tokens)


async def steps_of(jobs: list[Job], *, max_batch_size: int = 8) -> list[list[tuple[str, int]]]:
    """The (request, tokens) of each compute step a ShardBatcher runs for ``jobs``, all waiting at once."""
    loop, steps, delivered = asyncio.get_running_loop(), [], []

    def submit(fn, *args):  # the compute thread, run in place
        steps.append([(job.request.name, job.tokens) for job in args[-1]])
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future

    batcher = ShardBatcher(loop=loop, submit=submit, run_one=lambda job: None,
                           run_rows=lambda batch, rows: [None] * len(rows), batches=None,
                           deliver=lambda job, outcome: delivered.append(job), max_batch_size=max_batch_size)
    for job in jobs:
        batcher.add(job)
    while len(delivered) < len(jobs):
        await asyncio.sleep(0)
    return steps


async def test_prompts_waiting_together_are_prefilled_in_steps_of_at_most_one_chunk_of_tokens_then_decode_together():
    a, b, c, d = (Prompt(name) for name in "abcd")
    steps = await steps_of([chunk(a, 40), chunk(b, 40), chunk(c, 40), chunk(d, 100),
                            chunk(a, 1), chunk(b, 1), chunk(c, 1), chunk(d, 1)])
    assert PREFILL_STEP_TOKENS == 128
    assert steps == [[("a", 40), ("b", 40), ("c", 40)], [("d", 100)], [("a", 1), ("b", 1), ("c", 1), ("d", 1)]]


async def test_a_first_token_waits_for_at_most_one_more_prefill_step_and_running_streams_alternate_with_prefill():
    a, b, c, d = (Prompt(name) for name in "abcd")
    steps = await steps_of([chunk(a, 40), chunk(a, 1), chunk(a, 1), chunk(a, 1),
                            chunk(b, 100), chunk(c, 100), chunk(d, 100)])
    assert steps == [[("a", 40)], [("b", 100)], [("a", 1)], [("c", 100)], [("a", 1)], [("d", 100)], [("a", 1)]]


async def test_a_prompt_chunk_larger_than_the_step_runs_alone_and_a_step_prefills_at_most_the_batch_size():
    a, b, c = (Prompt(name) for name in "abc")
    assert await steps_of([chunk(a, 300), chunk(b, 2), chunk(c, 2)], max_batch_size=1) == \
        [[("a", 300)], [("b", 2)], [("c", 2)]]
    assert await steps_of([chunk(a, 3), chunk(b, 2), chunk(c, 2)], max_batch_size=2) == \
        [[("a", 3), ("b", 2)], [("c", 2)]]


class CountingMerges:
    """A real shard that counts how often request caches are merged into a batch."""

    def __init__(self, shard) -> None:
        self._shard, self.merges = shard, 0

    def __getattr__(self, name):
        return getattr(self._shard, name)

    def merge_caches(self, caches):
        self.merges += 1
        return self._shard.merge_caches(caches)


def test_two_halves_stepping_in_turn_keep_their_own_merged_batches_and_a_row_moving_keeps_its_cache(tiny_model):
    import mlx.core as mx

    from reconciler.datapath.batcher import DecodeBatches
    from reconciler.runtime import load_shard

    shard = load_shard(tiny_model, start=0, end=6)
    try:
        def run():
            counted = CountingMerges(shard)

            class Row:
                cache = batch = None

            def greedy(out, row):
                return int(mx.argmax(out[row, -1]).item())

            def prefilled(prompt):
                row = Row()
                row.cache = shard.make_cache()
                row.token = greedy(shard.forward(mx.array([prompt]), cache=row.cache), 0)
                return row

            alone = [prefilled(p) for p in PROMPTS[:4]]
            expected = []
            for row in alone:  # each request stepped by itself
                tokens = []
                for _ in range(6):
                    row.token = greedy(shard.forward(mx.array([[row.token]]), cache=row.cache), 0)
                    tokens.append(row.token)
                expected.append(tokens)

            rows = [prefilled(p) for p in PROMPTS[:4]]
            got = [[] for _ in rows]
            batches = DecodeBatches(counted)
            # Halves (0, 1) and (2, 3) step in turn three times each; then row 2 joins the first half.
            groups = [[0, 1], [2, 3]] * 3 + [[0, 1, 2], [3]] * 3
            for group in groups:
                members = [rows[i] for i in group]
                caches = batches.for_rows(members).arrange(members)
                out = shard.forward(mx.array([[r.token] for r in members]), cache=caches)
                for row_index, i in enumerate(group):
                    rows[i].token = greedy(out, row_index)
                    got[i].append(rows[i].token)
            return counted.merges, got, expected

        merges, got, expected = shard.compute.call(run)
    finally:
        shard.close()
    assert got == expected
    # One merge per half, then one when row 2 moves over; the halves never re-merge each other.
    assert merges == 3, merges
