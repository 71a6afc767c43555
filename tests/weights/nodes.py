"""Nodes for the weights tests: a stage server each (the data-path token required, TLS when
given), their Node objects and the model's ModelInfo in one in-memory store, and metrics twins."""
from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

from reconciler.datapath.stage import StageServer
from reconciler.datapath.wire import DataPathTLS
from reconciler.models.model_info import ModelInfoSpec, model_info_name, model_info_object
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from reconciler.weights.peer import WeightServer
from reconciler.weights.store import ModelCache
from reconciler.weights.supply import WeightSupply
from tests.weights.conftest import SOURCE

TOKEN = "s3cret"
NAME = model_info_name(SOURCE, None)


class Counts:
    def __init__(self) -> None:
        self.fetched: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.served = 0
        self.on_served = None

    def weights_fetched(self, source: str, n: int) -> None:
        self.fetched[source] = self.fetched.get(source, 0) + n

    def weights_refused(self, source: str, n: int) -> None:
        self.refused[source] = self.refused.get(source, 0) + n

    def weights_served(self, n: int) -> None:
        self.served += n
        if self.on_served is not None:
            self.on_served()


class Cluster:
    """Nodes with a stage server each (token required), Node objects and the ModelInfo in one store."""

    def __init__(self, stack: AsyncExitStack, tmp: Path, info: ModelInfoSpec, *,
                 tls: dict[str, DataPathTLS] | None = None, hub: object = None) -> None:
        self.stack, self.tmp, self.info = stack, tmp, info
        self.name = model_info_name(info.source, info.revision)
        self.tls = tls or {}
        self.hub = hub
        self.store = MemoryStore()
        self.servers: dict[str, StageServer] = {}
        self.counts: dict[str, Counts] = {}
        self.caches: dict[str, ModelCache] = {}
        self.supplies: dict[str, WeightSupply] = {}

    async def start(self) -> "Cluster":
        await self.store.submit(make_command("create", ("ModelInfo", "", self.name), body=model_info_object(self.info)))
        return self

    def cache(self, name: str) -> ModelCache:
        if name not in self.caches:
            self.caches[name] = ModelCache(self.tmp / f"cache-{name}")
            self.counts[name] = Counts()
        return self.caches[name]

    async def node(self, name: str, *, original: Path | None = None, rate: float | None = None,
                   cached: list[dict] | None = None) -> StageServer:
        """Start ``name``'s stage server and list it (with what it holds) in the store."""
        cache = self.cache(name)
        weights = WeightServer(cache=cache, originals=lambda model: original if model == self.name else None,
                               store=self.store, rate_bytes_per_s=rate, metrics=self.counts[name])
        server = StageServer(token=TOKEN, weights=weights, tls=self.tls.get(name))
        await server.start()
        self.stack.push_async_callback(weights.close)
        self.stack.push_async_callback(server.stop)
        self.servers[name] = server
        if cached is None:
            cached = [{"name": self.name, "source": self.info.source, "complete": True}] if original else cache.cached()
        await self.store.submit(make_command("create", ("Node", "", name), body={
            "kind": "Node", "metadata": {"name": name},
            "spec": {"nodeId": name, "address": "127.0.0.1", "apiPort": 1, "raftPort": 2, "dataPort": server.port},
            "status": {"cachedModels": cached}}))
        return server

    def supply(self, name: str, *, parallel: int = 4) -> WeightSupply:
        if name not in self.supplies:
            supply = WeightSupply(node_name=name, cache=self.cache(name), store=self.store, data_token=TOKEN,
                                  tls=self.tls.get(name), hub=self.hub, metrics=self.counts[name], parallel=parallel)
            self.stack.push_async_callback(supply.close)
            self.supplies[name] = supply
        return self.supplies[name]
