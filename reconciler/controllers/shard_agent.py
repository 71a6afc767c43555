"""The shard agent (on every node): loads the Shards assigned to this node, serves them on the
node's stage server, reports their phase, and unloads the ones that are no longer its own.

Weights are read on each shard's own MLX compute thread, layer by layer with progress; the event
loop only schedules and writes status, and never waits for a thread: a cancelled load or an
unloaded shard is joined off the loop and its memory handed back when its thread finishes. A
deleted shard that still has requests in flight keeps serving them (at most DRAIN_SECONDS) while
the router already sends new ones elsewhere, so a re-placement interrupts nothing. A shard is
reloaded only when what it holds changes (model, dtype or layer range), not when unrelated fields
of its spec do. A tensor-parallel Shard (``spec.tensor``) runs in its rank's own process (see
``runtime.tensor_shard``); only rank 0 is served on the stage server, and a rank whose group
breaks turns Failed at once (the scheduler places the group again when a node is lost). A failed
rank whose node stays up is started again after a backoff, at most RANK_RESTARTS times in a row.

Weights come from the node's ``WeightSupply``: this node's own copy of the model is used in place
(a local path or the Hugging Face cache; it needs no ModelInfo), otherwise the stage's parts are
fetched into the model cache from peers or the hub, as the model's ModelInfo in the store
describes them (the shard is Pending until it is there, then Downloading with bytes and rate).
A fetch that fails is tried again after a backoff, for as long as the Shard stays this node's.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from reconciler.controllers.manager import Controller
from reconciler.datapath.stage import StageServer
from reconciler.models.metadata import ModelMetadataError
from reconciler.models.model_info import MODEL_INFO_KIND, ModelInfoSpec, model_info_name, stage_tensors
from reconciler.runtime.model_files import ModelFilesError, original_copy
from exo_ctl.api.resources import TensorGroup
from reconciler.runtime.shard_model import ShardLoadError, ShardModel, open_shard
from reconciler.runtime.tensor_shard import TensorShard, open_tensor_shard
from reconciler.server.events import record_event
from reconciler.store.base import Store, StoreError, StoreUnavailable, make_command
from reconciler.weights.fetch import WeightsUnavailable
from reconciler.weights.store import is_partial_copy

if TYPE_CHECKING:
    from reconciler.weights.supply import FetchProgress, WeightSupply

log = logging.getLogger(__name__)
PROGRESS_STEP = 0.25   # report Loading progress in steps this big (each report is a Raft write)
DRAIN_SECONDS = 60.0   # a deleted shard serves its requests in flight at most this long
DRAIN_POLL_SECONDS = 0.25
RANK_RESTARTS = 5            # restarts of a failed tensor rank in a row before it stays Failed
RANK_BACKOFF_SECONDS = 1.0   # before the first restart, doubled for each next one
RANK_BACKOFF_MAX_SECONDS = 30.0
RANK_HEALTHY_SECONDS = 60.0  # a group up this long starts its restart count again
FETCH_BACKOFF_SECONDS = 2.0       # before fetching a stage's weights again after a failure, doubled each time
FETCH_BACKOFF_MAX_SECONDS = 60.0
DOWNLOAD_REPORT_SECONDS = 1.0     # Downloading status: at most one write per second...
DOWNLOAD_REPORT_STEP = 0.10       # ...or per this much of the stage's bytes

LoadKey = tuple[str, str | None, int, int, str | None, str | None]  # source, revision, start, end, dtype, group
Loader = Callable[..., Awaitable[ShardModel]]
TensorLoader = Callable[..., Awaitable[TensorShard]]


def _release_memory() -> None:
    gc.collect()
    mx.clear_cache()  # hand the freed buffers back to the system


def load_key(shard: dict[str, Any]) -> LoadKey:
    spec = shard["spec"]
    tensor = spec.get("tensor")
    return (spec["model"]["source"], spec["model"].get("revision"), spec["layers"]["start"], spec["layers"]["end"],
            spec["model"].get("dtype"), json.dumps(tensor, sort_keys=True) if tensor else None)


def download_report_due(*, last: tuple[float, float] | None, now: float, fraction: float) -> bool:
    """Whether a Downloading status is written now, given (time, fraction) of the last one written:
    the first at once, then one per DOWNLOAD_REPORT_SECONDS or per DOWNLOAD_REPORT_STEP at most."""
    return last is None or now - last[0] >= DOWNLOAD_REPORT_SECONDS \
        or fraction - last[1] >= DOWNLOAD_REPORT_STEP - 1e-9  # a tenth is not quite 0.1 in floats


def _info_name(key: LoadKey) -> str:
    return model_info_name(key[0], key[1])


def _serves_requests(shard: dict[str, Any]) -> bool:
    """Whether the stage server takes requests for it (every shard but tensor ranks above 0)."""
    return (shard["spec"].get("tensor") or {}).get("rank", 0) == 0


@dataclass
class Loaded:
    key: LoadKey
    model: ShardModel | TensorShard
    since: float = field(default_factory=time.monotonic)


class _DownloadReport:
    """A stage fetch's ``progress`` callback: Downloading status writes, throttled
    (``download_report_due``), for as long as the load it belongs to is still wanted."""

    def __init__(self, agent: ShardAgent, name: str, key: LoadKey) -> None:
        self.agent, self.name, self.key = agent, name, key
        self.loop = asyncio.get_running_loop()
        self.last: tuple[float, float] | None = None
        self.writes: list[asyncio.Future[None]] = []

    def __call__(self, progress: FetchProgress) -> None:  # on the loop or on a fetch thread
        self.loop.call_soon_threadsafe(self._on_loop, progress)

    def _on_loop(self, progress: FetchProgress) -> None:
        agent = self.agent
        if agent.loading.get(self.name, (None,))[0] != self.key or progress.total <= 0:
            return
        fraction, now = min(1.0, progress.done / progress.total), time.monotonic()
        if not download_report_due(last=self.last, now=now, fraction=fraction):
            return
        self.last = (now, fraction)
        shard = agent.store.get(("Shard", "", self.name))
        if shard is not None:
            self.writes = [w for w in self.writes if not w.done()]
            self.writes.append(asyncio.ensure_future(agent._report(shard, phase="Downloading",
                                                                   progress=round(fraction, 3), download=progress)))

    async def flush(self) -> None:
        """Wait for the writes in flight, so a later phase is never overwritten by one of them."""
        await asyncio.gather(*self.writes, return_exceptions=True)


class ShardAgent(Controller):
    name = "shard-agent"
    watches = ("Shard", MODEL_INFO_KIND)
    resync_seconds = 10.0

    def __init__(self, *, store: Store, node_name: str, stage_server: StageServer, data_endpoint: str,
                 loader: Loader = open_shard, metrics: Any = None, supply: WeightSupply | None = None,
                 data_token: str | None = None, tensor_loader: TensorLoader = open_tensor_shard) -> None:
        """``supply``: where the weights this node lacks come from (None: only its own copies load)."""
        self.store, self.node_name, self.supply = store, node_name, supply
        self.data_token, self.tensor_loader = data_token, tensor_loader
        self.stage_server, self.data_endpoint = stage_server, data_endpoint
        self.loader, self.metrics = loader, metrics
        self.loaded: dict[str, Loaded] = {}
        self.loading: dict[str, tuple[LoadKey, asyncio.Task[None]]] = {}
        self.failed: dict[str, tuple[LoadKey, str]] = {}
        self.restarts: dict[str, tuple[LoadKey, int, float]] = {}  # tensor ranks: key, restarts, not before
        self.refetches: dict[str, tuple[LoadKey, int, float]] = {}  # failed fetches: key, failures, not before
        self.draining: dict[str, asyncio.Task[None]] = {}
        self._reaping: set[asyncio.Task[None]] = set()
        self._evicting: asyncio.Task[None] | None = None
        self._evict_again = False

    def mine(self) -> dict[str, dict[str, Any]]:
        return {s["metadata"]["name"]: s for s in self.store.list("Shard")[0] if s["spec"]["nodeName"] == self.node_name}

    async def reconcile(self) -> None:
        mine = self.mine()
        # Unload what is no longer ours, or no longer what we hold.
        for name in list(self.loaded):
            if name not in mine and self.stage_server.active_requests(name):
                self._drain(name)
            elif name not in mine or load_key(mine[name]) != self.loaded[name].key:
                self.unload(name)
        for name in [n for n in self.draining if n in mine]:  # the name is back: free it for the new load
            self.draining.pop(name).cancel()
            self.unload(name)
        for name in list(self.loading):
            if name not in mine or load_key(mine[name]) != self.loading[name][0]:
                self.loading.pop(name)[1].cancel()
        for name in list(self.failed):
            if name not in mine or load_key(mine[name]) != self.failed[name][0] or self._restart_due(name):
                del self.failed[name]
        for plans in (self.restarts, self.refetches):
            for name in list(plans):
                if name not in mine or load_key(mine[name]) != plans[name][0]:
                    del plans[name]
        for name, shard in mine.items():
            if name in self.loaded:
                if _serves_requests(shard):
                    self.stage_server.set_request_limit(name, shard["spec"].get("maxRequests"))
                    self.stage_server.set_batch_limit(name, shard["spec"].get("maxBatchSize"))
                await self._report(shard, phase="Ready", progress=1.0, bytes_loaded=self.loaded[name].model.nbytes)
            elif name in self.failed:
                await self._report(shard, phase="Failed", message=self.failed[name][1])
            elif name not in self.loading:
                if self._startable(load_key(shard)):
                    self._start(name, shard)
                else:
                    await self._report(shard, phase="Pending",
                                       message=f"waiting for the metadata of {shard['spec']['model']['source']}")

    def _startable(self, key: LoadKey) -> bool:
        """Whether the shard's weights can be found: its ModelInfo is in the store, or this node has
        its own copy of the model (used in place, no metadata needed)."""
        return self.store.get((MODEL_INFO_KIND, "", _info_name(key))) is not None \
            or original_copy(key[0], revision=key[1]) is not None

    def _start(self, name: str, shard: dict[str, Any]) -> None:
        task = asyncio.create_task(self._load(name, shard), name=f"load-shard:{name}")
        self.loading[name] = (load_key(shard), task)

    def _restart_due(self, name: str) -> bool:
        failed = self.failed.get(name)
        return failed is not None and any(
            plan is not None and plan[0] == failed[0] and time.monotonic() >= plan[2]
            for plan in (self.restarts.get(name), self.refetches.get(name)))

    def _plan_refetch(self, name: str, key: LoadKey, message: str) -> str:
        """Record when the stage's weights are fetched again; ``message`` plus when."""
        previous = self.refetches.get(name)
        failures = previous[1] if previous is not None and previous[0] == key else 0
        delay = min(FETCH_BACKOFF_MAX_SECONDS, FETCH_BACKOFF_SECONDS * 2 ** failures)
        self.refetches[name] = (key, failures + 1, time.monotonic() + delay)
        asyncio.get_running_loop().call_later(delay, self._restart_now, name)
        return f"{message}; trying again in {delay:.0f}s"

    def _plan_restart(self, name: str, key: LoadKey, message: str, *, up_since: float | None = None) -> str:
        """Record when the failed tensor rank ``name`` is started again; ``message`` plus what happens next."""
        previous = self.restarts.get(name)
        count = previous[1] if previous is not None and previous[0] == key else 0
        if up_since is not None and time.monotonic() - up_since >= RANK_HEALTHY_SECONDS:
            count = 0
        if count >= RANK_RESTARTS:
            self.restarts[name] = (key, count, float("inf"))
            return f"{message}; gave up after {count} restarts (a change of the Shard's spec tries again)"
        delay = min(RANK_BACKOFF_MAX_SECONDS, RANK_BACKOFF_SECONDS * 2 ** count)
        self.restarts[name] = (key, count + 1, time.monotonic() + delay)
        asyncio.get_running_loop().call_later(delay, self._restart_now, name)
        return f"{message}; restarting it in {delay:.0f}s (restart {count + 1} of {RANK_RESTARTS})"

    def _restart_now(self, name: str) -> None:
        """The backoff of ``name`` is over: start it without waiting for the next pass (which would too)."""
        if self._restart_due(name) and name not in self.loading and name not in self.loaded:
            shard = self.mine().get(name)
            if shard is not None and load_key(shard) == self.failed[name][0]:
                del self.failed[name]
                self._start(name, shard)

    async def _load(self, name: str, shard: dict[str, Any]) -> None:
        key = load_key(shard)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        reported = [0.0]

        def on_progress(fraction: float, done: int) -> None:  # on the compute thread
            if fraction - reported[0] >= PROGRESS_STEP and fraction < 1.0:
                reported[0] = fraction
                loop.call_soon_threadsafe(report_progress, round(fraction, 2), done)

        def report_progress(fraction: float, done: int) -> None:  # on the loop; not for a cancelled load
            if self.loading.get(name, (None,))[0] == key:
                asyncio.ensure_future(self._report(self.store.get(("Shard", "", name)) or shard, phase="Loading",
                                                   progress=fraction, bytes_loaded=done))

        try:
            path, tensors = await self._stage_dir(name, key, shard)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 — no peer, hub error, disk: the Shard says which, and retries
            expected = isinstance(error, (ModelFilesError, ModelMetadataError, WeightsUnavailable, OSError))
            message = str(error) if expected else f"{type(error).__name__}: {error}"
            log.warning("shard %s: fetching its weights failed: %s", name, message, exc_info=not expected)
            record_event(self.store, shard, reason="FetchFailed", type_="Warning", message=message,
                         component="shard-agent", host=self.node_name)
            self.loading.pop(name, None)
            self.failed[name] = (key, self._plan_refetch(name, key, message))
            await self._report_latest(name, shard, phase="Failed", message=self.failed[name][1])
            return
        self.refetches.pop(name, None)
        extra = {"tensors": tensors} if tensors is not None else {}  # a partial copy: what it must hold
        try:
            await self._report_latest(name, shard, phase="Loading", progress=0.0)
            log.info("loading shard %s: layers %d-%d of %s", name, key[2], key[3] - 1, path)
            record_event(self.store, shard, reason="Loading", component="shard-agent", host=self.node_name,
                         message=f"loading layers {key[2]}-{key[3] - 1} of {key[0]} on {self.node_name}")
            if shard["spec"].get("tensor"):
                model = await self._load_rank(name, key, path, TensorGroup.model_validate(shard["spec"]["tensor"]),
                                              **extra)
            else:
                model = await self.loader(path, start=key[2], end=key[3], progress=on_progress, dtype=key[4], **extra)
        except asyncio.CancelledError:
            log.info("shard %s: load cancelled (its thread stops at the next layer)", name)
            raise
        except Exception as error:  # noqa: BLE001 — MLX reports unreadable weights as RuntimeError
            expected = isinstance(error, (ModelFilesError, ShardLoadError, OSError, ValueError, RuntimeError))
            message = str(error) if expected else f"{type(error).__name__}: {error}"
            log.warning("shard %s failed to load: %s", name, message, exc_info=not expected)
            record_event(self.store, shard, reason="LoadFailed", type_="Warning", message=message,
                         component="shard-agent", host=self.node_name)
            self.loading.pop(name, None)
            if shard["spec"].get("tensor"):
                message = self._plan_restart(name, key, message)
            self.failed[name] = (key, message)
            await self._report_latest(name, shard, phase="Failed", message=message)
            return
        if self.loading.get(name, (None,))[0] != key:  # reassigned while we were loading
            model.close()
            return
        self.loading.pop(name)
        if _serves_requests(shard):
            spec = (self.store.get(("Shard", "", name)) or shard)["spec"]
            self.stage_server.add_shard(name, model, max_requests=spec.get("maxRequests"),
                                        max_batch_size=spec.get("maxBatchSize"))
        self.loaded[name] = Loaded(key, model)
        seconds = time.monotonic() - started
        log.info("shard %s ready: %.1f MiB in %.2fs", name, model.nbytes / 2**20, seconds)
        record_event(self.store, shard, reason="Loaded", component="shard-agent", host=self.node_name,
                     message=f"layers {key[2]}-{key[3] - 1} loaded on {self.node_name}")
        if self.metrics is not None:
            self.metrics.shard_load_seconds.labels(shard["spec"]["deployment"]).observe(seconds)
        await self._report_latest(name, shard, phase="Ready", progress=1.0, bytes_loaded=model.nbytes)
        self._evict_soon()

    async def _stage_dir(self, name: str, key: LoadKey, shard: dict[str, Any]) -> tuple[Path, set[str] | None]:
        """The directory the shard loads from, and (for a partial copy in the model cache) the
        checkpoint tensors it must hold. Fetches what this node lacks, reporting Downloading."""
        stored = self.store.get((MODEL_INFO_KIND, "", _info_name(key)))
        if stored is None or self.supply is None:
            path = await asyncio.to_thread(original_copy, key[0], revision=key[1])
            if path is None:
                why = "its metadata is not in the cluster yet" if stored is None else "this node fetches no weights"
                raise ModelFilesError(f"model {key[0]!r}: no copy on this node, and {why}")
            return path, None
        info = ModelInfoSpec.model_validate(stored["spec"])
        spec = shard["spec"]
        ends = {"first": spec["index"] == 0, "last": spec["index"] == spec["stages"] - 1}
        report = _DownloadReport(self, name, key)
        try:
            path = await self.supply.stage_dir(info, start=key[2], end=key[3], progress=report, **ends)
        finally:
            await report.flush()
        if not is_partial_copy(path):
            return path, None
        return path, set(stage_tensors(info, start=key[2], end=key[3], **ends))

    def _evict_soon(self) -> None:
        """Let the model cache drop, least recently used first, what no Shard of this node needs."""
        if self.supply is None:
            return
        if self._evicting is not None and not self._evicting.done():
            self._evict_again = True
            return
        self._evicting = asyncio.create_task(self._evict(), name="evict-model-cache")

    async def _evict(self) -> None:
        assert self.supply is not None
        while True:
            self._evict_again = False
            needed = {_info_name(load_key(shard)) for shard in self.mine().values()}
            try:
                evicted = await asyncio.to_thread(self.supply.evict, needed=needed)
            except OSError as error:
                log.warning("model cache: eviction failed: %s", error)
                evicted = []
            if evicted:
                log.info("model cache: evicted %s (no Shard of this node needs them)", ", ".join(evicted))
            if not self._evict_again:
                return

    async def _load_rank(self, name: str, key: LoadKey, path: Path, group: TensorGroup,
                         **extra: Any) -> TensorShard:
        """Start this node's rank of a tensor-parallel stage; its loss marks the shard Failed."""
        if self.data_token is None:
            raise ShardLoadError("tensor-parallel shards need the cluster's data-path key, and this node has none")
        loop = asyncio.get_running_loop()

        def lost(message: str) -> None:  # on the rank's supervisor thread
            loop.call_soon_threadsafe(self._rank_lost, name, key, message)

        log.info("shard %s: starting tensor rank %d of %d (%s)", name, group.rank, group.size,
                 ", ".join(p.address for p in group.peers))
        return await self.tensor_loader(path, start=key[2], end=key[3], dtype=key[4], group=group,
                                        data_token=self.data_token, on_lost=lost, **extra)

    def _rank_lost(self, name: str, key: LoadKey, message: str) -> None:
        loaded = self.loaded.get(name)
        if loaded is None or loaded.key != key:
            return
        message = self._plan_restart(name, key, f"tensor-parallel group lost: {message or 'a rank ended'}",
                                     up_since=loaded.since)
        log.warning("shard %s: %s", name, message)
        self.unload(name)
        self.failed[name] = (key, message)
        shard = self.store.get(("Shard", "", name))
        if shard is not None:
            asyncio.ensure_future(self._report(shard, phase="Failed", message=message))

    def unload(self, name: str) -> None:
        """Stop serving ``name`` now; its thread is joined and its memory freed off the loop."""
        loaded = self.loaded.pop(name, None)
        if loaded is None:
            return
        log.info("unloading shard %s", name)
        try:
            self.stage_server.remove_shard(name)
        except KeyError:
            pass
        joined = loaded.model.close()
        del loaded
        task = asyncio.create_task(self._free(name, joined), name=f"free-shard:{name}")
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)
        self._evict_soon()

    async def _free(self, name: str, joined: concurrent.futures.Future[None]) -> None:
        await asyncio.wrap_future(joined)
        await asyncio.to_thread(_release_memory)  # the loop has dropped its references by now
        log.info("shard %s unloaded: its thread has finished and its memory is freed", name)

    def _drain(self, name: str) -> None:
        if name not in self.draining:
            log.info("shard %s was deleted; serving its %d requests in flight before unloading it",
                     name, self.stage_server.active_requests(name))
            self.draining[name] = asyncio.create_task(self._drain_then_unload(name), name=f"drain-shard:{name}")

    async def _drain_then_unload(self, name: str) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.stage_server.active_requests(name) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        self.draining.pop(name, None)
        if name not in self.mine():
            self.unload(name)

    async def close(self) -> None:
        """Cancel loads and unload everything without waiting for any compute thread."""
        self.restarts.clear()  # a restart timer still pending finds nothing to do
        self.refetches.clear()
        evicting = [self._evicting] if self._evicting is not None else []
        for task in [t for _, t in self.loading.values()] + list(self.draining.values()) + evicting:
            task.cancel()
        await asyncio.gather(*(t for _, t in self.loading.values()), *self.draining.values(), *evicting,
                             return_exceptions=True)
        self.loading.clear()
        self.draining.clear()
        for name in list(self.loaded):
            self.unload(name)

    async def _report_latest(self, name: str, fallback: dict[str, Any], **status: Any) -> None:
        await self._report(self.store.get(("Shard", "", name)) or fallback, **status)

    async def _report(self, shard: dict[str, Any], *, phase: str, progress: float = 0.0, bytes_loaded: int = 0,
                      message: str = "", download: FetchProgress | None = None) -> None:
        """Write the shard's status when it differs from what the store has."""
        if shard["spec"]["nodeName"] != self.node_name:
            return
        status = {"phase": phase, "progress": progress, "bytesLoaded": bytes_loaded, "message": message,
                  "observedGeneration": shard["metadata"].get("generation")}
        if download is not None:
            status |= {"bytesDownloaded": download.done, "bytesToDownload": download.total,
                       "downloadRate": round(max(0.0, download.rate), 1)}
        if phase == "Ready":
            status["dataEndpoint"] = self.data_endpoint
        if shard.get("status") == status:
            return
        try:
            await self.store.submit(make_command("status", ("Shard", "", shard["metadata"]["name"]),
                                                 body={"status": status},
                                                 expected_uid=shard["metadata"].get("uid")))
        except StoreError as error:
            if error.code not in (404, 409):
                raise
        except StoreUnavailable as error:
            log.info("shard %s: status not written (%s); will retry", shard["metadata"]["name"], error)
