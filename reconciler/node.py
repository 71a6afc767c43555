"""``ExoNode``: one node of the cluster. It forms or joins the Raft cluster, then runs the node's
services: the HTTP API (control plane, OpenAI API, dashboard, metrics), the stage server of the
data path, node registration, and the controllers."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from reconciler import formation
from reconciler.config import NodeConfig
from reconciler.controllers.manager import ControllerManager
from reconciler.controllers.node_lifecycle import NodeLifecycleController
from reconciler.controllers.node_registration import NodeIdentity, NodeRegistrar
from reconciler.controllers.scheduler import SchedulerController
from reconciler.controllers.shard_agent import ShardAgent
from reconciler.datapath.stage import StageServer
from reconciler.inference.cluster import ClusterBackend
from reconciler.membership import MemberInfo, add_membership_routes
from reconciler.metrics import NodeMetrics
from reconciler.store.base import StoreUnavailable
from reconciler.store.raft import RaftStore

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 60.0


def exo_version() -> str:
    try:
        return version("exoctl")
    except PackageNotFoundError:
        return "0.0.0"


def data_path_token(secret: str) -> str:
    """What stage connections present in their HELLO: derived from the cluster secret, so the
    data port serves only members of this cluster and never sees the secret itself."""
    return hmac.new(secret.encode(), b"exo-data-path-v1", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class NodeOptions:
    """What a node advertises and how the cluster judges it (flags beyond the config)."""
    memory: int | None = None               # --memory: advertised memory instead of the real one
    labels: dict[str, str] = field(default_factory=dict)
    node_timeout: float = 3.0               # lease age after which a node is NotReady
    node_grace: float = 600.0               # silence after which a node leaves Raft membership
    discovery: bool = True
    interface: str | None = None            # where mDNS announces (default: the advertised host)


class ExoNode:
    def __init__(self, config: NodeConfig, options: NodeOptions | None = None, *,
                 join_timeout: float = JOIN_TIMEOUT) -> None:
        self.config = config
        self.options = options or NodeOptions()
        self.join_timeout = join_timeout
        self.store: RaftStore | None = None
        self.metrics = NodeMetrics(node=config.name)
        self.stage_server: StageServer | None = None
        self.shard_agent: ShardAgent | None = None
        self.backend: ClusterBackend | None = None
        self.lifecycle: NodeLifecycleController | None = None
        self._runner: web.AppRunner | None = None
        self._registrar: NodeRegistrar | None = None
        self._controllers: ControllerManager | None = None
        self._tasks: list[asyncio.Task[Any]] = []

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

        app = create_app(store=store, token=self.config.secret, node_name=self.config.name)
        add_membership_routes(app, store=store, secret=self.config.secret)
        add_dashboard_routes(app, metrics=self.metrics)
        add_openai_routes(app, backend=backend, metrics=self.metrics)
        add_metrics_routes(app, metrics=self.metrics, token=self.config.secret)
        add_datapath_routes(app, stage_server=stage_server)
        install_node_metrics(self.metrics, app=app, pipeline=backend.client, sources=StateSources(
            store=store, node_name=self.config.name, lease_ages=lambda: self.lifecycle.lease_ages if self.lifecycle else {},
            queue_depth=lambda: self._controllers.queue_depth() if self._controllers else 0))
        return app

    async def start(self) -> None:
        config, options = self.config, self.options
        self.store = store = await self._form_cluster()
        self._tasks.append(asyncio.create_task(self._register_self(), name="exo-register-self"))

        data_token = data_path_token(config.secret)
        self.stage_server = StageServer(host=config.host, port=config.data_port, token=data_token)
        try:
            await self.stage_server.start()
        except OSError as exc:
            raise OSError(f"data port: cannot listen on {config.host}:{config.data_port} "
                          f"(--api-port + 2): {exc.strerror}") from None

        self.backend = ClusterBackend(store=store, data_token=data_token)
        app = self.build_http_app(store, stage_server=self.stage_server, backend=self.backend)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.host, config.api_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"--api-port: cannot listen on {config.host}:{config.api_port}: {exc.strerror}") from None

        identity = NodeIdentity(name=config.name, node_id=config.node_id, address=config.advertise_host,
                                api_port=config.api_port, raft_port=config.raft_port, data_port=config.data_port,
                                labels=dict(options.labels), memory_override=options.memory, version=exo_version())
        self._registrar = NodeRegistrar(store=store, identity=identity)
        self._registrar.start()
        self.lifecycle = NodeLifecycleController(
            store=store, node_name=config.name, timeout=options.node_timeout, grace=options.node_grace,
            remove_member=store.remove_member, raft_members=lambda: len(store.members))
        self.shard_agent = ShardAgent(store=store, node_name=config.name, stage_server=self.stage_server,
                                      data_endpoint=f"{config.advertise_host}:{config.data_port}",
                                      metrics=self.metrics)
        self._controllers = ControllerManager(
            store=store, controllers=[self.lifecycle, SchedulerController(store=store), self.shard_agent],
            observer=self.metrics.observe_reconcile)
        self._controllers.start()
        log.info("ready: node %s (id %s) serving the API at http://%s:%d, raft %s, data port %d, members %s",
                 config.name, config.node_id, config.host, config.api_port, config.raft_address,
                 config.data_port, ",".join(sorted({config.raft_address, *store.members})))

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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._controllers is not None:
            await self._controllers.stop()
        if self._registrar is not None:
            await self._registrar.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.backend is not None:
            await self.backend.close()
        if self.shard_agent is not None:
            await self.shard_agent.close()
        if self.stage_server is not None:
            await self.stage_server.stop()
        if self.store is not None:
            await self.store.close()
