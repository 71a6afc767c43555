"""Weights over the data port: the server side (``WeightServer``, answering WEIGHTS_GET frames that
the StageServer hands it, for authenticated peers only) and the client side (``PeerClient``, one
reused connection per peer with a bound on requests in flight), plus finding the peers that hold
a model (Node objects whose status lists it in cachedModels).

Serving never starves inference: at most ``max_concurrent`` ranges are read at once (off the event
loop), a token bucket bounds the bytes per second, and a connection's requests wait (its reading
stops) while every slot is taken.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.datapath.wire import (
    ConnectionClosed,
    DataPathTLS,
    Frame,
    Kind,
    Tensor,
    WireError,
    hello_frame,
    open_connection,
    read_frame,
    write_frame,
)
from reconciler.models.metadata import ModelMetadataError, read_safetensors_header, safetensors_files
from reconciler.models.model_info import MODEL_INFO_KIND, ModelInfoSpec, Part, WeightFile, side_files
from reconciler.weights.fetch import MAX_CHUNK_BYTES, SourceFailed, SourceMissing
from reconciler.weights.store import CacheError, ModelCache, parse_parts

log = logging.getLogger(__name__)

FILE_RANGE = ""  # WEIGHTS_GET with this tensor name asks for a range of an original file (meta "file")


class TokenBucket:
    """At most ``burst + rate * t`` bytes in any ``t`` seconds. ``reserve(n)`` takes ``n`` bytes now
    (the bucket may go into debt) and says how long the caller waits before sending them."""

    def __init__(self, *, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate: must be positive bytes per second, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate / 4, 1.0))
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def reserve(self, n: int) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclass(frozen=True)
class _Located:
    path: Path
    offset: int  # absolute, in the file
    size: int


class WeightServer:
    """Serves byte ranges of the tensors this node holds (its cache, or an original copy) to
    authenticated data-port peers. ``originals(name)`` is the directory of the original copy of
    the model with that ModelInfo name on this node, or None."""

    def __init__(self, *, cache: ModelCache, originals: Callable[[str], Path | None], store: Any,
                 rate_bytes_per_s: float | None, max_concurrent: int = 2, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent: must be at least 1, got {max_concurrent}")
        self._cache = cache
        self._originals = originals
        self._store = store
        self._metrics = metrics
        self._slots = asyncio.Semaphore(max_concurrent)
        self._bucket = TokenBucket(rate=rate_bytes_per_s, clock=clock) if rate_bytes_per_s else None
        self._headers: dict[Path, tuple[int, dict[str, _Located]]] = {}  # original file -> (mtime, index)
        self._sizes: dict[str, tuple[str, dict[str, int]]] = {}  # model -> (ModelInfo version, tensor sizes)
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, frame: Frame, *, send: Callable[[Frame], bool], drain: Callable[[], Awaitable[None]]) -> None:
        """Answer one WEIGHTS_GET (returns once it is being read: the connection's next frame
        waits here while every slot is busy)."""
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(frame, send, drain), name=f"weights-serve-{frame.request_id:x}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def close(self) -> None:
        """Stop answering: ranges still being read or waiting on the rate limit are dropped."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _answer(self, frame: Frame, send: Callable[[Frame], bool], drain: Callable[[], Awaitable[None]]) -> None:
        def refuse(message: str, *, missing: bool) -> None:
            send(Frame(Kind.WEIGHTS_REFUSED, frame.request_id, meta={"message": message, "missing": missing}))

        meta = frame.meta if isinstance(frame.meta, dict) else {}
        model, tensor, offset, length = meta.get("model"), meta.get("tensor"), meta.get("offset"), meta.get("length")
        if not (isinstance(model, str) and isinstance(tensor, str) and type(offset) is int and type(length) is int):
            return refuse("WEIGHTS_GET needs meta {model: str, tensor: str, offset: int, length: int}", missing=False)
        if offset < 0 or not 0 <= length <= MAX_CHUNK_BYTES:
            return refuse(f"range [{offset}, {offset}+{length}): offset must be >= 0 and length at most "
                          f"{MAX_CHUNK_BYTES} bytes", missing=False)
        file = meta.get("file") if tensor == FILE_RANGE else None
        try:
            data = await asyncio.to_thread(self._read, model, tensor, offset, length, file)
        except (CacheError, ValueError) as exc:
            return refuse(str(exc), missing=False)
        except OSError as exc:
            return refuse(f"cannot read {model}/{tensor or file}: {exc}", missing=True)
        except Exception as exc:  # a bug costs this one request (answered), never the connection
            log.exception("weights: reading %s/%s failed", model, tensor or file)
            return refuse(f"cannot read {model}/{tensor or file}: {type(exc).__name__}: {exc}", missing=False)
        if data is None:
            return refuse(f"{model}: {tensor or file!r} is not held on this node", missing=True)
        if self._bucket is not None and (delay := self._bucket.reserve(len(data))) > 0:
            await asyncio.sleep(delay)
        if not send(Frame(Kind.WEIGHTS_DATA, frame.request_id, tensor=Tensor("uint8", (len(data),), data))):
            return
        with contextlib.suppress(ConnectionError):
            await drain()
        if self._metrics is not None:
            self._metrics.weights_served(len(data))

    # -- reading (on a worker thread) ------------------------------------------------------

    def _read(self, model: str, tensor: str, offset: int, length: int, file: Any) -> bytes | None:
        if tensor == FILE_RANGE:
            if not isinstance(file, str):
                raise ValueError("a WEIGHTS_GET for a file range needs meta \"file\"")
            data = self._cache.read_side_file(model, file, offset=offset, length=length)
        else:
            data = self._cache.read_tensor(model, tensor, offset=offset, length=length)
        if data is not None:
            return data
        directory = self._originals(model)
        if directory is None:
            return None
        if tensor == FILE_RANGE:
            return self._read_file(directory, file, offset, length)
        located = self._locate(directory, tensor)
        if located is None:
            return None
        expected = self._expected_size(model, tensor)
        if expected is not None and expected != located.size:
            raise CacheError(f"{model}: this node's copy of {tensor!r} has {located.size} bytes, the cluster's "
                             f"ModelInfo says {expected} (a different revision on disk?)")
        if offset + length > located.size:
            raise CacheError(f"{model}: {tensor!r} has {located.size} bytes; [{offset}, {offset + length}) is outside it")
        with open(located.path, "rb") as handle:
            handle.seek(located.offset + offset)
            data = handle.read(length)
        return data if len(data) == length else None

    def _read_file(self, directory: Path, name: str, offset: int, length: int) -> bytes | None:
        """A range of an original weight file or side file (never any other file of the directory)."""
        try:
            weights = safetensors_files(directory)
        except ModelMetadataError:
            weights = []
        files = {f.name: f for f in [*weights, *side_files(directory)]}
        if name not in files:
            return None
        with open(files[name], "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        return data if len(data) == length else None

    def _expected_size(self, model: str, tensor: str) -> int | None:
        """The tensor's size in the cluster's ModelInfo of ``model`` (read once per version of it)."""
        obj = self._store.get((MODEL_INFO_KIND, "", model)) if self._store is not None else None
        if obj is None:
            return None
        version = str(obj.get("metadata", {}).get("resourceVersion", ""))
        cached = self._sizes.get(model)
        if cached is None or cached[0] != version:
            try:
                info = ModelInfoSpec.model_validate(obj.get("spec", {}))
            except ValueError:
                return None
            cached = (version, {t: e.size for f in info.weightFiles for t, e in f.tensors.items()})
            self._sizes[model] = cached
        return cached[1].get(tensor)

    def _locate(self, directory: Path, tensor: str) -> _Located | None:
        try:
            files = safetensors_files(directory)
        except ModelMetadataError:
            return None
        for path in files:
            try:
                stamp = path.stat().st_mtime_ns
            except OSError:
                continue
            cached = self._headers.get(path)
            if cached is None or cached[0] != stamp:
                try:
                    header = read_safetensors_header(path)
                    with open(path, "rb") as handle:
                        base = 8 + int.from_bytes(handle.read(8), "little")
                    index = {name: _Located(path, base + int(e["data_offsets"][0]),
                                            int(e["data_offsets"][1]) - int(e["data_offsets"][0]))
                             for name, e in header.items() if name != "__metadata__"}
                except (OSError, ModelMetadataError, KeyError, TypeError, ValueError):
                    continue
                cached = (stamp, index)
                self._headers[path] = cached
            if tensor in cached[1]:
                return cached[1][tensor]
        return None


class PeerClient:
    """One connection to a peer's data port (opened on first use, re-opened after a loss), with at
    most ``in_flight`` requests outstanding on it."""

    def __init__(self, *, host: str, port: int, token: str | None, tls: DataPathTLS | None = None,
                 in_flight: int = 4, connect_timeout_s: float = 5.0, request_timeout_s: float = 120.0) -> None:
        self.host, self.port = host, port
        self._token = token
        self._tls = tls
        self._slots = asyncio.Semaphore(in_flight)
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._lock = asyncio.Lock()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._ids = itertools.count(1)

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"

    async def _connection(self) -> asyncio.StreamWriter:
        async with self._lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                reader, writer = await open_connection(self.host, self.port, timeout_s=self._connect_timeout_s,
                                                       tls=self._tls)
            except (OSError, asyncio.TimeoutError) as exc:
                raise SourceFailed(f"cannot connect to {self.label}: {exc or 'timed out'}") from None
            if self._token is not None:
                write_frame(writer, hello_frame(self._token))
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_replies(reader, writer),
                                                    name=f"weights-peer-{self.label}")
            return writer

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        why = "closed the connection"
        try:
            while True:
                frame = await read_frame(reader)
                waiter = self._pending.pop(frame.request_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
        except (ConnectionClosed, WireError, OSError) as exc:
            why = str(exc) or why
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            for request_id, waiter in list(self._pending.items()):
                if not waiter.done():
                    waiter.set_exception(SourceFailed(f"{self.label}: {why}"))
                self._pending.pop(request_id, None)

    async def read(self, *, model: str, tensor: str, offset: int, length: int, file: str | None = None) -> bytes:
        """The bytes of a tensor range (or, with ``tensor`` FILE_RANGE, of ``file``) from this peer."""
        async with self._slots:
            writer = await self._connection()
            request_id = next(self._ids)
            waiter: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
            self._pending[request_id] = waiter
            meta = {"model": model, "tensor": tensor, "offset": offset, "length": length}
            if file is not None:
                meta["file"] = file
            try:
                write_frame(writer, Frame(Kind.WEIGHTS_GET, request_id, meta=meta))
                frame = await asyncio.wait_for(waiter, self._request_timeout_s)
            except asyncio.TimeoutError:
                raise SourceFailed(f"{self.label}: no answer in {self._request_timeout_s:g} s") from None
            except OSError as exc:
                raise SourceFailed(f"{self.label}: {exc}") from None
            finally:
                self._pending.pop(request_id, None)
        if frame.kind is Kind.WEIGHTS_REFUSED:
            reply = frame.meta if isinstance(frame.meta, dict) else {}
            message = f"{self.label}: {reply.get('message', 'refused')}"
            raise SourceMissing(message) if reply.get("missing") else SourceFailed(message)
        if frame.kind is not Kind.WEIGHTS_DATA or frame.tensor is None:
            raise SourceFailed(f"{self.label}: answered {frame.kind.name} to a weights request")
        return bytes(frame.tensor.data)

    async def close(self) -> None:
        writer, task = self._writer, self._reader_task
        if writer is not None:
            writer.close()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 2.0)


@dataclass(frozen=True)
class PeerHolding:
    """A node that lists the model among its cachedModels."""

    node: str
    host: str
    port: int
    complete: bool
    parts: frozenset[Part]

    def holds(self, part: Part) -> bool:
        return self.complete or part in self.parts


def peers_holding(store: Any, *, model: str, exclude: str) -> list[PeerHolding]:
    """Nodes (other than ``exclude``) with a data port whose status lists ``model`` (a ModelInfo
    name), sorted by node name; a node listing the model twice (original + cache) counts once."""
    nodes, _ = store.list("Node")
    found: list[PeerHolding] = []
    for node in nodes:
        name = node.get("metadata", {}).get("name")
        spec, status = node.get("spec") or {}, node.get("status") or {}
        if not name or name == exclude or not spec.get("address") or not spec.get("dataPort"):
            continue
        entries = [m for m in status.get("cachedModels") or [] if isinstance(m, dict) and m.get("name") == model]
        if not entries:
            continue
        parts = frozenset().union(*(parse_parts([str(p) for p in m.get("parts") or []]) for m in entries))
        found.append(PeerHolding(node=name, host=str(spec["address"]), port=int(spec["dataPort"]),
                                 complete=any(m.get("complete") for m in entries), parts=parts))
    return sorted(found, key=lambda p: p.node)


class PeerSource:
    """A peer as a Fetcher source."""

    kind = "peer"

    def __init__(self, *, holding: PeerHolding, client: PeerClient, model: str) -> None:
        self.name = f"peer {holding.node} ({holding.host}:{holding.port})"
        self._holding = holding
        self._client = client
        self._model = model

    def holds(self, part: Part) -> bool:
        return self._holding.holds(part)

    async def read(self, *, file: WeightFile, tensor: str | None, offset: int, length: int) -> bytes:
        if tensor is None:  # a range of a whole file: an original weight file, or a side file
            return await self._client.read(model=self._model, tensor=FILE_RANGE, offset=offset, length=length,
                                           file=file.name)
        return await self._client.read(model=self._model, tensor=tensor, offset=offset, length=length)

    async def read_side_file(self, name: str, *, size: int) -> bytes:
        """A side file (config, tokenizer) whole, in ranges of at most MAX_CHUNK_BYTES."""
        pieces = [await self._client.read(model=self._model, tensor=FILE_RANGE, offset=at, file=name,
                                          length=min(MAX_CHUNK_BYTES, size - at))
                  for at in range(0, max(size, 1), MAX_CHUNK_BYTES)]
        return b"".join(pieces)
