"""``ExoNode``: one node of the cluster — config, Raft store, HTTP API and membership routes."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from reconciler.config import NodeConfig
from reconciler.membership import (JoinError, MemberInfo, add_membership_routes, fetch_members,
                                   request_admission)
from reconciler.store.base import StoreUnavailable
from reconciler.store.raft import RaftSettings, RaftStore, load_members

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 60.0


def build_http_app(*, store: RaftStore, config: NodeConfig) -> web.Application:
    """The node's API app (reconciler.server.app) with the membership routes mounted."""
    from reconciler.server.app import create_app
    from reconciler.server.dashboard import add_dashboard_routes

    app = create_app(store=store, token=config.secret, node_name=config.name)
    add_membership_routes(app, store=store, secret=config.secret)
    add_dashboard_routes(app)
    return app


class ExoNode:
    def __init__(self, config: NodeConfig, *, join_timeout: float = JOIN_TIMEOUT) -> None:
        self.config = config
        self.join_timeout = join_timeout
        self.store: RaftStore | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def member_info(self) -> MemberInfo:
        return MemberInfo(self.config.raft_address, self.config.node_id, self.config.api_url)

    async def _partners(self) -> tuple[tuple[str, ...], bool]:
        """(raft partners, already a member). Saved members win over --peers: a restarted node
        rejoins with its journal and is never added twice."""
        config = self.config
        saved = load_members(config.data_dir)
        if saved is not None and config.raft_address in saved:
            return saved, True
        if not config.peers:
            return (), True  # the first node of a new cluster
        deadline = time.monotonic() + self.join_timeout
        document = await fetch_members(config.peers, secret=config.secret, deadline=deadline)
        members = tuple(m["raftAddress"] for m in document.get("members", []))
        if not members:
            raise JoinError(f"--peers {','.join(config.peers)}: the peer reported no raft members")
        return members, config.raft_address in members

    async def start(self) -> None:
        config = self.config
        partners, admitted = await self._partners()
        settings = RaftSettings(self_address=config.raft_address, partners=partners,
                                data_dir=config.data_dir, secret=config.secret,
                                bind_host=None if config.host in ("0.0.0.0", "::") else config.host)
        self.store = store = RaftStore(settings, admitted=admitted)
        if not admitted:
            deadline = time.monotonic() + self.join_timeout
            await request_admission(config.peers, secret=config.secret, info=self.member_info,
                                    deadline=deadline)
            store.mark_admitted()
            log.info("admitted to the cluster as %s", config.raft_address)
        self._tasks.append(asyncio.create_task(self._register_self(), name="exo-register-self"))

        app = build_http_app(store=store, config=config)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.host, config.api_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"--api-port: cannot listen on {config.host}:{config.api_port}: {exc.strerror}") from None
        log.info("ready: node %s (id %s) serving the API at http://%s:%d, raft %s, members %s",
                 config.name, config.node_id, config.host, config.api_port, config.raft_address,
                 ",".join(sorted({config.raft_address, *partners})))

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
        if self._runner is not None:
            await self._runner.cleanup()
        if self.store is not None:
            await self.store.close()
