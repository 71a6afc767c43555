"""Where a Shard's weights come from: the original copy on this node when there is one (used in
place, nothing fetched), else the node's model cache once the stage's missing parts are fetched
from peers (the nodes whose status lists the model) and, last, the hub (hf:// sources, when the
node may use it). Side files (config, tokenizer) are fetched whole and checked against their
size and sha256 in the ModelInfo.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.datapath.wire import DataPathTLS
from reconciler.models.catalog import ModelNotFound, local_model_dir
from reconciler.models.hub import hub_endpoint
from reconciler.models.metadata import ModelMetadataError, safetensors_files
from reconciler.models.model_info import (
    MODEL_INFO_KIND,
    ModelInfoSpec,
    Part,
    SideFile,
    WeightFile,
    model_info_name,
)
from reconciler.weights.fetch import (
    Fetcher,
    FetchProgress,
    SourceFailed,
    SourceMissing,
    WeightsUnavailable,
    WeightSource,
    missing_parts,
)
from reconciler.weights.peer import PeerClient, PeerSource, peers_holding
from reconciler.weights.store import ModelCache

__all__ = ["FetchProgress", "WeightSupply", "WeightsUnavailable", "original_dir"]

BATCH_BYTES = 1 << 30  # parts fetched (and held in memory) at once before they are written


def original_dir(info: ModelInfoSpec) -> Path | None:
    """This node's original copy of the model (a local path, or an HF-cache snapshot), when it has
    every weight file of the ModelInfo at its size; blocking (stats files)."""
    directory = local_model_dir(info.source, revision=info.revision)
    if directory is None or not info.weightFiles:
        return None
    for file in info.weightFiles:
        try:
            if (directory / file.name).stat().st_size != file.size:
                return None
        except OSError:
            return None
    return directory


class HubSource:
    """The hub as a Fetcher source (blocking HubReader calls run on worker threads)."""

    kind = "hub"

    def __init__(self, *, hub: Any, info: ModelInfoSpec, endpoint: str = "") -> None:
        self.name = f"hub {endpoint}".strip()
        self._hub = hub
        self._repo = info.source.removeprefix("hf://")
        self._revision = info.commit or info.revision

    def holds(self, part: Part) -> bool:
        return True

    async def read(self, *, file: WeightFile, tensor: str | None, offset: int, length: int) -> bytes:
        start = offset if tensor is None else file.offset(tensor) + offset
        if length == 0:
            return b""
        with _hub_errors():
            return await asyncio.to_thread(self._hub.read_range, self._repo, revision=self._revision,
                                           file=file.name, start=start, length=length)

    async def read_side_file(self, name: str, *, size: int) -> bytes:
        with _hub_errors():
            return await asyncio.to_thread(self._hub.read_file, self._repo, revision=self._revision, file=name)


class _hub_errors:
    """A hub's 404 means it lacks the file (try elsewhere); any other hub error means it failed."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, _: Any) -> bool:
        if isinstance(error, ModelNotFound):
            raise SourceMissing(str(error)) from None
        if isinstance(error, (ModelMetadataError, OSError)):
            raise SourceFailed(str(error)) from None
        return False


class WeightSupply:
    """A node's supply of weights for its Shards (see the module docstring)."""

    def __init__(self, *, node_name: str, cache: ModelCache, store: Any, data_token: str | None,
                 tls: DataPathTLS | None = None, hub: Any = None, metrics: Any = None, parallel: int = 4) -> None:
        self.node_name = node_name
        self.cache = cache
        self._store = store
        self._token = data_token
        self._tls = tls
        self._hub = hub
        self._metrics = metrics
        self._parallel = parallel
        self._clients: dict[tuple[str, int], PeerClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # one fetch per model at a time

    # -- sources ---------------------------------------------------------------------------

    def _sources(self, info: ModelInfoSpec, name: str) -> list[WeightSource]:
        sources: list[WeightSource] = []
        for holding in peers_holding(self._store, model=name, exclude=self.node_name):
            key = (holding.host, holding.port)
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = PeerClient(host=holding.host, port=holding.port, token=self._token,
                                                         tls=self._tls)
            sources.append(PeerSource(holding=holding, client=client, model=name))
        if self._hub is not None and info.source.startswith("hf://"):
            sources.append(HubSource(hub=self._hub, info=info, endpoint=hub_endpoint()))
        return sources

    def originals(self, name: str) -> Path | None:
        """The original copy of the model with ModelInfo ``name`` on this node (the WeightServer's
        ``originals``); blocking."""
        obj = self._store.get((MODEL_INFO_KIND, "", name))
        if obj is None:
            return None
        try:
            info = ModelInfoSpec.model_validate(obj.get("spec", {}))
        except ValueError:
            return None
        return original_dir(info)

    # -- supplying a stage -----------------------------------------------------------------

    async def stage_dir(self, info: ModelInfoSpec, *, start: int, end: int, first: bool, last: bool,
                        progress: Callable[[FetchProgress], None] | None = None) -> Path:
        """The directory a stage of layers [start, end) loads from (see the module docstring)."""
        original = await asyncio.to_thread(original_dir, info)
        if original is not None:
            return original
        name = model_info_name(info.source, info.revision)
        async with self._locks.setdefault(name, asyncio.Lock()):
            await self._side_files(info, name)
            held = await asyncio.to_thread(self.cache.parts_held, info)
            wanted = missing_parts(info, start=start, end=end, first=first, last=last, held=held)
            if wanted:
                await self._fetch_parts(info, name, wanted, progress)
            await asyncio.to_thread(self.cache.touch, name)
        return self.cache.directory(name)

    async def side_dir(self, info: ModelInfoSpec) -> Path:
        """A directory with the model's config and side files (tokenizer, templates)."""
        original = await asyncio.to_thread(original_dir, info)
        if original is not None:
            return original
        name = model_info_name(info.source, info.revision)
        async with self._locks.setdefault(name, asyncio.Lock()):
            await self._side_files(info, name)
        return self.cache.directory(name)

    async def _fetch_parts(self, info: ModelInfoSpec, name: str, wanted: dict[Part, list[str]],
                           progress: Callable[[FetchProgress], None] | None) -> None:
        sizes = {t: f.tensors[t].size for f in info.weightFiles for t in f.tensors}
        fetcher = Fetcher(info=info, sources=self._sources(info, name), parallel=self._parallel,
                          metrics=self._metrics, progress=progress, spread_key=self.node_name)
        fetcher.plan(t for tensors in wanted.values() for t in tensors)
        for batch in _batches(wanted, sizes):
            tensors = [t for part in batch for t in wanted[part]]
            try:
                fetched = await fetcher.fetch(tensors)
            except WeightsUnavailable as exc:
                await self._write(info, {p: wanted[p] for p in batch if all(t in exc.fetched for t in wanted[p])},
                                  exc.fetched)
                tried = ", ".join(s.name for s in fetcher.sources) or "no peer lists it and no hub is usable"
                raise WeightsUnavailable(f"{exc} (sources: {tried})") from None
            await self._write(info, {p: wanted[p] for p in batch}, fetched)

    async def _write(self, info: ModelInfoSpec, parts: dict[Part, list[str]], fetched: dict[str, bytes]) -> None:
        for part, tensors in parts.items():
            await asyncio.to_thread(self.cache.write_part, info, part, {t: fetched[t] for t in tensors})

    async def _side_files(self, info: ModelInfoSpec, name: str) -> None:
        directory = self.cache.directory(name)
        names = {f.name for f in info.sideFiles}
        if "config.json" not in names and not (directory / "config.json").is_file():
            data = json.dumps(info.config, indent=2).encode()
            await asyncio.to_thread(self.cache.write_side_file, info, "config.json", data)
        todo = [f for f in info.sideFiles if not _has(directory / f.name, f)]
        if not todo:
            return
        sources = self._sources(info, name)
        for side in todo:
            data = await self._side_file(side, sources)
            await asyncio.to_thread(self.cache.write_side_file, info, side.name, data)

    async def _side_file(self, side: SideFile, sources: list[WeightSource]) -> bytes:
        tried: list[str] = []
        for source in sources:
            try:
                data = await source.read_side_file(side.name, size=side.size)
            except (SourceMissing, SourceFailed, OSError, asyncio.TimeoutError) as exc:
                tried.append(f"{source.name}: {exc}")
                continue
            if len(data) != side.size or (side.sha256 and hashlib.sha256(data).hexdigest() != side.sha256):
                if self._metrics is not None:
                    self._metrics.weights_refused(source.kind, len(data))
                tried.append(f"{source.name}: sent {len(data)} bytes that do not match its size {side.size} "
                             f"or sha256 (refused)")
                continue
            if self._metrics is not None:
                self._metrics.weights_fetched(source.kind, len(data))
            return data
        raise WeightsUnavailable(f"side file {side.name}: no source supplied it; tried "
                                 f"{'; '.join(tried) or 'none (no peer lists the model and no hub is usable)'}")

    # -- what this node holds --------------------------------------------------------------

    def cached_models(self) -> list[dict[str, Any]]:
        """CachedModel dicts: the original copies of deployed models on this node (complete), then
        the cache's partial copies. Blocking (stats files)."""
        models: list[dict[str, Any]] = []
        seen: set[str] = set()
        deployments, _ = self._store.list("ModelDeployment")
        for deployment in deployments:
            model = (deployment.get("spec") or {}).get("model") or {}
            source, revision = model.get("source"), model.get("revision")
            if not isinstance(source, str):
                continue
            name = model_info_name(source, revision)
            if name in seen:
                continue
            directory = self.originals(name) if self._store.get((MODEL_INFO_KIND, "", name)) is not None \
                else _weights_dir(source, revision)
            if directory is None:
                continue
            seen.add(name)
            size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
            models.append({"name": name, "source": source, "revision": revision, "bytes": size,
                           "complete": True, "parts": [], "lastUsed": None})
        return models + self.cache.cached()

    def evict(self, *, needed: set[str]) -> list[str]:
        return self.cache.evict(needed=needed)

    async def close(self) -> None:
        for client in list(self._clients.values()):
            await client.close()
        self._clients.clear()


def _weights_dir(source: str, revision: str | None) -> Path | None:
    """Before the model's ModelInfo exists: its local directory when that holds weight files."""
    directory = local_model_dir(source, revision=revision)
    if directory is None:
        return None
    try:
        return directory if safetensors_files(directory) else None
    except ModelMetadataError:
        return None


def _has(path: Path, side: SideFile) -> bool:
    try:
        return path.stat().st_size == side.size
    except OSError:
        return False


def _batches(wanted: dict[Part, list[str]], sizes: dict[str, int]) -> list[list[Part]]:
    """Parts grouped so each group's bytes stay within BATCH_BYTES (a bigger part is a group alone)."""
    batches: list[list[Part]] = []
    current: list[Part] = []
    held = 0
    for part in sorted(wanted, key=lambda p: (not isinstance(p, int), p if isinstance(p, int) else 0, str(p))):
        size = sum(sizes[t] for t in wanted[part])
        if current and held + size > BATCH_BYTES:
            batches.append(current)
            current, held = [], 0
        current.append(part)
        held += size
    if current:
        batches.append(current)
    return batches

