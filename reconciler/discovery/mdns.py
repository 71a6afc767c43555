"""Zero-config discovery: announce this node as ``_exo._tcp.local.`` and browse for the others.

mDNS only finds *candidates*. It never decides that a peer is dead: python-zeroconf clamps PTR
TTLs, so a kill -9'd peer stays visible for ~19 minutes. Liveness is judged through Raft.

A node announces and listens only on the IPv4 addresses it is given: with
``interfaces=["127.0.0.1"]`` nothing is ever multicast on another interface.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from zeroconf import DNSQuestionType, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_exo._tcp.local."
TXT_VERSION = "1"
RESOLVE_ATTEMPTS = 5
# Linux <linux/in.h>; Python's socket module does not export it.
IP_MULTICAST_ALL = 49

# Announcement field -> TXT key (short keys keep every TXT string far below 255 bytes).
_TXT_KEYS = {
    "cluster_id": "cid", "node_id": "nid", "node_name": "name", "address": "addr",
    "api_port": "api", "raft_port": "raft", "version": "ver", "formed": "formed",
    "leader": "leader",
}
_BOOL_FIELDS = ("formed", "leader")


class AnnouncementError(ValueError):
    """A TXT record that is not a valid exo announcement; the message names the TXT key."""


def cluster_id_from_secret(secret: str) -> str:
    """A short public id for the cluster, derived from its secret with HMAC-SHA-256.

    Nodes with the same secret announce the same id; the id does not reveal the secret."""
    if not secret:
        raise ValueError("cluster secret: must not be empty")
    return hmac.new(secret.encode(), b"exo/cluster-id/v1", hashlib.sha256).hexdigest()[:16]


class Announcement(BaseModel):
    """What a node tells the LAN about itself, carried in its mDNS TXT record."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cluster_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    node_id: str
    node_name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    address: str
    api_port: int = Field(ge=1, le=65535)
    raft_port: int = Field(ge=1, le=65535)
    version: str = Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")
    # True once this node is a member of a formed Raft cluster (or is forming one right now).
    formed: bool = False
    # A hint only: this node believed it was the Raft leader when it last announced.
    leader: bool = False

    @field_validator("node_id")
    @classmethod
    def _canonical_uuid(cls, value: str) -> str:
        try:
            canonical = str(uuid.UUID(value))
        except ValueError:
            raise ValueError(f"must be a UUID, got {value!r}") from None
        if canonical != value:
            raise ValueError(f"must be a lowercase canonical UUID ({canonical}), got {value!r}")
        return value

    @field_validator("address")
    @classmethod
    def _ipv4_address(cls, value: str) -> str:
        return _ipv4_unicast(value)

    @property
    def api_address(self) -> str:
        return f"{self.address}:{self.api_port}"

    @property
    def raft_address(self) -> str:
        return f"{self.address}:{self.raft_port}"

    def to_txt(self) -> dict[str, str]:
        txt = {"txtvers": TXT_VERSION}
        for field, key in _TXT_KEYS.items():
            value = getattr(self, field)
            txt[key] = ("1" if value else "0") if field in _BOOL_FIELDS else str(value)
        return txt

    @classmethod
    def from_txt(cls, properties: Mapping[str | bytes, str | bytes | None]) -> Announcement:
        """Parse a TXT record (bytes or str keys and values); unknown keys are ignored."""
        txt = {_text(k, "key"): (None if v is None else _text(v, f"value of {_text(k, 'key')!r}"))
               for k, v in properties.items()}
        if txt.get("txtvers") != TXT_VERSION:
            raise AnnouncementError(f"TXT 'txtvers': expected {TXT_VERSION!r}, got {txt.get('txtvers')!r}")
        values: dict[str, object] = {}
        for field, key in _TXT_KEYS.items():
            raw = txt.get(key)
            if raw is None:
                raise AnnouncementError(f"TXT {key!r} ({field}): missing")
            if field in _BOOL_FIELDS:
                if raw not in ("0", "1"):
                    raise AnnouncementError(f"TXT {key!r} ({field}): must be 0 or 1, got {raw!r}")
                values[field] = raw == "1"
            elif field.endswith("_port"):
                if not raw.isdigit():
                    raise AnnouncementError(f"TXT {key!r} ({field}): must be a port number, got {raw!r}")
                values[field] = int(raw)
            else:
                values[field] = raw
        try:
            return cls(**values)
        except ValidationError as error:
            first = error.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "?"
            raise AnnouncementError(
                f"TXT {_TXT_KEYS.get(field, field)!r} ({field}): {first['msg']}") from None


def _text(value: str | bytes, what: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise AnnouncementError(f"TXT {what}: not UTF-8") from None


def _ipv4_unicast(value: str) -> str:
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"must be an IPv4 address, got {value!r}") from None
    if address.is_unspecified or address.is_multicast:
        raise ValueError(f"must be a unicast IPv4 address, got {value!r}")
    return str(address)


def validate_interfaces(interfaces: list[str]) -> tuple[str, ...]:
    """The interface addresses discovery may use: IPv4 unicast only, at least one."""
    if not interfaces:
        raise ValueError("interfaces: give at least one IPv4 address to announce on, e.g. 127.0.0.1")
    checked = []
    for position, value in enumerate(interfaces):
        try:
            checked.append(_ipv4_unicast(value))
        except ValueError as error:
            raise ValueError(f"interfaces[{position}]: {error}") from None
    return tuple(dict.fromkeys(checked))


class CandidateEvent(BaseModel):
    """A candidate appeared or changed ("seen"), or said goodbye ("gone")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["seen", "gone"]
    announcement: Announcement


def service_info(announcement: Announcement) -> AsyncServiceInfo:
    """The mDNS records for an announcement: instance name and host name come from the node id."""
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{announcement.node_id}.{SERVICE_TYPE}",
        port=announcement.api_port,
        properties=announcement.to_txt(),
        server=f"exo-{announcement.node_id}.local.",
        addresses=[socket.inet_aton(announcement.address)],
    )


class MdnsDiscovery:
    """Announce one node and collect the candidates of its cluster, on the given addresses only.

    ``candidates()`` is a snapshot; ``subscribe()`` gives a queue of CandidateEvent; the optional
    ``on_candidate`` coroutine runs (as its own task) for every new or changed candidate."""

    def __init__(self, *, announcement: Announcement, interfaces: list[str],
                 on_candidate: Callable[[Announcement], Awaitable[None]] | None = None,
                 reannounce_interval: float = 60.0, resolve_timeout: float = 2.0) -> None:
        self._interfaces = validate_interfaces(interfaces)
        self._announcement = announcement
        self._on_candidate = on_candidate
        self._reannounce_interval = reannounce_interval
        self._resolve_timeout_ms = int(resolve_timeout * 1000)
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._candidates: dict[str, Announcement] = {}
        self._node_by_instance: dict[str, str] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._queues: list[asyncio.Queue[CandidateEvent]] = []

    @property
    def announcement(self) -> Announcement:
        return self._announcement

    @property
    def zeroconf(self) -> Zeroconf | None:
        """The running Zeroconf instance (for inspection), None when stopped."""
        return self._azc.zeroconf if self._azc else None

    def candidates(self) -> dict[str, Announcement]:
        """Other nodes of this cluster seen so far, by node id (never this node)."""
        return dict(self._candidates)

    def subscribe(self) -> asyncio.Queue[CandidateEvent]:
        queue: asyncio.Queue[CandidateEvent] = asyncio.Queue()
        self._queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[CandidateEvent]) -> None:
        if queue in self._queues:
            self._queues.remove(queue)

    async def start(self) -> None:
        if self._azc is not None:
            raise RuntimeError("MdnsDiscovery.start: already started")
        self._azc = AsyncZeroconf(interfaces=list(self._interfaces), ip_version=IPVersion.V4Only)
        try:
            await self._announce_and_browse()
        except BaseException:
            await self.stop()
            raise

    async def _announce_and_browse(self) -> None:
        assert self._azc is not None
        zc = self._azc.zeroconf
        await zc.async_wait_for_start()
        _receive_only_joined_groups(zc)
        self._info = service_info(self._announcement)
        # The instance name is the node's UUID, unique by construction; skipping the probe
        # phase (~1.7 s) keeps the announcement well inside a bootstrap discovery window.
        await self._azc.async_register_service(self._info, cooperating_responders=True)
        # QM questions only: answers are multicast, so every node process on a shared address
        # (several nodes on 127.0.0.1) hears them; a unicast (QU) answer to 127.0.0.1:5353
        # reaches just one of the processes bound there, often the wrong one.
        self._browser = AsyncServiceBrowser(zc, [SERVICE_TYPE], handlers=[self._on_state_change],
                                            question_type=DNSQuestionType.QM)
        if self._reannounce_interval > 0:
            self._spawn(self._reannounce_forever(), name="mdns-reannounce")

    async def update(self, announcement: Announcement) -> None:
        """Announce new values (e.g. ``formed=True``) right away; identity must not change."""
        if (announcement.node_id, announcement.cluster_id) != (
                self._announcement.node_id, self._announcement.cluster_id):
            raise ValueError("MdnsDiscovery.update: node_id and cluster_id cannot change")
        self._announcement = announcement
        if self._azc is None or self._info is None:
            return
        self._info = service_info(announcement)
        await self._azc.async_update_service(self._info)

    async def stop(self) -> None:
        """Say goodbye, stop browsing and close every socket. Safe to call twice."""
        for task in [*self._tasks, *self._resolving.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._resolving.values(), return_exceptions=True)
        self._tasks.clear()
        self._resolving.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._azc is not None:
            azc, self._azc = self._azc, None
            await azc.async_close()
        self._candidates.clear()
        self._node_by_instance.clear()

    # -- zeroconf callbacks and tasks (all on the event loop) --

    def _on_state_change(self, *, zeroconf: Zeroconf, service_type: str, name: str,
                         state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self._forget(name)
            return
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()
        task = asyncio.get_running_loop().create_task(self._resolve(name), name=f"mdns-resolve:{name}")
        self._resolving[name] = task
        task.add_done_callback(lambda done: self._resolving.pop(name, None)
                               if self._resolving.get(name) is done else None)

    async def _resolve(self, name: str) -> None:
        """Fetch the TXT record behind a browsed name; retried, since a lost packet must not
        hide a node until the browser's next (exponentially rarer) query."""
        for attempt in range(RESOLVE_ATTEMPTS):
            if self._azc is None:
                return
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if await info.async_request(self._azc.zeroconf, self._resolve_timeout_ms,
                                        question_type=DNSQuestionType.QM):
                break
            log.debug("mdns: %s did not answer (attempt %d)", name, attempt + 1)
            await asyncio.sleep(min(2.0 ** attempt, 8.0))
        else:
            log.info("mdns: gave up resolving %s after %d attempts", name, RESOLVE_ATTEMPTS)
            return
        try:
            announcement = Announcement.from_txt(info.properties)
        except AnnouncementError as error:
            log.info("mdns: ignoring %s: %s", name, error)
            return
        self._accept(name, announcement)

    def _accept(self, name: str, announcement: Announcement) -> None:
        if announcement.cluster_id != self._announcement.cluster_id:
            return
        if announcement.node_id == self._announcement.node_id:
            if announcement.address != self._announcement.address:
                log.warning("mdns: another node at %s announces this node's id %s (copied data dir?)",
                            announcement.address, announcement.node_id)
            return
        self._node_by_instance[name] = announcement.node_id
        if self._candidates.get(announcement.node_id) == announcement:
            return
        self._candidates[announcement.node_id] = announcement
        self._emit(CandidateEvent(kind="seen", announcement=announcement))
        if self._on_candidate is not None:
            self._spawn(self._run_callback(announcement), name=f"mdns-on-candidate:{announcement.node_id}")

    def _forget(self, name: str) -> None:
        node_id = self._node_by_instance.pop(name, None)
        announcement = self._candidates.pop(node_id, None) if node_id else None
        if announcement is not None:
            self._emit(CandidateEvent(kind="gone", announcement=announcement))

    def _emit(self, event: CandidateEvent) -> None:
        for queue in self._queues:
            queue.put_nowait(event)

    async def _run_callback(self, announcement: Announcement) -> None:
        assert self._on_candidate is not None
        try:
            await self._on_candidate(announcement)
        except Exception:  # a failing callback must not stop discovery
            log.exception("mdns: on_candidate failed for %s", announcement.node_id)

    async def _reannounce_forever(self) -> None:
        while True:
            await asyncio.sleep(self._reannounce_interval)
            if self._azc is not None and self._info is not None:
                await self._azc.async_update_service(self._info)

    def _spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _receive_only_joined_groups(zc: Zeroconf) -> None:
    """The shared listen socket is bound to 0.0.0.0:5353. On Linux it would also receive mDNS
    from groups that *other* processes joined on other interfaces (IP_MULTICAST_ALL defaults
    to 1) and could answer them; turn that off so it only hears the interfaces we joined."""
    if not sys.platform.startswith("linux"):
        return
    senders = {wrapped.sock for wrapped in zc.engine.senders}
    for wrapped in zc.engine.readers:
        if wrapped.sock not in senders:
            wrapped.sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
