"""Reading membership and Node state from real nodes, shared by the membership e2e tests."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

NODES = "/apis/exo.dev/v1alpha1/nodes"
MEMBERS = "/internal/v1/members"
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"

T = TypeVar("T")


def unique_secret() -> str:
    """A secret (hence a cluster id) no parallel test run shares, so runs never cross-join."""
    return f"membership-test-{uuid.uuid4().hex}"


def eventually(probe: Callable[[], T | None], *, timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not true within {timeout:g}s (last: {last!r})")


def ready_by_node(nodes: list[dict[str, Any]]) -> dict[str, str]:
    """Node name -> status of its Ready condition ("Unknown" before the leader judged it)."""
    result = {}
    for node in nodes:
        conditions = (node.get("status") or {}).get("conditions", [])
        ready = [c["status"] for c in conditions if c.get("type") == "Ready"]
        result[node["metadata"]["name"]] = ready[0] if ready else "Unknown"
    return result


def log_times(log_path: Path, marker: str) -> list[float]:
    """Timestamps (seconds since the epoch) of the log lines of a node that contain ``marker``."""
    times = []
    for line in log_path.read_text(errors="replace").splitlines():
        if marker in line and line[:4].isdigit():
            times.append(datetime.strptime(line[:23], LOG_TIME).timestamp())
    return times
