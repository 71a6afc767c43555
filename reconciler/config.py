"""A node's configuration: data dir, identity, cluster secret, ports, and the data-dir lock.

Everything a node keeps across restarts lives in its data dir: ``node-id`` (a UUID, the node's
identity; never its address), ``cluster-secret`` (mode 0600), the Raft journal and full dump,
``raft-members.json``, and ``models/``, the model cache (unless ``--model-cache`` puts it elsewhere).
"""
from __future__ import annotations

import fcntl
import os
import re
import secrets
import socket
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import platformdirs

from reconciler.cluster_keys import ClusterKeys, cluster_keys

DEFAULT_API_PORT = 52415
RAFT_PORT_OFFSET = 1
DATA_PORT_OFFSET = 2
SECRET_ENV = "EXO_CLUSTER_SECRET"
SECRET_FILE = "cluster-secret"
NODE_ID_FILE = "node-id"
LOCK_FILE = "lock"
MODEL_CACHE_DIR = "models"


class ConfigError(Exception):
    """Bad configuration; the message is one line meant for the user."""


def sanitize_name(raw: str) -> str:
    """A DNS-1123 label from a hostname: lowercase, [a-z0-9-], at most 63 chars."""
    name = re.sub(r"[^a-z0-9-]+", "-", raw.split(".")[0].lower()).strip("-")[:63].strip("-")
    return name or "node"


def validate_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name):
        raise ConfigError(f"--name: {name!r} is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)")
    return name


def default_data_dir(name: str) -> Path:
    return Path(platformdirs.user_data_dir("exo")) / name


def parse_peers(raw: str | None) -> tuple[str, ...]:
    """``host:port,host:port`` → ("host:port", ...); a clear error names the bad entry."""
    if not raw:
        return ()
    peers = []
    for entry in (p.strip() for p in raw.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--peers: {entry!r} is not HOST:API_PORT")
        peers.append(f"{host}:{int(port)}")
    return tuple(peers)


def advertised_host(host: str) -> str:
    """The address other nodes reach this one at: the bind host, unless it is a wildcard."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


@dataclass(frozen=True)
class NodeConfig:
    name: str
    data_dir: Path
    host: str
    advertise_host: str
    api_port: int
    raft_port: int
    peers: tuple[str, ...]
    secret: str = field(repr=False)
    node_id: str
    secret_generated: bool = False
    https: bool = False  # --tls: the API port serves HTTPS (reconciler.tls.serves_https)

    @cached_property
    def keys(self) -> ClusterKeys:
        """The keys derived from the secret (Raft password, data-path key, member proof)."""
        return cluster_keys(self.secret)

    @property
    def raft_address(self) -> str:
        return f"{self.advertise_host}:{self.raft_port}"

    @property
    def api_url(self) -> str:
        return f"{'https' if self.https else 'http'}://{self.advertise_host}:{self.api_port}"

    @property
    def data_port(self) -> int:
        return self.api_port + DATA_PORT_OFFSET


def load_node_id(data_dir: Path) -> str:
    """The node's UUID, created on first start and kept across restarts."""
    path = data_dir / NODE_ID_FILE
    if path.exists():
        value = path.read_text().strip()
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise ConfigError(f"{path}: not a UUID ({value[:40]!r}); fix or remove it") from None
    node_id = str(uuid.uuid4())
    path.write_text(node_id + "\n")
    return node_id


def resolve_secret(*, flag: str | None, env: str | None, data_dir: Path,
                   first_node: bool) -> tuple[str, bool]:
    """The cluster secret and whether it was generated now. Order: flag, environment, the one
    stored in the data dir, else a new one (first node of a new cluster only)."""
    path = data_dir / SECRET_FILE
    stored = path.read_text().strip() if path.exists() else None
    secret = flag or env or stored
    generated = False
    if not secret:
        if not first_node:
            raise ConfigError(f"no cluster secret: pass --cluster-secret or set {SECRET_ENV} "
                              "(use the secret printed by the cluster's first node)")
        secret, generated = secrets.token_urlsafe(32), True
    if secret != stored:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.chmod(path, 0o600)
    return secret, generated


def prepare_model_cache(flag: Path | None, data_dir: Path) -> Path:
    """The model cache directory (``--model-cache``, else <data-dir>/models), created if missing."""
    directory = Path(flag).expanduser() if flag is not None else data_dir / MODEL_CACHE_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--model-cache: cannot create {directory}: {exc.strerror or exc}") from None
    return directory


class DataDirLock:
    """An exclusive flock on ``<data-dir>/lock``: one process per data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"data dir {self.path.parent} is in use by another exo process "
                              "(pass a different --data-dir)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def build_config(*, name: str | None, data_dir: str | None, host: str, advertise_host: str | None,
                 api_port: int, raft_port: int | None, peers: str | None,
                 secret_flag: str | None, lock: bool = True) -> tuple[NodeConfig, DataDirLock]:
    """Resolve flags into a NodeConfig, taking the data-dir lock before touching anything in it."""
    node_name = validate_name(name) if name else sanitize_name(socket.gethostname())
    directory = Path(data_dir).expanduser() if data_dir else default_data_dir(node_name)
    for flag, port in (("--api-port", api_port), ("--raft-port", raft_port)):
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"{flag}: {port} is not a TCP port")
    raft = raft_port if raft_port is not None else api_port + RAFT_PORT_OFFSET
    if raft == api_port:
        raise ConfigError("--raft-port: must differ from --api-port")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--data-dir: cannot create {directory}: {exc.strerror}") from None
    data_lock = DataDirLock(directory)
    if lock:
        data_lock.acquire()
    try:
        peer_list = parse_peers(peers)
        secret, generated = resolve_secret(flag=secret_flag, env=os.environ.get(SECRET_ENV),
                                           data_dir=directory, first_node=not peer_list)
        config = NodeConfig(
            name=node_name, data_dir=directory, host=host,
            advertise_host=advertise_host or advertised_host(host), api_port=api_port,
            raft_port=raft, peers=peer_list, secret=secret, node_id=load_node_id(directory),
            secret_generated=generated,
        )
    except BaseException:
        data_lock.release()
        raise
    return config, data_lock
