"""The entry side of the data path: drive one request through a route of stages.

The client keeps one connection per stage server. For a request it sends OPEN to every stage
(each learns its shard, next hop and sampling parameters), waits for all OPENED, then feeds the
prompt to stage 0 in prefill chunks and each sampled token back in, one at a time: a token goes
back to stage 0 before it is handed to the caller, so the stages compute the next one while the
caller detokenizes and streams this one (as mlx-lm's generate_step computes step N+1 before it
yields step N; a caller that stops early costs the stages that one step). Every stage
connection is pinged while open, so a stage that dies, hangs or becomes unreachable fails the
request within `dead_after_s` instead of hanging it.

Prefill is flow-controlled: the last stage acknowledges each chunk, and at most
`prefill_window` chunks are in the pipeline at once, so a cancelled prefill leaves at most that
much work behind and no stage buffers a whole long prompt. A request that gets no frame for
`idle_timeout_s` fails with `RequestStalled`; however it ends, every stage gets an END.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import numpy as np

from reconciler.datapath.sampled import Sampled
from reconciler.datapath.wire import (
    FLAG_SAMPLE,
    ConnectionClosed,
    DataPathTLS,
    ErrorReport,
    Frame,
    Kind,
    OpenRequest,
    SamplingParams,
    StageAddress,
    Tensor,
    WireError,
    hello_frame,
    open_connection,
    read_frame,
    write_frame,
)


# Tokens per prefill step. On MLX's CPU backend prefill costs the same per token at 64 or 512
# (tiny model: 354 ms / 64, 3.8 s / 512), so a small step costs no throughput there and bounds how
# long a stage stays busy with a request whose client already left; GPUs gain from larger steps.
PREFILL_CHUNK = 128


class RouteError(RuntimeError):
    """A stage refused or failed the request; the message says which stage and why."""


class StageLost(RouteError):
    """A stage could not be reached, closed its connection, or stopped answering."""


class StagesBusy(RouteError):
    """A stage already runs as many requests as it reserved memory for; retry later."""


class RequestStalled(RouteError):
    """The stages stayed connected, but the request made no progress for `idle_timeout_s`."""


class _StageConnection:
    """One connection to a stage server, shared by all requests that pass through it."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        heartbeat_interval_s: float,
        dead_after_s: float,
        hop_observer: Callable[[float], None] | None = None,
    ) -> None:
        self.label = f"{host}:{port}"
        self._hop_observer = hop_observer
        self._ping_sent: float | None = None
        self._reader = reader
        self._writer = writer
        self._heartbeat_interval_s = heartbeat_interval_s
        self._dead_after_s = dead_after_s
        self._loop = asyncio.get_running_loop()
        self._last_heard = self._loop.time()
        self.failure: StageLost | None = None
        self.requests: dict[int, asyncio.Queue[Frame | Exception]] = {}
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"pipeline-read-{self.label}"),
            asyncio.create_task(self._heartbeat(), name=f"pipeline-heartbeat-{self.label}"),
        ]

    def send(self, frame: Frame) -> None:
        if self.failure is not None:
            raise self.failure
        write_frame(self._writer, frame)

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await read_frame(self._reader)
                self._last_heard = self._loop.time()
                if frame.kind is Kind.PONG and self._ping_sent is not None:
                    self._observe_hop(self._last_heard - self._ping_sent)
                queue = self.requests.get(frame.request_id)
                if queue is not None and frame.kind is not Kind.PONG:
                    queue.put_nowait(frame)
        except (ConnectionClosed, OSError) as exc:
            self._lose(StageLost(f"stage server {self.label} closed the connection ({exc})"))
        except WireError as exc:
            self._lose(StageLost(f"stage server {self.label} sent an invalid frame: {exc}"))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval_s)
            silent = self._loop.time() - self._last_heard
            if silent > self._dead_after_s:
                self._lose(StageLost(f"stage server {self.label} did not answer for {silent:.1f} s"))
                return
            with contextlib.suppress(StageLost):
                self.send(Frame(Kind.PING, 0))
                self._ping_sent = self._loop.time()

    def _observe_hop(self, round_trip: float) -> None:
        """Half a heartbeat's round trip: one network hop to this stage, without compute."""
        self._ping_sent = None
        if self._hop_observer is not None:
            self._hop_observer(round_trip / 2)

    def _lose(self, failure: StageLost) -> None:
        if self.failure is not None:
            return
        self.failure = failure
        for queue in self.requests.values():
            queue.put_nowait(failure)
        self._writer.close()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def close(self) -> None:
        self._lose(StageLost(f"connection to {self.label} closed by the client"))
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _token_tensor(ids: Sequence[int]) -> Tensor:
    return Tensor("int32", (1, len(ids)), np.asarray(ids, dtype="<i4").tobytes())


def _raise_if_error(item: Frame | Exception) -> Frame:
    if isinstance(item, Exception):
        raise item
    if item.kind is Kind.ERROR:
        try:
            report = ErrorReport.model_validate(item.meta)
        except ValueError:
            raise RouteError(f"stage {item.stage} failed without a readable report") from None
        kind = StageLost if report.next_stage_lost else StagesBusy if report.busy else RouteError
        raise kind(f"{report.stage}: {report.message}")
    return item


class PipelineClient:
    """Sends requests through stage routes; reuse one per process and `aclose()` it at the end."""

    def __init__(
        self,
        *,
        prefill_chunk: int = PREFILL_CHUNK,
        prefill_window: int = 2,
        connect_timeout_s: float = 3.0,
        heartbeat_interval_s: float = 0.5,
        dead_after_s: float = 2.5,
        idle_timeout_s: float = 60.0,
        token: str | None = None,
        tls: DataPathTLS | None = None,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: must be at least 1, got {prefill_chunk}")
        if prefill_window < 1:
            raise ValueError(f"prefill_window: must be at least 1, got {prefill_window}")
        if idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s: must be positive, got {idle_timeout_s}")
        self.prefill_chunk = prefill_chunk
        self.prefill_window = prefill_window
        self.idle_timeout_s = idle_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._dead_after_s = dead_after_s
        self._token = token  # sent in a HELLO on every new stage connection
        self._tls = tls  # TLS towards non-loopback stages (reconciler.datapath.wire.DataPathTLS)
        self.hop_observer: Callable[[float], None] | None = None  # seconds per network hop (metrics)
        self._connections: dict[tuple[str, int], _StageConnection] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}

    async def _connection(self, address: StageAddress) -> _StageConnection:
        key = (address.host, address.port)
        async with self._locks.setdefault(key, asyncio.Lock()):
            conn = self._connections.get(key)
            if conn is not None and conn.failure is None:
                return conn
            try:
                reader, writer = await open_connection(address.host, address.port, timeout_s=self._connect_timeout_s,
                                                       tls=self._tls)
                if self._token is not None:
                    write_frame(writer, hello_frame(self._token))
            except (OSError, asyncio.TimeoutError) as exc:
                raise StageLost(f"cannot reach stage {address}: {exc or 'timed out'}") from None
            conn = _StageConnection(
                host=address.host, port=address.port, reader=reader, writer=writer,
                heartbeat_interval_s=self._heartbeat_interval_s, dead_after_s=self._dead_after_s,
                hop_observer=self.hop_observer,
            )  # fmt: skip
            self._connections[key] = conn
            return conn

    async def generate(
        self,
        route: Sequence[StageAddress],
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: Iterable[int] = (),
        sampling: SamplingParams | None = None,
    ) -> AsyncIterator[int]:
        """Yield sampled token ids (a stop id ends the stream and is not yielded). Closing the
        iterator early (`aclose()`, or leaving `async with contextlib.aclosing(...)`) frees the
        request on every stage."""
        if not route:
            raise ValueError("route: must name at least one stage")
        if not prompt_ids:
            raise ValueError("prompt_ids: must hold at least one token")
        if max_tokens < 0:
            raise ValueError(f"max_tokens: must be >= 0, got {max_tokens}")
        if sampling is None:  # the whole set (penalties, bias, filters) replaces the three fields
            sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
        if sampling.seed is None:
            sampling = sampling.model_copy(update={"seed": secrets.randbits(62)})
        stops = frozenset(stop_ids)
        ids = [int(t) for t in prompt_ids]
        if max_tokens == 0:
            return
        request_id = secrets.randbits(63) + 1
        queue: asyncio.Queue[Frame | Exception] = asyncio.Queue()
        conns: list[_StageConnection] = []
        try:
            await self._open(route, request_id, queue, conns, sampling=sampling)
            entry, position, in_flight = conns[0], 0, 0
            while len(ids) - position > 1:  # same chunking as mlx_lm.generate_step
                while in_flight >= self.prefill_window:
                    frame = await self._next(queue, route, f"prefill up to position {position}")
                    if frame.kind is not Kind.ACK:
                        raise RouteError(f"stage {frame.stage} sent {frame.kind.name} during prefill")
                    in_flight -= 1
                n = min(self.prefill_chunk, len(ids) - position - 1)
                entry.send(Frame(Kind.FORWARD, request_id, position=position, tensor=_token_tensor(ids[position : position + n])))
                position += n
                in_flight += 1
            entry.send(Frame(Kind.FORWARD, request_id, flags=FLAG_SAMPLE, position=position, tensor=_token_tensor(ids[position:])))
            position = len(ids)
            for produced in range(1, max_tokens + 1):
                frame = await self._next(queue, route, f"token {produced}")
                while frame.kind is Kind.ACK:  # the last prefill chunks, ahead of the first token
                    frame = await self._next(queue, route, f"token {produced}")
                if frame.kind is not Kind.TOKEN:
                    raise RouteError(f"stage {frame.stage} sent an unexpected {frame.kind.name} frame")
                if frame.token in stops:
                    return
                more = produced < max_tokens
                if more:  # the stages compute the next token while the caller handles this one
                    entry.send(Frame(Kind.FORWARD, request_id, flags=FLAG_SAMPLE, position=position,
                                     tensor=_token_tensor([frame.token])))
                    position += 1
                yield frame.token if frame.meta is None else Sampled.from_meta(frame.token, frame.meta)
                if not more:
                    return
        finally:
            for index, conn in enumerate(conns):
                conn.requests.pop(request_id, None)
                if conn.failure is None:
                    conn.send(Frame(Kind.END, request_id, stage=index))

    async def embed(self, route: Sequence[StageAddress], prompt_ids: Sequence[int]) -> list[float]:
        """The mean of the prompt's normed last hidden states, pooled at the last stage."""
        if not route or not prompt_ids:
            raise ValueError("route and prompt_ids: must not be empty")
        ids, request_id = [int(t) for t in prompt_ids], secrets.randbits(63) + 1
        queue: asyncio.Queue[Frame | Exception] = asyncio.Queue()
        conns: list[_StageConnection] = []
        try:
            await self._open(route, request_id, queue, conns, sampling=SamplingParams(seed=0), embed=True)
            position, in_flight = 0, 0
            while position < len(ids):
                while in_flight >= self.prefill_window:
                    frame = await self._next(queue, route, f"pooling up to position {position}")
                    if frame.kind is not Kind.ACK:
                        raise RouteError(f"stage {frame.stage} sent {frame.kind.name} while pooling")
                    in_flight -= 1
                n = min(self.prefill_chunk, len(ids) - position)
                last = position + n == len(ids)
                conns[0].send(Frame(Kind.FORWARD, request_id, flags=FLAG_SAMPLE if last else 0, position=position,
                                    tensor=_token_tensor(ids[position:position + n])))
                position, in_flight = position + n, in_flight + 1
            frame = await self._next(queue, route, "the pooled vector")
            while frame.kind is Kind.ACK:
                frame = await self._next(queue, route, "the pooled vector")
            if frame.kind is not Kind.VECTOR or frame.tensor is None or frame.tensor.dtype != "float32":
                raise RouteError(f"stage {frame.stage} sent {frame.kind.name} instead of a float32 vector")
            return memoryview(frame.tensor.data).cast("B").cast("f").tolist()
        finally:
            for index, conn in enumerate(conns):
                conn.requests.pop(request_id, None)
                if conn.failure is None:
                    conn.send(Frame(Kind.END, request_id, stage=index))

    async def _open(self, route: Sequence[StageAddress], request_id: int, queue: asyncio.Queue[Frame | Exception],
                    conns: list[_StageConnection], *, sampling: SamplingParams, embed: bool = False) -> None:
        """OPEN the request on every stage (``conns`` gets their connections) and wait for each."""
        for address in route:
            conn = await self._connection(address)
            conn.requests[request_id] = queue
            conns.append(conn)
        for index, (address, conn) in enumerate(zip(route, conns)):
            nxt = route[index + 1] if index + 1 < len(route) else None
            spec = OpenRequest(shard=address.shard, next=nxt, sampling=sampling, embed=embed)
            conn.send(Frame(Kind.OPEN, request_id, stage=index, meta=spec.model_dump(mode="json")))
        waiting = set(range(len(route)))
        while waiting:
            frame = await self._next(queue, route, "the stages to open the request")
            if frame.kind is Kind.OPENED:
                waiting.discard(frame.stage)

    async def _next(self, queue: asyncio.Queue[Frame | Exception], route: Sequence[StageAddress],
                    waiting_for: str) -> Frame:
        try:  # a timer on this task, not wait_for's extra task per frame (the per-token hot path)
            async with asyncio.timeout(self.idle_timeout_s):
                item = await queue.get()
        except TimeoutError:
            stages = " -> ".join(str(address) for address in route)
            raise RequestStalled(f"no progress for {self.idle_timeout_s:g} s waiting for {waiting_for} "
                                 f"(route {stages})") from None
        return _raise_if_error(item)

    async def aclose(self) -> None:
        conns = list(self._connections.values())
        self._connections.clear()
        await asyncio.gather(*(c.close() for c in conns))

    async def __aenter__(self) -> PipelineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
