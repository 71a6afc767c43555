"""An in-process API server (the real aiohttp app over a MemoryStore) on 127.0.0.1, and a runner
for the real ``exoctl`` program against it."""
from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from exo_ctl.api.validation import normalize
from reconciler.server import create_app
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from tests.cli.cli_helpers import COMMAND, TOKEN



@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


class ApiServer:
    """The node API on a free loopback port, its event loop on a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-server-loop", daemon=True)
        self.store = MemoryStore()
        self.url = ""
        self._runner: web.AppRunner | None = None

    def call(self, coroutine: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> None:
        app = create_app(store=self.store, token=TOKEN, node_name="node-a", watch_disconnect_check_s=0.05)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> "ApiServer":
        self.thread.start()
        self.call(self._start())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    # -- writing state the way nodes and controllers do --
    def submit(self, op: str, obj: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace") or "", meta["name"])
        return self.call(self.store.submit(make_command(op, key, body=obj, **kwargs)))["object"]

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.submit("create", normalize(obj, keep_server_fields=True))

    def set_status(self, kind: str, name: str, status: dict[str, Any], *, namespace: str = "") -> dict[str, Any]:
        body = {"kind": kind, "metadata": {"name": name, "namespace": namespace}, "status": status}
        return self.submit("status", body)

    def get(self, kind: str, name: str, *, namespace: str = "") -> dict[str, Any] | None:
        return self.store.get((kind, namespace, name))


@pytest.fixture
def api() -> Iterator[ApiServer]:
    server = ApiServer().start()
    yield server
    server.stop()


@pytest.fixture
def exoctl_env(api: ApiServer, tmp_path: Path) -> dict[str, str]:
    """Environment for the exoctl subprocess: the test server and token, and a config dir of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXOCTL_")}
    env.update(EXOCTL_SERVER=api.url, EXOCTL_TOKEN=TOKEN, XDG_CONFIG_HOME=str(tmp_path / "config"),
               HOME=str(tmp_path))
    return env


@pytest.fixture
def exoctl(exoctl_env: dict[str, str], tmp_path: Path):
    """Run the real exoctl program; every run is checked to print no traceback."""

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 30) -> Result:
        done = subprocess.run([*COMMAND, *args], input=input, capture_output=True, text=True, timeout=timeout,
                              env=env if env is not None else exoctl_env, cwd=tmp_path)
        assert "Traceback" not in done.stderr, done.stderr
        return Result(done.returncode, done.stdout, done.stderr)

    return run
