"""Network namespaces joined by a Linux bridge: separate "hosts" on one machine, for tests.

Layout, all inside namespaces made here (nothing is added to the machine's own namespace, so
test traffic can never leave the machine):

    <prefix>-hub      bridge br0 (no address, multicast snooping off) with ports p0..pN-1
    <prefix>-n<i>     lo up; eth0 (veth peer of p<i>) = 10.213.0.<i+1>/24

Names include the pid and a per-process counter, so parallel runs never collide. ``close()``
(also run on failure) kills every process started here and deletes every namespace, which
destroys the veths and the bridge with them. Needs root and iproute2's ``ip``; tests skip with
the reason when the kernel refuses, and fail instead under ``CI=true`` (tests/conftest.py).

    with open_lab(3) as lab:
        out = lab.run(lab.hosts[0], ["ip", "-br", "addr"])
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

DEFAULT_SUBNET = "10.213.0.0/24"
_counter = itertools.count()


class NetnsUnavailable(Exception):
    """This machine cannot make network namespaces (not root, no ``ip``, or the kernel refuses)."""


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    index: int


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class NetnsLab:
    """``count`` namespaces on one bridge. Use as a context manager (or ``open_lab``)."""

    def __init__(self, count: int, *, subnet: str = DEFAULT_SUBNET) -> None:
        network = ipaddress.IPv4Network(subnet)
        if not network.is_private:
            raise ValueError(f"subnet: {subnet} is not a private range")
        if count < 1 or count > network.num_addresses - 2:
            raise ValueError(f"count: {count} hosts do not fit in {subnet}")
        self.prefix = f"exo{os.getpid()}x{next(_counter)}"
        self.hub = f"{self.prefix}-hub"
        addresses = itertools.islice(network.hosts(), count)
        self.hosts = [Host(namespace=f"{self.prefix}-n{i}", address=str(address), index=i)
                      for i, address in enumerate(addresses)]
        self._prefixlen = network.prefixlen
        self._created: list[str] = []
        self._processes: list[subprocess.Popen[str]] = []

    def __enter__(self) -> NetnsLab:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _create(self) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("iproute2 'ip' is not installed (apt-get install -y iproute2)")
        try:
            _ip("netns", "add", self.hub)
        except RuntimeError as error:
            raise NetnsUnavailable(f"the kernel refused a network namespace: {error}") from None
        self._created.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for host in self.hosts:
            _ip("netns", "add", host.namespace)
            self._created.append(host.namespace)
            port = f"p{host.index}"
            _ip("-n", self.hub, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", host.namespace)
            _ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/{self._prefixlen}", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "multicast", "on", "up")

    def add_decoy(self, host: Host, address: str) -> str:
        """A second interface ``decoy`` in ``host`` with ``address`` (CIDR form) and no IPv6: a
        veth whose other end sits unbridged in the hub, to check nothing is ever sent on it."""
        hub_end = f"d{host.index}"
        _ip("-n", self.hub, "link", "add", hub_end, "type", "veth",
            "peer", "name", "decoy", "netns", host.namespace)
        for namespace, device in ((self.hub, hub_end), (host.namespace, "decoy")):
            _ip("-n", namespace, "link", "set", device, "addrgenmode", "none")
        _ip("-n", host.namespace, "addr", "add", address, "dev", "decoy")
        _ip("-n", self.hub, "link", "set", hub_end, "up")
        _ip("-n", host.namespace, "link", "set", "decoy", "multicast", "on", "up")
        return "decoy"

    def tx_packets(self, host: Host, device: str) -> int:
        """Packets ``device`` in ``host`` has transmitted so far."""
        out = self.run(host, ["cat", f"/sys/class/net/{device}/statistics/tx_packets"])
        return int(out.stdout)

    def command(self, host: Host, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", host.namespace, *argv]

    def run(self, host: Host, argv: Sequence[str], *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host`` and wait; raises on a non-zero exit."""
        return subprocess.run(self.command(host, argv), capture_output=True, text=True,
                              timeout=timeout, check=True)

    def spawn(self, host: Host, argv: Sequence[str], **popen: object) -> subprocess.Popen[str]:
        """Start ``argv`` inside ``host`` in its own session; ``close()`` kills it."""
        process: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            self.command(host, argv), text=True, start_new_session=True, **popen)
        self._processes.append(process)
        return process

    def close(self) -> None:
        """Kill what was started here, then delete every namespace made here. Idempotent."""
        for process in self._processes:
            _end_session(process)
        self._processes.clear()
        for namespace in reversed(self._created):
            _kill_namespace_pids(namespace)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
        self._created.clear()

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that still exist (for the cleanup test)."""
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
        names = {line.split()[0] for line in listing.stdout.splitlines() if line.strip()}
        return sorted(n for n in names if n.startswith(f"{self.prefix}-"))


def _end_session(process: subprocess.Popen[str]) -> None:
    """SIGTERM the session this lab started for ``process``, then SIGKILL after 3 s."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=3)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _kill_namespace_pids(namespace: str) -> None:
    """Processes still inside a namespace this lab made (only ever ones it started)."""
    listing = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=10)
    for pid in (int(p) for p in listing.stdout.split() if p.isdigit()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def open_lab(count: int, *, subnet: str = DEFAULT_SUBNET) -> Iterator[NetnsLab]:
    """A NetnsLab for a test; skips the test with the reason if namespaces are unavailable (a
    failure under ``CI=true``, see tests/conftest.py)."""
    lab = NetnsLab(count, subnet=subnet)
    try:
        lab.__enter__()
    except NetnsUnavailable as error:
        pytest.skip(f"network namespaces unavailable: {error}")
    try:
        yield lab
    finally:
        lab.close()


def spawn_exo_nodes(lab: NetnsLab, *, data_root: Path, secret: str, extra_args: Sequence[str] = (),
                    ) -> tuple[list[subprocess.Popen[str]], dict[str, Path]]:
    """One ``exo`` node per host of ``lab``, on the host's address, no peers (they find each
    other over mDNS); returns the processes and their log files by node name. Beyond loopback the
    API serves HTTPS (the CA is ``data_root/<name>/cluster-ca.pem``), and the secret counts only
    over TLS there."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "EXO_CLUSTER_SECRET"}
    processes, logs = [], {}
    for host in lab.hosts:
        name = f"host{host.index}"
        logs[name] = data_root / f"{name}.log"
        with open(logs[name], "wb") as log:
            processes.append(lab.spawn(host, [
                sys.executable, "-m", "reconciler.main", "--name", name, "--data-dir", str(data_root / name),
                "--host", host.address, "--cluster-secret", secret, *extra_args],
                stdout=log, stderr=log, cwd=root, env=env))
    return processes, logs
