"""Which waiting chunks the batcher puts in each compute step (a real loop and a real compute
thread; the steps record what they were given instead of running a model)."""
import asyncio
import concurrent.futures
import time

from reconciler.datapath.batcher import Job, ShardBatcher
from reconciler.datapath.wire import Frame, Kind, Tensor


def chunk(request: str, length: int) -> Job:
    tensor = Tensor("int32", (1, length), bytes(4 * length))
    return Job(request, Frame(Kind.FORWARD, 1, tensor=tensor), source=None, size=0)


async def run_steps(jobs: list[Job], *, max_batch_size: int = 8, batched: bool = True) -> list[list[str]]:
    """Queue ``jobs`` at once and return, per step, the requests (+ "prefill" marks) it ran."""
    steps: list[list[str]] = []
    delivered: list[Job] = []
    done = asyncio.Event()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def run_one(job):
        steps.append([f"{job.request}:{'decode' if job.single_token else 'prefill'}"])

    def run_rows(batch, rows):
        steps.append([f"{job.request}:decode" for job in rows])
        return [None] * len(rows)

    def deliver(job, outcome):
        delivered.append(job)
        if len(delivered) == len(jobs):
            done.set()

    batcher = ShardBatcher(loop=asyncio.get_running_loop(), submit=executor.submit, run_one=run_one,
                           run_rows=run_rows if batched else None, batches=None, deliver=deliver,
                           max_batch_size=max_batch_size)
    for job in jobs:
        batcher.add(job)
    await asyncio.wait_for(done.wait(), 5)
    executor.shutdown()
    assert delivered and set(map(id, delivered)) == set(map(id, jobs))
    return steps


async def test_waiting_single_token_steps_of_different_requests_share_one_step():
    steps = await run_steps([chunk("a", 1), chunk("b", 1), chunk("c", 1)])
    assert steps == [["a:decode", "b:decode", "c:decode"]]


async def test_a_long_prompt_is_prefilled_one_chunk_at_a_time_between_decode_steps():
    jobs = [chunk("a", 1), chunk("b", 1), chunk("p", 16), chunk("p", 16), chunk("p", 1), chunk("a", 1), chunk("b", 1)]
    steps = await run_steps(jobs)
    assert steps == [["p:prefill"], ["a:decode", "b:decode"], ["p:prefill"], ["p:decode", "a:decode", "b:decode"]]


async def test_each_step_holds_at_most_the_batch_size_and_one_chunk_per_request():
    steps = await run_steps([chunk(r, 1) for r in "abcde"] + [chunk("a", 1)], max_batch_size=2)
    assert steps == [["a:decode", "b:decode"], ["c:decode", "d:decode"], ["e:decode", "a:decode"]]


async def test_a_shard_without_batching_runs_one_chunk_per_step_in_arrival_order():
    steps = await run_steps([chunk("a", 1), chunk("b", 1), chunk("a", 1)], batched=False)
    assert steps == [["a:decode"], ["b:decode"], ["a:decode"]]


async def test_next_chunks_that_come_back_one_by_one_still_step_together():
    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    steps, finished = [], asyncio.Event()
    batcher: ShardBatcher

    def run_rows(batch, rows):
        steps.append(sorted(job.request for job in rows))
        time.sleep(0.04)  # a step long enough that waiting 1/4 of it covers the staggered replies
        return [None] * len(rows)

    def deliver(job, outcome):
        if len(steps) == 1:  # the origin answers each row of the first step a little later than the last
            delay = 0.001 * "abc".index(job.request)
            loop.call_later(delay, batcher.add, chunk(job.request, 1))
        elif len(steps) == 2 and job.request == "c":
            finished.set()

    batcher = ShardBatcher(loop=loop, submit=executor.submit, run_one=lambda job: None, run_rows=run_rows,
                           batches=None, deliver=deliver, max_batch_size=8)
    for request in "abc":
        batcher.add(chunk(request, 1))
    await asyncio.wait_for(finished.wait(), 5)
    executor.shutdown()
    assert steps == [["a", "b", "c"], ["a", "b", "c"]]
