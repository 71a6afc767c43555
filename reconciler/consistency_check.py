"""The periodic replica consistency check (see reconciler/store/consistency.py for the rule).

Every ``interval`` seconds each node fetches its peers' checkpoint digests from
``/internal/v1/consistency`` (the member proof as bearer token) and judges itself: a node whose
digest differs from the majority's stops serving and re-syncs from the leader
(``RaftStore.resync``). The leader also records each Node's ``ReplicaConsistent`` condition.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
import time

import aiohttp
from aiohttp import web

from exo_ctl.api.status import status_object
from reconciler.server.auth import is_admin
from reconciler.store.base import StoreError, StoreUnavailable, make_command, utcnow_iso
from reconciler.store.consistency import Verdict, judge
from reconciler.store.raft import RaftStore

log = logging.getLogger(__name__)

CONSISTENCY_PATH = "/internal/v1/consistency"
CHECK_INTERVAL_S = 5.0
CONDITION = "ReplicaConsistent"


def add_consistency_routes(app: web.Application, *, store: RaftStore, secret: str) -> None:
    async def get_digests(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {secret}".encode()) and not is_admin(request):
            return web.json_response(status_object(401, "missing or wrong bearer token"), status=401)
        digests = store.checkpoint_digests()  # a digest is a fact about a revision, ready or not
        return web.json_response({"raftAddress": store.self_address,
                                  "checkpoints": {str(rev): digest for rev, digest in sorted(digests.items())}})

    app.router.add_get(CONSISTENCY_PATH, get_digests)


class ConsistencyChecker:
    """Runs the check on this node; ``last`` is the latest verdict, ``cost_s`` what it took."""

    def __init__(self, *, store: RaftStore, secret: str, node_name: str, interval: float = CHECK_INTERVAL_S,
                 client_ssl: ssl.SSLContext | None = None) -> None:
        self.store, self.secret, self.interval, self.node_name = store, secret, interval, node_name
        self.client_ssl = client_ssl  # trusts the cluster CA, for members that serve HTTPS
        self._unreported: Verdict | None = None  # a divergence this node repaired, not yet on its Node
        self.last: Verdict | None = None
        self.checks = 0
        self.cost_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="exo-consistency-check")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        # aiohttp, not exo_ctl.http: node-to-node calls inside the event loop must not block it
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0),
                                         connector=aiohttp.TCPConnector(ssl=self.client_ssl or True)) as session:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.check(session)
                except (StoreUnavailable, StoreError) as exc:
                    log.debug("consistency check: %s", exc)
                except Exception:
                    log.exception("consistency check failed")

    async def _fetch(self, session: aiohttp.ClientSession, url: str) -> dict[int, str] | None:
        try:
            async with session.get(url + CONSISTENCY_PATH, headers={"Authorization": f"Bearer {self.secret}"}) as resp:
                if resp.status != 200:
                    return None
                doc = await resp.json()
            return {int(rev): str(digest) for rev, digest in doc["checkpoints"].items()}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
            return None

    async def check(self, session: aiohttp.ClientSession) -> Verdict | None:
        store = self.store
        if store.unready_reason() is not None:
            return None  # a node without quorum, behind or re-syncing has nothing to compare yet
        if self._unreported is not None:
            await self._report_repair(self._unreported)
        started = time.perf_counter()
        directory, me = store.directory, store.self_address
        peers = [m for m in store.members if m != me and directory.get(m, {}).get("apiUrl")]
        answers = await asyncio.gather(*(self._fetch(session, directory[m]["apiUrl"]) for m in peers))
        own = store.checkpoint_digests()
        verdict = judge(own, {m: a for m, a in zip(peers, answers) if a is not None}, members=len(store.members))
        self.cost_s, self.last = time.perf_counter() - started, verdict
        self.checks += 1
        if verdict.agrees is False:
            self._unreported = verdict
            await store.resync(verdict.message)
        elif verdict.agrees and store.is_leader:
            await self._record_conditions(verdict)
        return verdict

    async def _report_repair(self, verdict: Verdict) -> None:
        """Once re-synced and serving again, say on this node's own Node what happened."""
        key = ("Node", "", self.node_name)
        node = self.store.get(key)
        if node is None:
            return
        status = dict(node.get("status") or {})
        status["conditions"] = [c for c in status.get("conditions", []) if c.get("type") != CONDITION] + [{
            "type": CONDITION, "status": "True", "reason": "Resynced", "lastTransitionTime": utcnow_iso(),
            "message": f"re-synced from the leader after a divergence: {verdict.message}"}]
        await self.store.submit(make_command("status", key, body={"status": status},
                                             expected_rv=node["metadata"]["resourceVersion"]))
        self._unreported = None

    async def _record_conditions(self, verdict: Verdict) -> None:
        """On the leader: ReplicaConsistent on every Node whose replica the comparison covered."""
        store = self.store
        for node in store.list("Node")[0]:
            spec = node.get("spec", {})
            address = f"{spec.get('address')}:{spec.get('raftPort')}"
            if address not in verdict.diverged_peers + verdict.agreeing_peers + (store.self_address,):
                continue
            diverged = address in verdict.diverged_peers
            status = dict(node.get("status") or {})
            current = next((c for c in status.get("conditions", []) if c.get("type") == CONDITION), {})
            wanted = "False" if diverged else "True"
            if current.get("status") == wanted:
                continue
            message = (f"its state differs from the majority's at revision {verdict.revision}; it re-syncs from "
                       "the leader" if diverged else f"its state matches the majority's at revision {verdict.revision}")
            status["conditions"] = [c for c in status.get("conditions", []) if c.get("type") != CONDITION] + [{
                "type": CONDITION, "status": wanted, "reason": "Diverged" if diverged else "DigestsMatch",
                "message": message, "lastTransitionTime": utcnow_iso()}]
            if diverged:
                log.error("replica of node %s diverged: %s", node["metadata"]["name"], message)
            try:
                await store.submit(make_command("status", ("Node", "", node["metadata"]["name"]), body={"status": status},
                                                expected_rv=node["metadata"]["resourceVersion"]))
            except StoreError as error:
                if error.code not in (404, 409):
                    raise
