"""Continuous batching for one shard: which waiting chunks run in the next forward.

Chunks wait here (on the event loop) until the shard's compute thread is free. Each step then
runs either prefill chunks, or the single-token steps of up to ``max_batch_size`` requests as one
batched forward; when both wait, they alternate, so a long prompt stalls running streams by at
most one chunk, and a request joins the batch at the next step after its prompt. A prefill step
runs the waiting chunks of several requests one after another while they add up to at most
``PREFILL_STEP_TOKENS`` (one full chunk; at least one chunk), and the first tokens of the
prompts of one prefill step wait for at most one more (streams that run already never do):
requests that arrive together then decode together and step as one batch to the end, instead
of joining a prompt at a time and finishing one by one in ever smaller batches (the small model,
8 streams of 24 tokens: 14 decode steps of 1 to 7 rows around 17 full ones before, 1 around 23
after). A request has at most one chunk in a step (its chunks run in order).
A decode step with fewer rows than the last one waits briefly (``MAX_GATHER_S``) for the others,
whose next chunks come back one by one from the origin, instead of starting with the first.
The KV caches of the rows of a batch stay merged (``DecodeBatch``) while the same requests keep
stepping together; rows are split off or merged in as the set changes. A stage with a next one
steps its requests in two alternating halves, so a shard keeps one merged batch per half
(``DecodeBatches``): re-merging the other half's caches at every step cost a fifth of the step
(the small model's first 6 layers, 4 rows of 30 positions: 217 ms a step against 176 ms).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from reconciler.datapath.pipeline import PREFILL_CHUNK
from reconciler.datapath.wire import Frame

DEFAULT_MAX_BATCH_SIZE = 8
# The prompt tokens one prefill step may run, over the chunks of several requests (see above).
PREFILL_STEP_TOKENS = PREFILL_CHUNK
# A decode step waits at most this long (and a quarter of the last step) for the rows of the last
# step whose next chunks are not back yet, so replies that arrive one by one still step together.
MAX_GATHER_S = 0.02


@dataclass(eq=False)
class Job:
    """One received FORWARD chunk of a request, waiting for compute."""

    request: Any  # the stage's _Request
    frame: Frame
    source: Any  # the peer it came from (its pending bytes are given back on delivery)
    size: int
    arrived: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        """Positions the chunk carries (token ids or hidden states: its second dimension)."""
        tensor = self.frame.tensor
        return tensor.shape[1] if tensor is not None and len(tensor.shape) >= 2 else 0

    @property
    def single_token(self) -> bool:
        if getattr(self.request, "embed", False):  # pooled on its own (it never decodes)
            return False
        return self.tokens == 1


class DecodeBatch:
    """The merged KV caches of the requests that stepped together last; compute thread only.

    A request in the batch keeps ``request.cache = None`` and ``request.batch = self``; its own
    cache comes back (``release``) when it leaves."""

    def __init__(self, shard: Any) -> None:
        self.shard = shard
        self.rows: list[Any] = []
        self.caches: list[Any] | None = None

    def arrange(self, requests: list[Any]) -> list[Any]:
        """The merged caches with exactly ``requests`` as rows, in that order."""
        if requests == self.rows:
            return self.caches  # type: ignore[return-value]
        wanted = set(requests)
        if wanted <= set(self.rows):  # a subset: split the others off, keep the merged rows
            for row, request in enumerate(self.rows):
                if request not in wanted:
                    self._give_back(request, row)
            self._keep([self.rows.index(r) for r in requests])
            return self.caches  # type: ignore[return-value]
        self.dissolve()
        for request in requests:  # rows merged in another group's batch come out of it first
            if request.batch is not None and request.batch is not self:
                request.batch.release(request, keep_cache=True)
        caches = [r.cache if r.cache is not None else self.shard.make_cache() for r in requests]
        self.caches = self.shard.merge_caches(caches)
        for request in requests:
            request.cache, request.batch = None, self
        self.rows = list(requests)
        return self.caches

    def release(self, request: Any, *, keep_cache: bool) -> None:
        """Take ``request`` out of the batch, with its own cache back when ``keep_cache``."""
        if request.batch is not self:
            return
        row = self.rows.index(request)
        if keep_cache:
            self._give_back(request, row)
        request.batch = None
        self._keep([i for i in range(len(self.rows)) if i != row])

    def dissolve(self) -> None:
        for row, request in enumerate(self.rows):
            self._give_back(request, row)
        self.rows, self.caches = [], None

    def drop(self) -> None:
        """Forget the merged caches (after a failed forward: their contents are unknown)."""
        for request in self.rows:
            request.batch = None
        self.rows, self.caches = [], None

    def _give_back(self, request: Any, row: int) -> None:
        request.cache = self.shard.extract_cache(self.caches, row)
        request.batch = None

    def _keep(self, rows: list[int]) -> None:
        if not rows:
            self.rows, self.caches = [], None
            return
        self.shard.filter_caches(self.caches, rows)
        self.rows = [self.rows[i] for i in rows]


PIPELINE_GROUPS = 2  # a stage with a next one steps its requests in this many groups, alternating


def group_rows(requests: int) -> int:
    """Rows per step on a stage with a next one: one group of its requests, so while the next
    stage runs one group, this one runs another (the stages of a pipeline compute at the same time)."""
    return max(1, -(-requests // PIPELINE_GROUPS))


class DecodeBatches:
    """A shard's merged decode batches, one per group of requests that step together (a stage
    with a next one alternates PIPELINE_GROUPS groups of its requests); compute thread only."""

    def __init__(self, shard: Any, groups: int = PIPELINE_GROUPS) -> None:
        self.shard = shard
        self._batches = [DecodeBatch(shard) for _ in range(groups)]

    def for_rows(self, requests: list[Any]) -> DecodeBatch:
        """The batch to step ``requests`` in: the one already holding most of them, else an empty
        one, so a new group does not break up another group's merged caches."""
        wanted = set(requests)
        return max(self._batches, key=lambda batch: (len(wanted.intersection(batch.rows)), not batch.rows))


Outcome = Any  # a Frame to send, None (nothing to send), or the exception that failed the chunk
Submit = Callable[..., "concurrent.futures.Future[list[Outcome]]"]


class ShardBatcher:
    """Chunks of one shard waiting for its compute thread, and the step that runs there now.

    ``run_one(job) -> Outcome`` and ``run_rows(batches, jobs) -> [Outcome]`` run on the compute
    thread (through ``submit``); ``deliver(job, outcome)`` runs on the loop, in step order."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, submit: Submit, run_one: Callable[[Job], Outcome],
                 run_rows: Callable[[DecodeBatches, list[Job]], list[Outcome]] | None,
                 batches: DecodeBatches | None,
                 deliver: Callable[[Job, Outcome], None], max_batch_size: int,
                 observe: Callable[[int, list[float]], None] | None = None,
                 row_limit: Callable[[int], int] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size if run_rows is not None else 1
        self.batches = batches
        self._loop, self._submit = loop, submit
        self._run_one, self._run_rows, self._deliver = run_one, run_rows, deliver
        self._observe = observe  # (rows in the step, queue wait of each) per step
        self._row_limit = row_limit  # max_batch_size -> the rows the next step may take
        self._waiting: list[Job] = []
        self._scheduled = self._running = self._prefill_last = self._gathered = False
        self._expected: set[Any] = set()  # rows of the last decode step
        self._prefilled: set[Any] = set()  # requests of the last prefill step
        self._held_first = False  # the last prefill step held their first tokens back (done once in a row)
        self._timer: asyncio.TimerHandle | None = None  # while a decode step waits for them
        self._last_step_s = 0.0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def add(self, job: Job) -> None:
        self._waiting.append(job)
        self._schedule()

    def drop(self, request: Any) -> list[Job]:
        """Forget the waiting chunks of ``request`` (it ended); returns them."""
        dropped = [job for job in self._waiting if job.request is request]
        if dropped:
            self._waiting = [job for job in self._waiting if job.request is not request]
        self._expected.discard(request)
        self._prefilled.discard(request)
        self._schedule()
        return dropped

    def _schedule(self) -> None:
        # Deferred with call_soon: frames read in one burst from a socket join the same step.
        if self._timer is not None and not self._missing():
            self._timer.cancel()
            self._timer = None
        if self._waiting and not (self._running or self._scheduled or self._timer is not None):
            self._scheduled = True
            self._loop.call_soon(self._start)

    def _missing(self) -> set[Any]:
        return self._expected - {job.request for job in self._waiting}

    def _gather_then_start(self) -> None:
        self._timer = None
        self._gathered = True
        self._start()

    def _pick(self) -> list[Job]:
        heads: dict[Any, Job] = {}
        for job in self._waiting:
            heads.setdefault(job.request, job)  # each request's oldest chunk only
        firsts = list(heads.values())
        if self._run_rows is None:
            return firsts[:1]
        limit = self._row_limit(self.max_batch_size) if self._row_limit is not None else self.max_batch_size
        rows = [job for job in firsts if job.single_token][:limit]
        prefill = self._prefill_step([job for job in firsts if not job.single_token])
        # The first tokens of prompts prefilled in the last step wait for one more prefill step:
        # prompts that arrived together then start decoding together (their first tokens in one step).
        just_prefilled = bool(rows) and not self._held_first and all(j.request in self._prefilled for j in rows)
        if prefill and (not rows or not self._prefill_last or just_prefilled):
            self._held_first = bool(rows) and self._prefill_last
            self._prefill_last = True
            self._prefilled = {job.request for job in prefill}
            return prefill
        self._prefill_last = self._held_first = False
        return rows

    def _prefill_step(self, chunks: list[Job]) -> list[Job]:
        """The oldest waiting prefill chunks that add up to PREFILL_STEP_TOKENS (at least one), of
        at most ``max_batch_size`` requests."""
        step: list[Job] = []
        tokens = 0
        for job in chunks[: self.max_batch_size]:
            if step and tokens + job.tokens > PREFILL_STEP_TOKENS:
                break
            step.append(job)
            tokens += job.tokens
        return step

    def _start(self) -> None:
        self._scheduled = False
        if self._running or not self._waiting:
            return
        jobs = self._pick()
        decoding = self._run_rows is not None and jobs[0].single_token
        if decoding and not self._gathered and len(jobs) < len(self._expected) and self._missing():
            self._timer = self._loop.call_later(min(MAX_GATHER_S, self._last_step_s / 4), self._gather_then_start)
            return
        self._gathered = False
        if decoding:
            self._expected = {job.request for job in jobs}
        picked = set(map(id, jobs))
        self._waiting = [job for job in self._waiting if id(job) not in picked]
        if self._observe is not None:  # per forward: the rows of a batched one, else each chunk alone
            now = time.monotonic()
            for forward in [jobs] if decoding else [[job] for job in jobs]:
                self._observe(len(forward), [now - job.arrived for job in forward])
        try:
            if decoding and len(jobs) > 1:
                future = self._submit(self._run_rows, self.batches, jobs)
            else:
                future = self._submit(self._run_each, jobs)
        except RuntimeError as exc:  # the compute thread is shut down (the shard is being unloaded)
            for job in jobs:
                self._deliver(job, exc)
            return self._schedule()
        self._running = True
        loop, started = self._loop, time.monotonic()

        def done(f: concurrent.futures.Future[list[Outcome]]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while the compute thread finished
                loop.call_soon_threadsafe(self._finish, jobs, f, started if decoding else None)

        future.add_done_callback(done)

    def _run_each(self, jobs: list[Job]) -> list[Outcome]:
        """Compute thread: the chunks one after another; a failed one fails only its own request."""
        outcomes: list[Outcome] = []
        for job in jobs:
            try:
                outcomes.append(self._run_one(job))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _finish(self, jobs: list[Job], future: concurrent.futures.Future[list[Outcome]],
                started: float | None) -> None:
        self._running = False
        if started is not None:
            self._last_step_s = time.monotonic() - started
        if future.cancelled():
            outcomes: list[Outcome] = [None] * len(jobs)
        elif future.exception() is not None:
            outcomes = [future.exception()] * len(jobs)
        else:
            outcomes = future.result()
        for job, outcome in zip(jobs, outcomes):
            self._deliver(job, outcome)
        self._schedule()
