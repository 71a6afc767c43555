"""The stage server: runs loaded shards for pipeline requests and passes hidden states on.

One asyncio TCP server per node hosts any number of shards (keyed by name). For each request
it keeps a KV cache, runs `forward` on the shard's compute thread, and sends the result to the
next stage over a persistent connection, or (last stage) samples and sends the token id back to
the request's origin. A request's state is dropped when the origin ends it, when the origin's
connection closes, or when its next hop is lost (the origin is told with an ERROR frame).

Memory is bounded per connection: a next hop whose unsent bytes would pass `max_buffered_bytes`
fails the request instead of buffering more (a stalled peer costs at most that, or one frame
when a single frame is larger), and a connection whose chunks wait for compute beyond the same
bound is not read until they drain, so a flooding peer meets TCP backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

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
    WireError,
    array_to_tensor,
    check_hello,
    frame_size,
    hello_frame,
    open_connection,
    read_frame,
    set_nodelay,
    tensor_to_array,
    write_frame,
)
from reconciler.datapath.batcher import (DEFAULT_MAX_BATCH_SIZE, DecodeBatch, DecodeBatches, Job, ShardBatcher,
                                         group_rows)
from reconciler.datapath.sampled import token_meta
from reconciler.datapath.sampling import RequestSampler
from reconciler.runtime.shard_model import ShardModel

log = logging.getLogger(__name__)

# Per connection: unsent bytes to a next hop, and received chunks waiting for compute (8 chunks
# of 512 rows of 8,192-wide bf16 hidden states).
DEFAULT_BUFFER_BOUND = 64 << 20
# Connections that have not said HELLO yet; each holds at most a header, 1 KiB of metadata and
# its stream buffer (128 KiB), for at most connect_timeout_s.
MAX_UNAUTHENTICATED = 64


class _Peer:
    """One TCP connection; writes are queued synchronously so frame order is preserved."""

    def __init__(self, writer: asyncio.StreamWriter, label: str) -> None:
        self.writer = writer
        self.label = label
        self.closed = False
        self.pending_bytes = 0  # received FORWARD bytes not yet through compute
        self.room = asyncio.Event()  # set while pending_bytes is within the bound
        self.room.set()

    def send(self, frame: Frame) -> bool:
        if self.closed or self.writer.is_closing():
            return False
        write_frame(self.writer, frame)
        return True

    def unsent_bytes(self) -> int:
        transport = self.writer.transport
        return 0 if transport is None or transport.is_closing() else transport.get_write_buffer_size()

    def close(self) -> None:
        self.closed = True
        self.writer.close()


@dataclass(eq=False)
class _Request:
    request_id: int
    stage: int
    shard_name: str
    shard: ShardModel
    origin: _Peer
    next_hop: _Peer | None
    sampling: SamplingParams
    sampler: RequestSampler  # built when the request is opened
    cache: list[Any] | None = None
    batch: DecodeBatch | None = None  # while its cache is merged into the shard's decode batch
    offset: int = 0
    ended: bool = False
    embed: bool = False  # (last stage) pool the normed hidden states instead of sampling
    pooled: mx.array | None = None  # their float32 sum over the chunks so far

    @property
    def key(self) -> tuple[int, int]:
        return (self.request_id, self.stage)


class StageError(RuntimeError):
    """A request cannot go on at this stage (reported to the origin, never raised to the loop)."""


def _check(request: _Request, frame: Frame) -> None:
    if frame.tensor is None:
        raise StageError("FORWARD frame carries no tensor")
    if frame.position != request.offset:
        raise StageError(f"chunk starts at position {frame.position}, but the cache holds {request.offset}")


def _compute(job: Job) -> Frame | None:
    """Runs on the shard's compute thread: one chunk of one request through this stage."""
    request, frame = job.request, job.frame
    if request.ended:
        return None
    _check(request, frame)
    shard = request.shard
    if request.batch is not None:  # it stepped in a batch before: its own cache comes back
        request.batch.release(request, keep_cache=True)
    if request.cache is None:
        request.cache = shard.make_cache()
    x = tensor_to_array(frame.tensor)
    if request.embed and shard.is_last:
        return _pool(request, frame, shard.forward(x, cache=request.cache, hidden=True))
    out = shard.forward(x, cache=request.cache)
    request.offset += x.shape[1]
    if not shard.is_last:
        return _hidden(request, frame, out)
    if not frame.flags & FLAG_SAMPLE:
        mx.eval([c.state for c in request.cache])  # prefill: the logits are never computed
        return Frame(Kind.ACK, request.request_id, stage=request.stage, position=request.offset)
    return _sample(request, out[:, -1, :])


def _compute_rows(batches: DecodeBatches, jobs: list[Job]) -> list[Frame | None | Exception]:
    """Runs on the compute thread: the single-token chunks of several requests as one forward."""
    outcomes: list[Frame | None | Exception] = [None] * len(jobs)
    rows: list[int] = []
    for index, job in enumerate(jobs):
        if job.request.ended:
            continue
        try:
            _check(job.request, job.frame)
        except StageError as exc:
            outcomes[index] = exc
            continue
        rows.append(index)
    if len(rows) < 2:
        for index in rows:
            outcomes[index] = _outcome(_compute, jobs[index])
        return outcomes
    requests = [jobs[i].request for i in rows]
    shard, batch = batches.shard, batches.for_rows(requests)
    try:
        caches = batch.arrange(requests)
        x = mx.concatenate([tensor_to_array(jobs[i].frame.tensor) for i in rows], axis=0)
        out = shard.forward(x, cache=caches)
        if shard.is_last:
            out = out[:, -1, :]
        mx.eval([out] + [c.state for c in caches])
    except Exception as exc:  # the merged caches are in an unknown state: every row fails
        batch.drop()
        for index in rows:
            outcomes[index] = exc
        return outcomes
    for row, index in enumerate(rows):
        request, frame = jobs[index].request, jobs[index].frame
        request.offset += 1
        if not shard.is_last:
            outcomes[index] = _hidden(request, frame, out[row : row + 1])
        elif frame.flags & FLAG_SAMPLE:
            outcomes[index] = _outcome(_sample, request, out[row : row + 1])
        else:
            outcomes[index] = Frame(Kind.ACK, request.request_id, stage=request.stage, position=request.offset)
    return outcomes


def _outcome(fn: Any, *args: Any) -> Frame | None | Exception:
    try:
        return fn(*args)
    except Exception as exc:  # reported to that request's origin only
        return exc


def _hidden(request: _Request, frame: Frame, out: mx.array) -> Frame:
    return Frame(
        Kind.FORWARD, request.request_id, stage=request.stage + 1, flags=frame.flags,
        position=frame.position, tensor=array_to_tensor(out),
    )  # fmt: skip


def _pool(request: _Request, frame: Frame, hidden: mx.array) -> Frame:
    """An embedding request's chunk: its normed hidden states (1, L, D) added to the sum; the last
    chunk answers the mean over the prompt (float32) instead of a token."""
    total = hidden.astype(mx.float32).sum(axis=1)
    request.pooled = total if request.pooled is None else request.pooled + total
    request.offset += hidden.shape[1]
    mx.eval([request.pooled] + [c.state for c in request.cache])
    if not frame.flags & FLAG_SAMPLE:
        return Frame(Kind.ACK, request.request_id, stage=request.stage, position=request.offset)
    mean = request.pooled / request.offset
    return Frame(Kind.VECTOR, request.request_id, stage=request.stage, tensor=array_to_tensor(mean))


def _sample(request: _Request, logits: mx.array) -> Frame:
    """The request's next token from its last position's logits (1, vocabulary), by its own rules."""
    token = request.sampler(logits)
    return Frame(Kind.TOKEN, request.request_id, stage=request.stage, token=token, meta=token_meta(token))


def _release(request: _Request) -> None:
    """Runs on the compute thread after any queued chunk of the request: frees its KV cache."""
    if request.batch is not None:
        request.batch.release(request, keep_cache=False)
    request.cache = None


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed while the compute thread finished
        loop.call_soon_threadsafe(fn, *args)


class StageServer:
    """Hosts loaded shards behind one TCP port. Start with `await start()`, stop with `stop()`."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, connect_timeout_s: float = 3.0,
                 token: str | None = None, max_buffered_bytes: int = DEFAULT_BUFFER_BOUND,
                 tls: DataPathTLS | None = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 weights: Any = None) -> None:
        if max_buffered_bytes < 1:
            raise ValueError(f"max_buffered_bytes: must be positive, got {max_buffered_bytes}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be at least 1, got {max_batch_size}")
        self.host = host
        self.max_buffered_bytes = max_buffered_bytes
        self.max_batch_size = max_batch_size  # requests whose decode steps run as one forward
        # Called per compute step: (shard, rows in the step, queue wait of each row in seconds).
        self.step_observer: Callable[[str, int, list[float]], None] | None = None
        self._batchers: dict[str, ShardBatcher] = {}
        self._batch_limits: dict[str, int] = {}  # shard -> its own max batch size (spec), if set
        self._token = token  # when set, every connection must open with a HELLO carrying it
        self._tls = tls  # when set, the port accepts TLS only (and links use it off loopback)
        self.weights = weights  # a reconciler.weights.peer.WeightServer: answers WEIGHTS_GET frames
        self._port = port
        self._connect_timeout_s = connect_timeout_s
        self._shards: dict[str, ShardModel] = {}
        self._request_limits: dict[str, int] = {}  # shard -> requests its reserved KV cache holds
        self._requests: dict[tuple[int, int], _Request] = {}
        self._unreleased: set[_Request] = set()  # opened, and their KV cache not yet released
        self._links: dict[tuple[str, int], _Peer] = {}
        self._link_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._peers: set[_Peer] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # next-hop watchers
        self._handlers: set[asyncio.Task[None]] = set()  # accepted connections
        self._greeting = 0  # connections waiting for their HELLO
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, ssl=self._tls.server if self._tls else None,
            ssl_handshake_timeout=self._connect_timeout_s if self._tls else None)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for request in list(self._requests.values()):
            self._fail(request, f"the stage server at {self.host}:{self._port} is shutting down",
                       next_stage_lost=True)  # the origin learns why (as StageLost)
        for peer in list(self._peers) + list(self._links.values()):
            peer.close()  # their readers see EOF and finish on their own
        if pending := self._handlers | self._tasks:
            await asyncio.wait(pending, timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> StageServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    def address(self, shard: str) -> StageAddress:
        """The route entry that reaches `shard` on this server."""
        return StageAddress(host=self.host, port=self._port, shard=shard)

    # -- shards ----------------------------------------------------------------------------

    def add_shard(self, name: str, shard: ShardModel, *, max_requests: int | None = None,
                  max_batch_size: int | None = None) -> None:
        """Serve ``shard`` as ``name``; with ``max_requests``, an OPEN beyond that many requests at
        once is refused as busy (the KV cache the plan reserved holds that many). ``max_batch_size``
        (default: the server's) bounds the requests whose decode steps run as one forward."""
        if name in self._shards:
            raise ValueError(f"shard {name!r} is already served here")
        self._shards[name] = shard
        self.set_request_limit(name, max_requests)
        self.set_batch_limit(name, max_batch_size)

    def set_batch_limit(self, name: str, max_batch_size: int | None) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be at least 1, got {max_batch_size}")
        if max_batch_size is None:
            self._batch_limits.pop(name, None)
        else:
            self._batch_limits[name] = max_batch_size
        if (batcher := self._batchers.get(name)) is not None:
            batcher.max_batch_size = self.batch_limit(name) if batcher.batches is not None else 1

    def batch_limit(self, name: str) -> int:
        return self._batch_limits.get(name, self.max_batch_size)

    def set_request_limit(self, name: str, max_requests: int | None) -> None:
        if max_requests is None:
            self._request_limits.pop(name, None)
        else:
            self._request_limits[name] = max_requests

    def remove_shard(self, name: str) -> ShardModel:
        """Stop serving `name`; its requests fail at their origins. The caller closes the shard."""
        shard = self._shards.pop(name)
        self._request_limits.pop(name, None)
        self._batch_limits.pop(name, None)
        for request in [r for r in self._requests.values() if r.shard_name == name]:
            self._fail(request, f"shard {name!r} was unloaded")
        self._batchers.pop(name, None)
        return shard

    def shard_names(self) -> list[str]:
        return sorted(self._shards)

    def active_requests(self, shard: str | None = None) -> int:
        return sum(1 for r in self._requests.values() if shard is None or r.shard_name == shard)

    def requests_per_shard(self) -> dict[str, int]:
        """Open requests of every served shard (the in-flight gauge per stage)."""
        counts = dict.fromkeys(self._shards, 0)
        for request in list(self._requests.values()):
            if request.shard_name in counts:
                counts[request.shard_name] += 1
        return counts

    def kv_caches(self) -> int:
        """KV caches still held in memory (a request's cache lives until its release has run)."""
        return sum(1 for r in list(self._unreleased) if r.cache is not None or r.batch is not None)

    def buffered_bytes(self) -> int:
        """Bytes held for peers right now: unsent to next hops, and received chunks not computed."""
        links = sum(link.unsent_bytes() for link in list(self._links.values()))
        return links + sum(peer.pending_bytes for peer in list(self._peers))

    @staticmethod
    def mlx_active_memory() -> int:
        """MLX's process-wide count of bytes in live arrays (weights, KV caches, activations)."""
        return int(mx.get_active_memory())

    # -- connections -----------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        set_nodelay(writer)
        host, port = writer.get_extra_info("peername")[:2]
        peer = _Peer(writer, f"{host}:{port}")
        self._peers.add(peer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            if self._token is not None:
                if self._greeting >= MAX_UNAUTHENTICATED:
                    raise WireError(f"{self._greeting} connections are already waiting to say HELLO")
                self._greeting += 1
                try:
                    await check_hello(reader, token=self._token, timeout_s=self._connect_timeout_s)
                finally:
                    self._greeting -= 1
            while True:
                await self._dispatch(peer, await read_frame(reader))
                await peer.room.wait()  # stop reading while its chunks wait for compute
        except ConnectionClosed:
            pass
        except (WireError, OSError) as exc:
            log.warning("stage %s: dropping connection from %s: %s", self._port, peer.label, exc)
        except Exception:  # a bug must cost one connection, never the node
            log.exception("stage %s: dropping connection from %s", self._port, peer.label)
        finally:
            self._peers.discard(peer)
            for request in [r for r in self._requests.values() if r.origin is peer]:
                self._end(request)
            peer.close()

    async def _link(self, address: StageAddress) -> _Peer:
        """The persistent connection to a next stage (opened on first use)."""
        key = (address.host, address.port)
        async with self._link_locks.setdefault(key, asyncio.Lock()):
            link = self._links.get(key)
            if link is not None and not link.closed:
                return link
            reader, writer = await open_connection(address.host, address.port, timeout_s=self._connect_timeout_s,
                                                   tls=self._tls)
            if self._token is not None:
                write_frame(writer, hello_frame(self._token))
            link = _Peer(writer, f"{address.host}:{address.port}")
            self._links[key] = link
            self._spawn(self._watch_link(key, link, reader), name=f"stage-link-{address.host}:{address.port}")
            return link

    async def _watch_link(self, key: tuple[str, int], link: _Peer, reader: asyncio.StreamReader) -> None:
        """Next stages never write back; reading only notices the connection going away."""
        with contextlib.suppress(ConnectionClosed, WireError, OSError):
            while True:
                await read_frame(reader)
        link.close()
        if self._links.get(key) is link:
            del self._links[key]
        for request in [r for r in self._requests.values() if r.next_hop is link]:
            self._fail(request, f"lost the connection to the next stage at {link.label}", next_stage_lost=True)

    # -- protocol --------------------------------------------------------------------------

    async def _dispatch(self, peer: _Peer, frame: Frame) -> None:
        if frame.kind is Kind.FORWARD:
            self._forward(peer, frame)
        elif frame.kind is Kind.OPEN:
            await self._open(peer, frame)
        elif frame.kind is Kind.END:
            request = self._requests.get((frame.request_id, frame.stage))
            if request is not None:
                self._end(request)
        elif frame.kind is Kind.PING:
            peer.send(Frame(Kind.PONG, frame.request_id))
        elif frame.kind is Kind.WEIGHTS_GET and self.weights is not None:
            await self.weights.serve(frame, send=peer.send, drain=peer.writer.drain)
        else:
            raise WireError(f"a stage does not accept {frame.kind.name} frames")

    async def _open(self, peer: _Peer, frame: Frame) -> None:
        def refuse(message: str, *, busy: bool = False) -> None:
            report = ErrorReport(stage=f"stage {frame.stage} on port {self._port}", message=message, busy=busy)
            peer.send(Frame(Kind.ERROR, frame.request_id, stage=frame.stage, meta=report.model_dump()))

        try:
            spec = OpenRequest.model_validate(frame.meta)
        except ValueError as exc:
            return refuse(f"invalid OPEN metadata: {exc}")
        shard = self._shards.get(spec.shard)
        if shard is None:
            return refuse(f"shard {spec.shard!r} is not served here (serving {sorted(self._shards)})")
        if (spec.next is None) != shard.is_last:
            where = "has no next stage" if spec.next is None else f"continues to {spec.next}"
            return refuse(f"shard {spec.shard!r} holds layers [{shard.start}, {shard.end}) of "
                          f"{shard.num_layers}, but the route {where}")  # fmt: skip
        if spec.embed and shard.is_last and not getattr(shard, "pools_hidden_states", False):
            return refuse(f"shard {spec.shard!r} cannot pool hidden states for an embedding request "
                          f"(a tensor-parallel stage answers logits only)")
        limit = self._request_limits.get(spec.shard)
        if limit is not None and (frame.request_id, frame.stage) not in self._requests \
                and self.active_requests(spec.shard) >= limit:
            return refuse(f"shard {spec.shard!r} already runs {limit} requests, all it reserved KV cache for",
                          busy=True)
        link = None
        if spec.next is not None:
            try:
                link = await self._link(spec.next)
            except (OSError, asyncio.TimeoutError) as exc:
                return refuse(f"cannot reach the next stage {spec.next}: {exc or 'timed out'}")
        request = _Request(
            request_id=frame.request_id, stage=frame.stage, shard_name=spec.shard, shard=shard,
            origin=peer, next_hop=link, sampling=spec.sampling,
            sampler=RequestSampler(spec.sampling, model_dir=shard.path), embed=spec.embed,
        )  # fmt: skip
        old = self._requests.get(request.key)
        if old is not None:
            self._end(old)
        self._requests[request.key] = request
        self._unreleased.add(request)
        peer.send(Frame(Kind.OPENED, frame.request_id, stage=frame.stage))

    def _batcher(self, name: str, shard: ShardModel) -> ShardBatcher:
        """The shard's queue of chunks waiting for compute (made on first use, on the loop)."""
        batcher = self._batchers.get(name)
        if batcher is None:
            assert self._loop is not None
            # The capability B's and any other shard can rely on: no `supports_batching`, no batches.
            batched = bool(getattr(shard, "supports_batching", False))
            observer = self.step_observer
            batcher = ShardBatcher(
                loop=self._loop, submit=shard.compute.submit, run_one=_compute,
                run_rows=_compute_rows if batched else None, batches=DecodeBatches(shard) if batched else None,
                deliver=self._deliver, max_batch_size=self.batch_limit(name),
                observe=None if observer is None else lambda rows, waits: observer(name, rows, waits),
                row_limit=None if shard.is_last else lambda limit: min(limit, group_rows(self.active_requests(name))),
            )  # fmt: skip
            self._batchers[name] = batcher
        return batcher

    def waiting_chunks(self, shard: str) -> int:
        """Chunks of ``shard`` received and waiting for its compute thread."""
        batcher = self._batchers.get(shard)
        return 0 if batcher is None else batcher.waiting

    def _forward(self, peer: _Peer, frame: Frame) -> None:
        request = self._requests.get((frame.request_id, frame.stage))
        if request is None:
            return  # ended or cancelled while this chunk was in flight
        size = len(frame.tensor.data) if frame.tensor is not None else 0
        peer.pending_bytes += size
        if peer.pending_bytes > self.max_buffered_bytes:
            peer.room.clear()
        # One step at a time per shard, each request's chunks in order: they reach the next hop in order.
        self._batcher(request.shard_name, request.shard).add(Job(request, frame, peer, size))

    def _refund(self, job: Job) -> None:
        source = job.source
        source.pending_bytes -= job.size
        if source.pending_bytes <= self.max_buffered_bytes:
            source.room.set()

    def _deliver(self, job: Job, out: Frame | None | BaseException) -> None:
        self._refund(job)
        request = job.request
        if request.ended or out is None:
            return
        if isinstance(out, BaseException):
            if isinstance(out, RuntimeError) and request.shard.compute.closing.is_set():
                return self._fail(request, f"shard {request.shard_name!r} was unloaded")
            if not isinstance(out, StageError):
                log.error("stage %s: request %x failed", self._port, request.request_id, exc_info=out)
            return self._fail(request, f"{type(out).__name__}: {out}")
        if out.kind is not Kind.FORWARD:  # TOKEN, VECTOR or ACK, to the origin
            request.origin.send(out)
            return
        target = request.next_hop
        if target is None or target.closed:
            return self._fail(request, "the connection to the next stage is closed", next_stage_lost=True)
        unsent, out_size = target.unsent_bytes(), frame_size(out)
        if unsent and unsent + out_size > self.max_buffered_bytes:
            return self._fail(request, f"the next stage at {target.label} is not reading: {unsent} bytes wait to be "
                                       f"sent to it, and {out_size} more would pass the bound of "
                                       f"{self.max_buffered_bytes} bytes")
        if not target.send(out):
            self._fail(request, "the connection to the next stage is closed", next_stage_lost=True)

    def _end(self, request: _Request) -> None:
        request.ended = True
        if self._requests.get(request.key) is request:
            del self._requests[request.key]
        batcher = self._batchers.get(request.shard_name)
        for job in batcher.drop(request) if batcher is not None else ():
            self._refund(job)
        loop = self._loop
        try:
            released = request.shard.compute.submit(_release, request)
        except RuntimeError:  # the compute thread is already shut down
            self._unreleased.discard(request)
            return
        if loop is not None:
            released.add_done_callback(lambda _: _call_soon(loop, self._unreleased.discard, request))

    def _fail(self, request: _Request, message: str, *, next_stage_lost: bool = False) -> None:
        self._end(request)
        report = ErrorReport(
            stage=f"{request.shard_name} (stage {request.stage}, port {self._port})",
            message=message,
            next_stage_lost=next_stage_lost,
        )
        request.origin.send(Frame(Kind.ERROR, request.request_id, stage=request.stage, meta=report.model_dump()))
