"""Real ``exo`` node processes on 127.0.0.1, for the tests and the benchmarks.

    cluster = start_cluster(3, tmp_path)          # node 0 bootstraps, the others join one by one
    cluster.nodes[0].api_url, .kill(), .stop(), .restart(), .log_path

In tests, the ``exo_cluster`` fixture (tests/conftest.py) adds the cleanup: every process is
killed at teardown and its log printed (pytest shows it when the test fails).
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from exo_ctl.http import ClientConfigError, HttpClient

HOST = "127.0.0.1"
PORTS_PER_NODE = 4  # api, raft (api+1), data (api+2), one spare
DEFAULT_SECRET = "test-cluster-secret"
READY_TIMEOUT = 30.0
# Node processes keep their compiled bytecode here even where the environment says
# PYTHONDONTWRITEBYTECODE: a run starts hundreds of them, and each would otherwise compile
# mlx_lm, aiohttp, pydantic and our own packages from source again (~1 s of CPU per start).
PYCACHE = Path(tempfile.gettempdir()) / "exo-harness-pycache"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out for outgoing connections (32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def time_wait_ports(ports: range | set[int]) -> set[int]:
    """Which of ``ports`` have local TCP connections in TIME-WAIT now (Linux: /proc/net/tcp*;
    not psutil, whose inet_ntop pysyncobj's import replaces with a Windows-only stub)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            port = int(fields[1].rpartition(":")[2], 16)
            if fields[3] == "06" and port in ports:  # 06: TCP_TIME_WAIT
                found.add(port)
    return found


def free_port_block(taken: set[int], size: int = PORTS_PER_NODE) -> int:
    """A base port with ``size`` consecutive free ports (none in ``taken``), below the ephemeral
    range: a node binds its data port seconds after this check, and an outgoing connection of
    another test must not take it in between."""
    ceiling = max(_ephemeral_floor(), 21000)
    for _ in range(500):
        base = random.randrange(20000, ceiling - size)
        block = range(base, base + size)
        if not taken.intersection(block) and all(_port_free(p) for p in block):
            taken.update(block)
            return base
    raise RuntimeError("no free block of ports on 127.0.0.1")


def http_json(method: str, url: str, *, token: str | None = None, body: Any = None,
              content_type: str = "application/json", timeout: float = 5.0,
              ca: Path | None = None) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON or text) without raising on HTTP errors; ``ca``: the
    cluster CA that an https:// server's certificate must chain to."""
    parts = urlsplit(url)
    client = HttpClient(f"{parts.scheme}://{parts.netloc}", token=token, ca=str(ca) if ca is not None else None,
                        timeout=timeout, user_agent="exo-harness")
    with client.open(method, unquote(parts.path), query=parts.query, body=body, content_type=content_type,
                     headers={"Accept": "*/*"}, check=False) as resp:
        status, headers, raw = resp.status, resp.headers, resp.read()
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode(errors="replace")


def node_environment(inherited: dict[str, str], own: dict[str, str]) -> dict[str, str]:
    """A test node's environment: the inherited one, then its own; and no Hugging Face hub unless
    the node is pointed at one (``HF_ENDPOINT``, on loopback), so no test reaches huggingface.co."""
    env = inherited | {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"} | own
    if "HF_ENDPOINT" in own and "HF_HUB_OFFLINE" not in own:
        del env["HF_HUB_OFFLINE"]
    return env


@dataclass
class ExoProcess:
    index: int
    name: str
    data_dir: Path
    api_port: int
    secret: str | None
    peers: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    discovery: bool = False
    env: tuple[tuple[str, str], ...] = ()  # environment of this node's process, over the test's own
    log_path: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"{self.name}.log"

    @property
    def tls(self) -> bool:
        """Started with ``--tls on``: the API serves HTTPS from the cluster CA (``ca_path``)."""
        args = list(self.extra_args)
        return "--tls" in args[:-1] and args[args.index("--tls") + 1] == "on"

    @property
    def ca_path(self) -> Path:
        return self.data_dir / "cluster-ca.pem"

    @property
    def api_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.api_port}"

    @property
    def api_address(self) -> str:
        return f"{HOST}:{self.api_port}"

    @property
    def raft_address(self) -> str:
        return f"{HOST}:{self.api_port + 1}"

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "reconciler.main", "--name", self.name,
                "--data-dir", str(self.data_dir), "--host", HOST, "--api-port", str(self.api_port),
                "--log-level", "INFO",
                # Tests compare with mlx-lm in the files' dtype: pinned unless extra_args say otherwise.
                "--compute-dtype", "files", "--blas", "bundled"]
        if self.peers:
            args += ["--peers", ",".join(self.peers)]
        if self.discovery:
            args += ["--interface", HOST]
        else:
            args.append("--no-discovery")  # tests join explicitly unless they test discovery
        if self.secret is not None:
            args += ["--cluster-secret", self.secret]
        return args + list(self.extra_args)

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        env = {k: v for k, v in os.environ.items() if k not in ("EXO_CLUSTER_SECRET", "PYTHONDONTWRITEBYTECODE")}
        env = node_environment({"PYTHONPYCACHEPREFIX": str(PYCACHE)} | env, dict(self.env))
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=Path(__file__).resolve().parents[1])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown."""
        if self.running:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; returns the exit code (SIGKILL after ``timeout``)."""
        if not self.running:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout}s\n{self.log_text()}") from None

    def restart(self, *, wait: bool = True) -> None:
        self.kill()
        self.start()
        if wait:
            self.wait_ready()

    def ready(self) -> bool:
        try:
            status, _, _ = http_json("GET", self.api_url + "/readyz", timeout=1.0,
                                     ca=self.ca_path if self.tls else None)
        except (OSError, ClientConfigError):  # ClientConfigError: the node has not written its CA file yet
            return False
        return status == 200

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}\n{self.log_text()}")
            if self.ready():
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready after {timeout}s\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return f"===== {self.name} log ({self.log_path}) =====\n{self.log_path.read_text(errors='replace')}"
        except FileNotFoundError:
            return f"===== {self.name}: no log ====="

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
        kwargs.setdefault("token", self.secret)
        kwargs.setdefault("ca", self.ca_path if self.tls else None)
        return http_json(method, self.api_url + path, **kwargs)


@dataclass
class Cluster:
    nodes: list[ExoProcess]
    root: Path
    secret: str
    taken_ports: set[int] = field(default_factory=set)

    def add_node(self, *, secret: str | None = None, peers: Sequence[str] | None = None,
                 extra_args: Sequence[str] = (), start: bool = True, wait: bool = True,
                 discovery: bool = False, env: dict[str, str] | None = None) -> ExoProcess:
        """A new node joining via node0 (``--peers``), or with ``discovery=True`` one that finds
        the cluster over mDNS on 127.0.0.1 (no ``--peers`` unless given)."""
        index = len(self.nodes)
        if peers is None:
            peers = () if discovery else [n.api_address for n in self.nodes[:1]]
        node = ExoProcess(index=index, name=f"node{index}", data_dir=self.root / f"node{index}",
                          api_port=free_port_block(self.taken_ports),
                          secret=self.secret if secret is None else secret,
                          peers=tuple(peers), extra_args=tuple(extra_args), discovery=discovery,
                          env=tuple((env or {}).items()))
        self.nodes.append(node)
        if start:
            node.start()
            if wait:
                node.wait_ready()
        return node

    def leader(self, timeout: float = 10.0) -> ExoProcess:
        """The node every running member agrees is the leader."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in (n for n in self.nodes if n.running):
                try:
                    status, _, doc = node.request("GET", "/internal/v1/members", timeout=1.0)
                except OSError:
                    continue
                if status == 200 and doc.get("leader") and doc.get("quorum"):
                    match = [n for n in self.nodes if n.raft_address == doc["leader"] and n.running]
                    if match:
                        return match[0]
            time.sleep(0.05)
        raise AssertionError("no leader\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(node.log_text() for node in self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


def start_cluster(n: int, tmp_path: Path, *, secret: str = DEFAULT_SECRET,
                  extra_args: Sequence[str] = (), discovery: bool = False) -> Cluster:
    """Start ``n`` nodes: node0 bootstraps the cluster, then each node joins via node0 and is
    ready (its store has quorum) before the next one starts. With ``discovery=True`` all ``n``
    start at once with no ``--peers`` and find each other over mDNS on 127.0.0.1 (use a secret
    of your own, so parallel runs never meet)."""
    cluster = Cluster(nodes=[], root=tmp_path, secret=secret)
    try:
        if discovery:
            nodes = [cluster.add_node(extra_args=extra_args, discovery=True, wait=False) for _ in range(n)]
            for node in nodes:
                node.wait_ready()
            return cluster
        for _ in range(n):
            cluster.add_node(extra_args=extra_args)
    except BaseException:
        print(cluster.logs())
        cluster.close()
        raise
    return cluster


@contextmanager
def running_cluster(n: int, root: Path, **kwargs: Any) -> Iterator[Cluster]:
    """``start_cluster(n, root, **kwargs)`` for a ``with`` block (a module's shared cluster): at the
    end every node is killed and the logs printed (pytest shows them when a test failed)."""
    cluster = start_cluster(n, root, **kwargs)
    try:
        yield cluster
    finally:
        cluster.close()
        print(cluster.logs())


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, cluster: "Cluster | None" = None,
               interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); past ``timeout`` fail
    saying ``what`` was awaited, with the tail of ``cluster``'s logs when given."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            logs = f"\n{cluster.logs()[-20000:]}" if cluster is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{logs}")
        time.sleep(interval)
    return value
