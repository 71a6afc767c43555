"""A node API app served over HTTPS from a cluster CA (reconciler.tls), and the real kubectl
binary pointed at it through a kubeconfig from exo_ctl.kubeconfig."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestServer

from exo_ctl.kubeconfig import kubeconfig
from reconciler.server import create_app
from reconciler.store.memory import MemoryStore
from reconciler.tls import ClusterCA

TOKEN = "kubectl-test-secret"
KUBECTL = shutil.which("kubectl")


class NodeLikeServer(TestServer):
    async def _make_runner(self, **kwargs):
        kwargs["handler_cancellation"] = False
        return await super()._make_runner(**kwargs)


@dataclass
class KubeResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@dataclass
class Kube:
    """Runs kubectl against the test node; ``store`` is its in-memory replica."""
    store: MemoryStore
    server: str
    kubeconfig: Path
    ca_file: Path
    home: Path

    async def __call__(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
                       check: bool = True) -> KubeResult:
        if KUBECTL is None:
            pytest.fail("kubectl is not installed (CI installs Debian's kubernetes-client package)")
        process = await asyncio.create_subprocess_exec(
            KUBECTL, "--cache-dir", str(self.home / "cache"), *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(self.home), "KUBECONFIG": str(self.kubeconfig),
                 **(env or {})})
        out, err = await asyncio.wait_for(process.communicate(stdin.encode() if stdin else None), 60)
        result = KubeResult(process.returncode or 0, out.decode(), err.decode())
        if check and result.code != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.code}: {result.stderr}")
        return result


def tls_files(directory: Path) -> tuple[Path, ssl.SSLContext]:
    ca = ClusterCA.create()
    cert, key = ca.issue(node="node-a", hosts=["127.0.0.1", "localhost"])
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    (directory / "cert.pem").write_bytes(cert)
    (directory / "key.pem").write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return directory / "ca.pem", context


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[Kube]:
    store = MemoryStore()
    ca_file, context = tls_files(tmp_path)
    app = create_app(store=store, token=TOKEN, node_name="node-a", watch_disconnect_check_s=0.05)
    server = NodeLikeServer(app, host="127.0.0.1")
    await server.start_server(ssl=context)
    url = f"https://127.0.0.1:{server.port}"
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump(kubeconfig(server=url, token=TOKEN, ca_pem=ca_file.read_bytes())))
    try:
        yield Kube(store=store, server=url, kubeconfig=config, ca_file=ca_file, home=tmp_path)
    finally:
        await server.close()
