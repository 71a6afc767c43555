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
import concurrent.futures
import contextlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from reconciler.datapath.wire import (
    FLAG_SAMPLE,
    ConnectionClosed,
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
    offset: int = 0
    ended: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.request_id, self.stage)


class StageError(RuntimeError):
    """A request cannot go on at this stage (reported to the origin, never raised to the loop)."""


class RequestSampler:
    """mlx-lm's sampling for one request, with the request's own random key.

    mlx_lm.sample_utils.make_sampler draws from mlx's global random state (its
    ``categorical_sampling`` is compiled over ``mx.random.state``, which mlx lets one reseed with an
    int but never set to a key), so requests sharing a process would share one stream and a seeded
    request would depend on the others. So this chains mlx-lm's own filters as make_sampler does
    (``apply_top_p``) and draws ``categorical(logprobs / temp)`` with a key split off the
    request's: the same tokens as make_sampler after ``mx.random.seed(seed)``."""

    def __init__(self, params: SamplingParams) -> None:
        self.temperature = params.temperature
        self._filters: list[Any] = []
        # An OPEN without a seed (the pipeline client always sends one) draws its own.
        self._seed = secrets.randbits(62) if params.seed is None else params.seed
        self._key: Any = None  # made on the compute thread, at the first draw (MLX streams are per thread)
        if self.temperature == 0:
            return
        # Not at module level (mlx_lm takes seconds to import); loading a shard imported it already.
        from mlx_lm.sample_utils import apply_top_p

        if 0 < params.top_p < 1.0:
            self._filters.append(lambda logprobs: apply_top_p(logprobs, params.top_p))

    def __call__(self, logprobs: mx.array) -> int:
        if self.temperature == 0:
            return int(mx.argmax(logprobs, axis=-1).item())
        for apply in self._filters:
            logprobs = apply(logprobs)
        self._key, draw = mx.random.split(self._key if self._key is not None else mx.random.key(self._seed))
        return int(mx.random.categorical(logprobs * (1.0 / self.temperature), key=draw).item())


def _compute(request: _Request, frame: Frame) -> Frame | None:
    """Runs on the shard's compute thread: one chunk through this stage."""
    if request.ended:
        return None
    if frame.tensor is None:
        raise StageError("FORWARD frame carries no tensor")
    if frame.position != request.offset:
        raise StageError(f"chunk starts at position {frame.position}, but the cache holds {request.offset}")
    shard = request.shard
    if request.cache is None:
        request.cache = shard.make_cache()
    x = tensor_to_array(frame.tensor)
    out = shard.forward(x, cache=request.cache)
    request.offset += x.shape[1]
    if not shard.is_last:
        return Frame(
            Kind.FORWARD, request.request_id, stage=request.stage + 1, flags=frame.flags,
            position=frame.position, tensor=array_to_tensor(out),
        )  # fmt: skip
    if not frame.flags & FLAG_SAMPLE:
        mx.eval([c.state for c in request.cache])  # prefill: the logits are never computed
        return Frame(Kind.ACK, request.request_id, stage=request.stage, position=request.offset)
    logits = out[:, -1, :]
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    return Frame(Kind.TOKEN, request.request_id, stage=request.stage, token=request.sampler(logprobs))


def _release(request: _Request) -> None:
    """Runs on the compute thread after any queued chunk of the request: frees its KV cache."""
    request.cache = None


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed while the compute thread finished
        loop.call_soon_threadsafe(fn, *args)


class StageServer:
    """Hosts loaded shards behind one TCP port. Start with `await start()`, stop with `stop()`."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, connect_timeout_s: float = 3.0,
                 token: str | None = None, max_buffered_bytes: int = DEFAULT_BUFFER_BOUND) -> None:
        if max_buffered_bytes < 1:
            raise ValueError(f"max_buffered_bytes: must be positive, got {max_buffered_bytes}")
        self.host = host
        self.max_buffered_bytes = max_buffered_bytes
        self._token = token  # when set, every connection must open with a HELLO carrying it
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
        self._server = await asyncio.start_server(self._serve, self.host, self._port)
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

    def add_shard(self, name: str, shard: ShardModel, *, max_requests: int | None = None) -> None:
        """Serve ``shard`` as ``name``; with ``max_requests``, an OPEN beyond that many requests at
        once is refused as busy (the KV cache the plan reserved holds that many)."""
        if name in self._shards:
            raise ValueError(f"shard {name!r} is already served here")
        self._shards[name] = shard
        self.set_request_limit(name, max_requests)

    def set_request_limit(self, name: str, max_requests: int | None) -> None:
        if max_requests is None:
            self._request_limits.pop(name, None)
        else:
            self._request_limits[name] = max_requests

    def remove_shard(self, name: str) -> ShardModel:
        """Stop serving `name`; its requests fail at their origins. The caller closes the shard."""
        shard = self._shards.pop(name)
        self._request_limits.pop(name, None)
        for request in [r for r in self._requests.values() if r.shard_name == name]:
            self._fail(request, f"shard {name!r} was unloaded")
        return shard

    def shard_names(self) -> list[str]:
        return sorted(self._shards)

    def active_requests(self, shard: str | None = None) -> int:
        return sum(1 for r in self._requests.values() if shard is None or r.shard_name == shard)

    def kv_caches(self) -> int:
        """KV caches still held in memory (a request's cache lives until its release has run)."""
        return sum(1 for r in list(self._unreleased) if r.cache is not None)

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
            reader, writer = await open_connection(address.host, address.port, timeout_s=self._connect_timeout_s)
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
            sampler=RequestSampler(spec.sampling),
        )  # fmt: skip
        old = self._requests.get(request.key)
        if old is not None:
            self._end(old)
        self._requests[request.key] = request
        self._unreleased.add(request)
        peer.send(Frame(Kind.OPENED, frame.request_id, stage=frame.stage))

    def _forward(self, peer: _Peer, frame: Frame) -> None:
        request = self._requests.get((frame.request_id, frame.stage))
        if request is None:
            return  # ended or cancelled while this chunk was in flight
        loop = self._loop
        assert loop is not None
        size = len(frame.tensor.data) if frame.tensor is not None else 0
        try:
            future = request.shard.compute.submit(_compute, request, frame)
        except RuntimeError:  # the shard's compute thread is shut down (it is being unloaded)
            return self._fail(request, f"shard {request.shard_name!r} was unloaded")
        peer.pending_bytes += size
        if peer.pending_bytes > self.max_buffered_bytes:
            peer.room.clear()
        # Done-callbacks fire on the compute thread in completion (= submission) order, so the
        # frames of one request reach the next hop in order.
        future.add_done_callback(lambda f: _call_soon(loop, self._deliver, request, f, peer, size))

    def _deliver(self, request: _Request, future: concurrent.futures.Future[Frame | None],
                 source: _Peer, size: int) -> None:
        source.pending_bytes -= size
        if source.pending_bytes <= self.max_buffered_bytes:
            source.room.set()
        if request.ended or future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            if not isinstance(exc, StageError):
                log.exception("stage %s: request %x failed", self._port, request.request_id, exc_info=exc)
            return self._fail(request, f"{type(exc).__name__}: {exc}")
        out = future.result()
        if out is None:
            return
        if out.kind is not Kind.FORWARD:  # TOKEN or ACK, to the origin
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
