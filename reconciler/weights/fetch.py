"""Fetching a stage's tensors: which byte ranges to ask for (pure planning), and a Fetcher that asks
an ordered list of sources (peers, then the hub) for them, verifies what comes back and fails over.

A range is at most ``MAX_CHUNK_BYTES``. Each tensor is asked of one source at a time; a source that
does not hold it ("missing") or whose connection fails hands the tensor's remaining ranges to the
next source, keeping the ranges already received. What arrives is checked: every range's exact
length; the tensor's sha256 when the ModelInfo knows it; a whole original file's sha256 when every
tensor of the file was fetched and a source can give its header. Bytes that fail a check are
refused (counted per source) and fetched again from a source that did not supply them.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from reconciler.models.metadata import num_layers_of, tensor_part
from reconciler.models.model_info import ModelInfoSpec, Part, WeightFile, stage_tensors

MAX_CHUNK_BYTES = 8 << 20


class SourceMissing(Exception):
    """The source does not hold what was asked (a peer without that tensor, a 404 from the hub)."""


class SourceFailed(Exception):
    """The source could not answer: connection lost, timed out, refused the request."""


class WeightsUnavailable(Exception):
    """No source supplied some tensors; the message names the parts, tensors and sources tried.
    ``fetched`` holds the tensors that did arrive (verified), so complete parts can be kept."""

    def __init__(self, message: str, *, fetched: dict[str, bytes] | None = None) -> None:
        super().__init__(message)
        self.fetched = fetched or {}


class WeightSource(Protocol):
    name: str  # for messages: "peer node-1 (10.0.0.2:7100)", "hub https://huggingface.co"
    kind: str  # the metrics label: "peer" or "hub"

    def holds(self, part: Part) -> bool: ...

    async def read(self, *, file: WeightFile, tensor: str | None, offset: int, length: int) -> bytes:
        """``length`` bytes of ``tensor`` from ``offset`` in it; with ``tensor`` None, of the file
        itself (only sources that hold original files answer that; others raise SourceMissing)."""
        ...

    async def read_side_file(self, name: str, *, size: int) -> bytes:
        """A side file (config, tokenizer) whole: ``size`` bytes, as the ModelInfo lists it."""
        ...


@dataclass(frozen=True)
class Chunk:
    file: str
    tensor: str
    offset: int  # in the tensor's bytes
    length: int


@dataclass(frozen=True)
class FetchProgress:
    done: int  # bytes fetched (and kept) so far
    total: int  # bytes to fetch
    rate: float  # bytes per second lately


def missing_parts(info: ModelInfoSpec, *, start: int, end: int, first: bool, last: bool,
                  held: set[Part]) -> dict[Part, list[str]]:
    """The parts a stage needs that are not held, each with its tensors (sorted)."""
    wanted: dict[Part, list[str]] = {}
    for tensor, part in stage_tensors(info, start=start, end=end, first=first, last=last).items():
        if part not in held:
            wanted.setdefault(part, []).append(tensor)
    return {part: sorted(tensors) for part, tensors in wanted.items()}


def chunks_of(file: str, tensor: str, size: int, *, max_chunk: int = MAX_CHUNK_BYTES) -> list[Chunk]:
    """A tensor's bytes as ranges of at most ``max_chunk`` (one empty range for an empty tensor)."""
    if size == 0:
        return [Chunk(file, tensor, 0, 0)]
    return [Chunk(file, tensor, at, min(max_chunk, size - at)) for at in range(0, size, max_chunk)]


def tensor_files(info: ModelInfoSpec) -> dict[str, WeightFile]:
    return {tensor: file for file in info.weightFiles for tensor in file.tensors}


def part_of(info: ModelInfoSpec, tensor: str) -> Part:
    part = tensor_part(tensor, num_layers=num_layers_of(info.config))
    return "head" if part is None else part  # type: ignore[return-value]


class RateMeter:
    """Bytes per second over the last ``window_s`` seconds (time from ``clock``)."""

    def __init__(self, *, clock: Callable[[], float], window_s: float = 5.0) -> None:
        self._clock = clock
        self._window_s = window_s
        self._started = clock()
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, n: int) -> None:
        self._samples.append((self._clock(), n))

    def rate(self) -> float:
        now = self._clock()
        while self._samples and self._samples[0][0] < now - self._window_s:
            self._samples.popleft()
        span = min(self._window_s, now - self._started)
        return sum(n for _, n in self._samples) / span if span > 0 else 0.0


class Fetcher:
    """Fetches tensors of ``info`` from ``sources`` (in order: peers are rotated per tensor by
    ``spread_key`` so fetching nodes spread over them; other sources keep their place after)."""

    def __init__(self, *, info: ModelInfoSpec, sources: list[WeightSource], parallel: int = 4, metrics: Any = None,
                 progress: Callable[[FetchProgress], None] | None = None, spread_key: str = "",
                 clock: Callable[[], float] = time.monotonic, max_chunk: int = MAX_CHUNK_BYTES) -> None:
        if parallel < 1:
            raise ValueError(f"parallel: must be at least 1, got {parallel}")
        self.info = info
        self.sources = list(sources)
        self._slots = asyncio.Semaphore(parallel)
        self._metrics = metrics
        self._progress = progress
        self._spread_key = spread_key
        self._max_chunk = max_chunk
        self._meter = RateMeter(clock=clock)
        self._files = tensor_files(info)
        self._dead: dict[str, str] = {}  # source -> why it failed (not asked again)
        self._reasons: dict[str, dict[str, str]] = {}  # tensor -> source -> why it did not supply it
        self._excluded: dict[str, set[str]] = {}  # tensor -> sources whose bytes for it were refused
        self._headers: dict[str, bytes] = {}  # original file -> its first 8 + headerLength bytes
        self._planned: set[str] = set()  # tensors whose bytes are already in total
        self.done = 0
        self.total = 0

    # -- order and bookkeeping -------------------------------------------------------------

    def order(self, tensor: str, part: Part) -> list[WeightSource]:
        peers = [s for s in self.sources if s.kind == "peer"]
        if peers:
            turn = zlib.crc32(f"{self._spread_key}/{tensor}".encode()) % len(peers)
            peers = peers[turn:] + peers[:turn]
        others = [s for s in self.sources if s.kind != "peer"]
        return [s for s in peers + others if s.holds(part)]

    def plan(self, tensors: Iterable[str]) -> None:
        """Count ``tensors`` in the progress total now, before later ``fetch`` calls ask for them."""
        for tensor in set(tensors) - self._planned:
            self._planned.add(tensor)
            self.total += self._files[tensor].tensors[tensor].size

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(FetchProgress(done=self.done, total=self.total, rate=self._meter.rate()))

    def _refuse(self, source: WeightSource, n: int) -> None:
        if self._metrics is not None:
            self._metrics.weights_refused(source.kind, n)

    # -- fetching --------------------------------------------------------------------------

    async def fetch(self, tensors: Iterable[str]) -> dict[str, bytes]:
        """Every tensor's verified bytes, or WeightsUnavailable naming what no source supplied."""
        wanted = sorted(set(tensors))
        if unknown := [t for t in wanted if t not in self._files]:
            raise ValueError(f"{self.info.source}: no tensor {unknown[0]!r} in its ModelInfo")
        self.plan(wanted)
        self._report()
        fetched: dict[str, bytes] = {}
        contributors: dict[str, dict[str, int]] = {}
        for attempt in range(2):  # a second pass only re-fetches files whose whole-file digest failed
            outcomes = await asyncio.gather(*(self._tensor(t) for t in wanted), return_exceptions=True)
            for tensor, outcome in zip(wanted, outcomes):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, WeightsUnavailable):
                        raise outcome
                    continue
                fetched[tensor], contributors[tensor] = outcome
            failed = [t for t in wanted if t not in fetched]
            if failed:
                raise WeightsUnavailable(self._unavailable(failed), fetched=fetched)
            wanted = await self._check_files(fetched, contributors)
            if not wanted:
                return fetched
        raise WeightsUnavailable(self._unavailable(wanted), fetched=fetched)

    def _unavailable(self, tensors: list[str]) -> str:
        parts = sorted({str(part_of(self.info, t)) for t in tensors}, key=lambda p: (not p.isdigit(), p.zfill(9)))
        example = tensors[0]
        reasons = {**self._dead, **self._reasons.get(example, {})}
        tried = "; ".join(f"{s}: {r}" for s, r in reasons.items()) or "no source holds them"
        return (f"{self.info.source}: no source supplied {len(tensors)} tensor(s) of part(s) {', '.join(parts)} "
                f"(e.g. {example!r}); tried {tried}")

    async def _tensor(self, tensor: str) -> tuple[bytes, dict[str, int]]:
        file = self._files[tensor]
        entry = file.tensors[tensor]
        chunks = chunks_of(file.name, tensor, entry.size, max_chunk=self._max_chunk)
        got: dict[int, tuple[bytes, WeightSource]] = {}
        reasons = self._reasons.setdefault(tensor, {})
        excluded = self._excluded.setdefault(tensor, set())
        while True:
            candidates = [s for s in self.order(tensor, part_of(self.info, tensor))
                          if s.name not in excluded and s.name not in reasons and s.name not in self._dead]
            if not candidates:
                for data, source in got.values():  # never kept: the tensor is incomplete
                    self.done -= len(data)
                raise WeightsUnavailable(tensor)
            source = candidates[0]
            outcomes = await asyncio.gather(*(self._chunk(source, c, got) for c in chunks if c.offset not in got),
                                            return_exceptions=True)
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            if errors:
                error = errors[0]
                if isinstance(error, SourceMissing):
                    reasons[source.name] = f"missing ({error})"
                elif isinstance(error, SourceFailed):
                    self._dead[source.name] = str(error) or type(error).__name__
                elif isinstance(error, _WrongLength):
                    reasons[source.name] = str(error)
                else:
                    raise error
                continue
            data = b"".join(got[c.offset][0] for c in chunks)
            shares: dict[str, int] = {}
            for piece, supplier in got.values():
                shares[supplier.name] = shares.get(supplier.name, 0) + len(piece)
            if entry.sha256 is not None and hashlib.sha256(data).hexdigest() != entry.sha256:
                for piece, supplier in got.values():
                    self._refuse(supplier, len(piece))
                    self.done -= len(piece)
                    reasons[supplier.name] = "sent bytes whose sha256 does not match the ModelInfo (refused)"
                excluded.update(shares)
                got.clear()
                self._report()
                continue
            return data, shares

    async def _chunk(self, source: WeightSource, chunk: Chunk, got: dict[int, tuple[bytes, WeightSource]]) -> None:
        file = self._files[chunk.tensor]
        async with self._slots:
            try:
                data = await source.read(file=file, tensor=chunk.tensor, offset=chunk.offset, length=chunk.length)
            except asyncio.TimeoutError:
                raise SourceFailed("timed out") from None
            except (ConnectionError, OSError) as exc:
                raise SourceFailed(str(exc) or type(exc).__name__) from None
        if len(data) != chunk.length:
            self._refuse(source, len(data))
            raise _WrongLength(f"sent {len(data)} bytes of {chunk.tensor!r} at {chunk.offset}, "
                               f"asked for {chunk.length} (refused)")
        got[chunk.offset] = (data, source)
        if self._metrics is not None:
            self._metrics.weights_fetched(source.kind, len(data))
        self.done += len(data)
        self._meter.add(len(data))
        self._report()

    async def _check_files(self, fetched: dict[str, bytes], contributors: dict[str, dict[str, int]]) -> list[str]:
        """Files whose every tensor was fetched and whose sha256 is known (and not already covered
        by per-tensor digests) are checked whole; returns the tensors to fetch again."""
        again: list[str] = []
        for file in self.info.weightFiles:
            names = list(file.tensors)
            if file.sha256 is None or not names or any(t not in fetched for t in names) \
                    or all(e.sha256 is not None for e in file.tensors.values()):
                continue
            header = await self._file_header(file)
            if header is None:
                continue
            digest = hashlib.sha256(header)
            for name in sorted(names, key=lambda t: file.tensors[t].start):
                digest.update(fetched[name])
            if digest.hexdigest() == file.sha256:
                continue
            suppliers = {s.name: s for s in self.sources}
            for name in names:
                for supplier, n in contributors.get(name, {}).items():
                    if supplier in suppliers:
                        self._refuse(suppliers[supplier], n)
                    self._excluded[name].add(supplier)
                    self._reasons[name][supplier] = f"sent bytes of {file.name} whose sha256 does not match (refused)"
                self.done -= len(fetched.pop(name))
                again.append(name)
            self._report()
        return again

    async def _file_header(self, file: WeightFile) -> bytes | None:
        """The first 8 + headerLength bytes of ``file`` from a source that holds the original file."""
        if file.name in self._headers:
            return self._headers[file.name]
        length = 8 + file.headerLength
        for source in self.sources:
            if source.name in self._dead:
                continue
            try:
                data = await source.read(file=file, tensor=None, offset=0, length=length)
            except (SourceMissing, SourceFailed, ConnectionError, OSError, asyncio.TimeoutError):
                continue
            if len(data) == length:
                self._headers[file.name] = data
                return data
        return None


class _WrongLength(Exception):
    """A source answered a range with the wrong number of bytes."""
