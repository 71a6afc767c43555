"""The shard agent (on every node): loads the Shards assigned to this node, serves them on the
node's stage server, reports their phase, and unloads the ones that are no longer its own.

Weights are read on each shard's own MLX compute thread, layer by layer with progress; the event
loop only schedules and writes status, and never waits for a thread: a cancelled load or an
unloaded shard is joined off the loop and its memory handed back when its thread finishes. A
deleted shard that still has requests in flight keeps serving them (at most DRAIN_SECONDS) while
the router already sends new ones elsewhere, so a re-placement interrupts nothing. A shard is
reloaded only when what it holds changes (model, dtype or layer range), not when unrelated fields
of its spec do.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from reconciler.controllers.manager import Controller
from reconciler.datapath.stage import StageServer
from reconciler.runtime.model_files import ModelFilesError, local_model_path
from reconciler.runtime.shard_model import ShardLoadError, ShardModel, open_shard
from reconciler.store.base import Store, StoreError, StoreUnavailable, make_command

log = logging.getLogger(__name__)
PROGRESS_STEP = 0.25   # report Loading progress in steps this big (each report is a Raft write)
DRAIN_SECONDS = 60.0   # a deleted shard serves its requests in flight at most this long
DRAIN_POLL_SECONDS = 0.25

LoadKey = tuple[str, str | None, int, int, str | None]  # source, revision, start, end, dtype
Loader = Callable[..., Awaitable[ShardModel]]


def _release_memory() -> None:
    gc.collect()
    mx.clear_cache()  # hand the freed buffers back to the system


def load_key(shard: dict[str, Any]) -> LoadKey:
    spec = shard["spec"]
    return (spec["model"]["source"], spec["model"].get("revision"), spec["layers"]["start"], spec["layers"]["end"],
            spec["model"].get("dtype"))


@dataclass
class Loaded:
    key: LoadKey
    model: ShardModel


class ShardAgent(Controller):
    name = "shard-agent"
    watches = ("Shard",)
    resync_seconds = 10.0

    def __init__(self, *, store: Store, node_name: str, stage_server: StageServer, data_endpoint: str,
                 loader: Loader = open_shard, metrics: Any = None,
                 resolve_path: Callable[..., Path] = local_model_path) -> None:
        self.store, self.node_name = store, node_name
        self.stage_server, self.data_endpoint = stage_server, data_endpoint
        self.loader, self.metrics, self.resolve_path = loader, metrics, resolve_path
        self.loaded: dict[str, Loaded] = {}
        self.loading: dict[str, tuple[LoadKey, asyncio.Task[None]]] = {}
        self.failed: dict[str, tuple[LoadKey, str]] = {}
        self.draining: dict[str, asyncio.Task[None]] = {}
        self._reaping: set[asyncio.Task[None]] = set()

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
            if name not in mine or load_key(mine[name]) != self.failed[name][0]:
                del self.failed[name]
        for name, shard in mine.items():
            if name in self.loaded:
                self.stage_server.set_request_limit(name, shard["spec"].get("maxRequests"))
                await self._report(shard, phase="Ready", progress=1.0, bytes_loaded=self.loaded[name].model.nbytes)
            elif name in self.failed:
                await self._report(shard, phase="Failed", message=self.failed[name][1])
            elif name not in self.loading:
                task = asyncio.create_task(self._load(name, shard), name=f"load-shard:{name}")
                self.loading[name] = (load_key(shard), task)

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
            await self._report(shard, phase="Loading", progress=0.0)
            path = await asyncio.to_thread(self.resolve_path, key[0], revision=key[1])
            log.info("loading shard %s: layers %d-%d of %s", name, key[2], key[3] - 1, path)
            model = await self.loader(path, start=key[2], end=key[3], progress=on_progress, dtype=key[4])
        except asyncio.CancelledError:
            log.info("shard %s: load cancelled (its thread stops at the next layer)", name)
            raise
        except Exception as error:  # noqa: BLE001 — MLX reports unreadable weights as RuntimeError
            expected = isinstance(error, (ModelFilesError, ShardLoadError, OSError, ValueError, RuntimeError))
            message = str(error) if expected else f"{type(error).__name__}: {error}"
            log.warning("shard %s failed to load: %s", name, message, exc_info=not expected)
            self.loading.pop(name, None)
            self.failed[name] = (key, message)
            await self._report_latest(name, shard, phase="Failed", message=message)
            return
        if self.loading.get(name, (None,))[0] != key:  # reassigned while we were loading
            model.close()
            return
        self.loading.pop(name)
        self.stage_server.add_shard(name, model, max_requests=(self.store.get(("Shard", "", name)) or shard)["spec"]
                                    .get("maxRequests"))
        self.loaded[name] = Loaded(key, model)
        seconds = time.monotonic() - started
        log.info("shard %s ready: %.1f MiB in %.2fs", name, model.nbytes / 2**20, seconds)
        if self.metrics is not None:
            self.metrics.shard_load_seconds.labels(shard["spec"]["deployment"]).observe(seconds)
        await self._report_latest(name, shard, phase="Ready", progress=1.0, bytes_loaded=model.nbytes)

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
        for task in [t for _, t in self.loading.values()] + list(self.draining.values()):
            task.cancel()
        await asyncio.gather(*(t for _, t in self.loading.values()), *self.draining.values(),
                             return_exceptions=True)
        self.loading.clear()
        self.draining.clear()
        for name in list(self.loaded):
            self.unload(name)

    async def _report_latest(self, name: str, fallback: dict[str, Any], **status: Any) -> None:
        await self._report(self.store.get(("Shard", "", name)) or fallback, **status)

    async def _report(self, shard: dict[str, Any], *, phase: str, progress: float = 0.0, bytes_loaded: int = 0,
                      message: str = "") -> None:
        """Write the shard's status when it differs from what the store has."""
        if shard["spec"]["nodeName"] != self.node_name:
            return
        status = {"phase": phase, "progress": progress, "bytesLoaded": bytes_loaded, "message": message,
                  "observedGeneration": shard["metadata"].get("generation")}
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
