"""``ExoNode``: one node of the cluster. It forms or joins the Raft cluster, then runs the node's
services: the HTTP API (control plane, OpenAI API, dashboard, metrics), the stage server of the
data path, node registration, and the controllers."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from aiohttp import web

from reconciler import formation
from reconciler import tls as cluster_tls
from reconciler.cluster_keys import cluster_keys
from reconciler.config import MODEL_CACHE_DIR, NodeConfig
from reconciler.controllers.manager import ControllerManager
from reconciler.controllers.model_info import DEFAULT_RETENTION_SECONDS, ModelInfoCollector, ModelInfoPublisher
from reconciler.controllers.node_lifecycle import NodeLifecycleController
from reconciler.controllers.node_registration import NodeIdentity, NodeRegistrar
from reconciler.controllers.scheduler import SchedulerController
from exo_ctl.api.resources import NodeCompute
from reconciler.controllers.shard_agent import ShardAgent
from reconciler.datapath.stage import StageServer
from reconciler.inference.cluster import ClusterBackend
from reconciler.consistency_check import ConsistencyChecker, add_consistency_routes
from reconciler.membership import MemberInfo, add_membership_routes
from reconciler.metrics import NodeMetrics
from reconciler.runtime.cpu_profile import loader_in, tensor_loader_in
from reconciler.runtime.shard_model import open_shard
from reconciler.runtime.tensor_shard import open_tensor_shard
from reconciler.store.base import StoreUnavailable
from reconciler.store.raft import RaftStore
from reconciler.weights.peer import WeightServer
from reconciler.weights.store import ModelCache
from reconciler.weights.supply import WeightSupply

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 60.0
STOP_BUDGET_S = 3.5  # ExoNode.stop() as a whole (reconciler.main ends the process 4.5 s after SIGTERM)
HTTP_SHUTDOWN_TIMEOUT_S = 1.0  # how long stop() lets HTTP handlers finish (aiohttp's default: 60 s)


def exo_version() -> str:
    try:
        return version("exoctl")
    except PackageNotFoundError:
        return "0.0.0"


def data_path_token(secret: str) -> str:
    """What stage connections present in their HELLO: derived from the cluster secret (HKDF,
    its own label), so the data port serves only members and never sees the secret itself."""
    return cluster_keys(secret).data_path


@dataclass(frozen=True)
class NodeOptions:
    """What a node advertises and how the cluster judges it (flags beyond the config)."""
    memory: int | None = None               # --memory: advertised memory instead of the real one
    labels: dict[str, str] = field(default_factory=dict)
    node_timeout: float = 3.0               # lease age after which a node is NotReady
    node_grace: float = 600.0               # silence after which a node leaves Raft membership
    discovery: bool = True
    interface: str | None = None            # where mDNS announces (default: the advertised host)
    request_idle_timeout: float = 60.0      # a request with no progress for this long fails
    prefill_chunk: int = 128                # --prefill-chunk: prompt tokens per prefill step
    max_batch_size: int = 8                 # --max-batch-size: decode steps a stage runs as one forward
    max_concurrent_requests: int = 8        # --max-concurrent-requests: generating at once on this entry node
    max_queued_requests: int = 32           # --max-queued-requests: waiting for a slot; beyond: 429
    compute: NodeCompute = field(default_factory=NodeCompute)  # --compute-dtype: measured at start
    cors_origins: tuple[str, ...] = ()      # --cors-origin: browser origins besides the API's own
    model_cache: Path | None = None         # --model-cache: default <data-dir>/models
    model_cache_size: int | None = None     # --model-cache-size: bytes the model cache holds at most (None: no limit)
    weights_serve_rate: int = 256 << 20     # --weights-serve-rate: bytes/s served to peers at most
    weights_fetch_parallel: int = 4         # --weights-fetch-parallel: ranges fetched at once
    model_info_retention: float = DEFAULT_RETENTION_SECONDS  # --model-info-retention: unreferenced ModelInfo kept


class ExoNode:
    def __init__(self, config: NodeConfig, options: NodeOptions | None = None, *,
                 join_timeout: float = JOIN_TIMEOUT) -> None:
        self.config = config
        self.options = options or NodeOptions()
        self.join_timeout = join_timeout
        self.store: RaftStore | None = None
        self.metrics = NodeMetrics(node=config.name)
        self.stage_server: StageServer | None = None
        self.supply: WeightSupply | None = None
        self.weight_server: WeightServer | None = None
        self.shard_agent: ShardAgent | None = None
        self.backend: ClusterBackend | None = None
        self.lifecycle: NodeLifecycleController | None = None
        self._runner: web.AppRunner | None = None
        self._registrar: NodeRegistrar | None = None
        self._controllers: ControllerManager | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.consistency: ConsistencyChecker | None = None
        self.certificate: cluster_tls.NodeCertificate | None = None  # from the cluster CA, when TLS is used

    @property
    def member_info(self) -> MemberInfo:
        return MemberInfo(self.config.raft_address, self.config.node_id, self.config.api_url)

    # -- forming or joining the cluster --
    async def _partners(self) -> tuple[tuple[str, ...], bool]:
        """(raft partners, already a member) from saved members or --peers (see formation)."""
        return await formation.known_partners(self.config, join_timeout=self.join_timeout)

    async def _form_cluster(self) -> RaftStore:
        """Rejoin, join via --peers, discover over mDNS or bootstrap (reconciler.formation);
        with discovery on, keep announcing this node (formed, leader hint) until it stops."""
        formed = await formation.form_cluster(
            self.config, discovery=self.options.discovery, interface=self.options.interface,
            version=exo_version(), join_timeout=self.join_timeout)
        if formed.discovery is not None:
            self._tasks.append(asyncio.create_task(
                formation.keep_announcing(formed.discovery, formed.store), name="exo-mdns-announce"))
        return formed.store

    # -- services --
    def build_http_app(self, store: RaftStore, *, stage_server: StageServer,
                       backend: ClusterBackend) -> web.Application:
        """One app on the API port: control plane, membership, OpenAI API, dashboard, metrics."""
        from reconciler.observability import StateSources, install_node_metrics
        from reconciler.server.app import create_app
        from reconciler.server.dashboard import add_dashboard_routes
        from reconciler.server.datapath_status import add_datapath_routes
        from reconciler.server.metrics_routes import add_metrics_routes
        from reconciler.server.openai_api import add_openai_routes
        from reconciler.server.openapi import add_openapi_route

        from reconciler.server.cors import cors_middleware

        app = create_app(store=store, token=self.config.secret, node_name=self.config.name)
        app.middlewares.insert(0, cors_middleware(self.options.cors_origins))
        client_ssl = self.certificate.client if self.certificate is not None else None
        add_membership_routes(app, store=store, secret=self.config.keys.member, client_ssl=client_ssl)
        add_consistency_routes(app, store=store, secret=self.config.keys.member)
        add_dashboard_routes(app, metrics=self.metrics)
        add_openai_routes(app, backend=backend, metrics=self.metrics,
                          max_concurrent=self.options.max_concurrent_requests,
                          max_queued=self.options.max_queued_requests)
        add_metrics_routes(app, metrics=self.metrics, token=self.config.secret)
        add_datapath_routes(app, stage_server=stage_server)
        add_openapi_route(app)
        install_node_metrics(self.metrics, app=app, pipeline=backend.client, sources=StateSources(
            store=store, node_name=self.config.name, lease_ages=lambda: self.lifecycle.lease_ages if self.lifecycle else {},
            queue_depth=lambda: self._controllers.queue_depth() if self._controllers else 0))
        return app

    async def start(self) -> None:
        config, options = self.config, self.options
        self.store = store = await self._form_cluster()
        self._tasks.append(asyncio.create_task(formation.readmit_if_removed(config, store), name="exo-readmit"))
        self._tasks.append(asyncio.create_task(self._register_self(), name="exo-register-self"))

        # TLS from the cluster CA: HTTPS on the API port (--tls), and stage traffic off loopback.
        encrypt_data = not cluster_tls.is_loopback(config.advertise_host)
        if config.https or encrypt_data:
            self.certificate = await cluster_tls.node_certificate(store, config=config, timeout_s=self.join_timeout)
            self._tasks.append(asyncio.create_task(cluster_tls.follow_replicated_ca(
                store, config=config, certificate=self.certificate), name="exo-cluster-ca"))
        data_tls = self.certificate.data_path() if self.certificate is not None else None
        data_token = config.keys.data_path
        # One model cache per node: the supply fills it for this node's shards, the server lends
        # what it holds (and the node's own copies) to the other members over the data port.
        cache = ModelCache(options.model_cache or config.data_dir / MODEL_CACHE_DIR,
                           limit_bytes=options.model_cache_size)
        self.supply = WeightSupply(node_name=config.name, cache=cache, store=store, data_token=data_token, tls=data_tls,
                                   hub=_hub_reader(), metrics=self.metrics, parallel=options.weights_fetch_parallel)
        self.weight_server = WeightServer(cache=cache, originals=self.supply.originals, store=store,
                                          rate_bytes_per_s=options.weights_serve_rate, metrics=self.metrics)
        self.metrics.watch_model_cache(cache.cached)
        self.stage_server = StageServer(host=config.host, port=config.data_port, token=data_token,
                                        tls=data_tls if encrypt_data else None, max_batch_size=options.max_batch_size,
                                        weights=self.weight_server)
        self.stage_server.step_observer = self.metrics.observe_stage_step
        self.metrics.watch_stage_requests(self.stage_server.requests_per_shard)
        try:
            await self.stage_server.start()
        except OSError as exc:
            raise OSError(f"data port: cannot listen on {config.host}:{config.data_port} "
                          f"(--api-port + 2): {exc.strerror}") from None

        self.backend = ClusterBackend(store=store, data_token=data_token,
                                      idle_timeout_s=options.request_idle_timeout,
                                      prefill_chunk=options.prefill_chunk, data_tls=data_tls, supply=self.supply)
        app = self.build_http_app(store, stage_server=self.stage_server, backend=self.backend)
        # handler_cancellation: a client that disconnects cancels its handler (frees its generation)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True,
                                     shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.host, config.api_port, reuse_address=True,
                           ssl_context=self.certificate.server if config.https and self.certificate else None)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"--api-port: cannot listen on {config.host}:{config.api_port}: {exc.strerror}") from None

        identity = NodeIdentity(name=config.name, node_id=config.node_id, address=config.advertise_host,
                                api_port=config.api_port, raft_port=config.raft_port, data_port=config.data_port,
                                api_scheme="https" if config.https else "http",
                                labels=dict(options.labels), memory_override=options.memory, version=exo_version(),
                                compute=options.compute.model_dump())
        self._registrar = NodeRegistrar(store=store, identity=identity, cached_models=self.supply.cached_models)
        self._registrar.start()
        self.lifecycle = NodeLifecycleController(
            store=store, node_name=config.name, timeout=options.node_timeout, grace=options.node_grace,
            remove_member=store.remove_member, raft_members=lambda: len(store.members))
        self.shard_agent = ShardAgent(store=store, node_name=config.name, stage_server=self.stage_server,
                                      data_endpoint=f"{config.advertise_host}:{config.data_port}",
                                      metrics=self.metrics, loader=loader_in(options.compute.dtype, open_shard),
                                      data_token=data_token, supply=self.supply,
                                      tensor_loader=tensor_loader_in(open_tensor_shard))
        self._controllers = ControllerManager(
            store=store, controllers=[self.lifecycle, SchedulerController(store=store, node_name=config.name),
                                      self.shard_agent, ModelInfoPublisher(store=store, node_name=config.name),
                                      ModelInfoCollector(store=store, retention=options.model_info_retention)],
            observer=self.metrics.observe_reconcile)
        self._controllers.start()
        self.consistency = ConsistencyChecker(store=store, secret=config.keys.member, node_name=config.name,
                                              client_ssl=self.certificate.client if self.certificate else None)
        self.consistency.start()
        if config.secret_generated:   # a new cluster: clients get role tokens, never the secret
            from reconciler.server.auth_tokens import mint_first_tokens
            self._tasks.append(asyncio.create_task(mint_first_tokens(store, config.data_dir), name="exo-first-tokens"))
        log.info("ready: node %s (id %s) serving the API at %s://%s:%d, raft %s, data port %d%s, members %s",
                 config.name, config.node_id, "https" if config.https else "http", config.host, config.api_port,
                 config.raft_address, config.data_port, " (TLS)" if encrypt_data else "",
                 ",".join(sorted({config.raft_address, *store.members})))
        if config.https and self.certificate is not None:
            log.info("cluster CA for HTTPS clients (openai/httpx: verify=ssl.create_default_context(cafile=PATH), "
                     "or SSL_CERT_FILE=PATH): %s", self.certificate.ca_path)

    async def _register_self(self) -> None:
        """Keep this node's id and API URL in the replicated directory (once, when it changes)."""
        store = self.store
        assert store is not None
        info = self.member_info.to_json()
        expected = {k: v for k, v in info.items() if k != "raftAddress"}
        delay = 0.2
        while store.directory.get(self.config.raft_address) != expected:
            if store.has_quorum:
                try:
                    await store.register_member(info)
                    continue
                except StoreUnavailable as exc:
                    log.debug("registering self: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def stop(self) -> None:
        """Stop within STOP_BUDGET_S whatever hangs. In-flight work fails first (this node's
        clients get an error saying it is shutting down; requests through its stages fail at
        their entry), then the API port closes, then the rest. Each step is bounded; one cut
        short is logged and the next one runs."""
        steps = _StopSteps(budget_s=STOP_BUDGET_S)
        await steps.run("in-flight requests", self._fail_in_flight(), at_most_s=1.0)
        if self._runner is not None:  # handlers have their errors by now; watch streams end here
            await steps.run("HTTP server", self._runner.cleanup(), at_most_s=2 * HTTP_SHUTDOWN_TIMEOUT_S + 0.5)
        for task in self._tasks:
            task.cancel()
        await steps.run("background tasks", asyncio.gather(*self._tasks, return_exceptions=True), at_most_s=1.0)
        if self._controllers is not None:
            await steps.run("controllers", self._controllers.stop(), at_most_s=0.5)
        if self.consistency is not None:
            await steps.run("consistency check", self.consistency.stop(), at_most_s=0.5)
        if self._registrar is not None:
            await steps.run("node registration", self._registrar.stop(), at_most_s=0.5)
        if self.shard_agent is not None:
            await steps.run("shard unloads", self.shard_agent.close(), at_most_s=1.0)
        if self.supply is not None and self.weight_server is not None:
            await steps.run("weight transfers", asyncio.gather(self.supply.close(), self.weight_server.close()),
                            at_most_s=0.5)
        if self.store is not None:
            await steps.run("Raft store", self.store.close(), at_most_s=1.0)
        log.info("stopped in %.2fs", steps.elapsed())

    async def _fail_in_flight(self) -> None:
        parts = []
        if self.backend is not None:
            parts.append(self.backend.close())
        if self.stage_server is not None:
            parts.append(self.stage_server.stop())
        await asyncio.gather(*parts)


def _hub_reader() -> Any:
    """What reads weights off the Hugging Face hub for this node, unless it must stay offline."""
    from reconciler.models.hub import HubReader, hub_usable

    return HubReader() if hub_usable() else None


class _StopSteps:
    """The steps of ExoNode.stop() within one time budget; a step cut short is logged, not raised."""

    def __init__(self, *, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._deadline = self._started + budget_s

    def elapsed(self) -> float:
        return self._clock() - self._started

    async def run(self, step: str, work: Awaitable[Any], *, at_most_s: float) -> None:
        timeout = max(0.05, min(at_most_s, self._deadline - self._clock()))
        began = self._clock()
        try:
            await asyncio.wait_for(work, timeout)
        except asyncio.TimeoutError:
            log.warning("shutdown: %s cut short after %.2fs", step, timeout)
            return
        except Exception:  # noqa: BLE001 — one failing part must not keep the rest running
            log.exception("shutdown: %s failed", step)
            return
        took = self._clock() - began
        if took > timeout + 0.1:  # finished, but blocked the event loop past its bound
            log.warning("shutdown: %s took %.2fs (bound %.2fs)", step, took, timeout)
