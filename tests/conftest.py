"""No silent skips in CI: with ``CI=true`` a skipped test is reported as a failure with its skip
reason. Tests that need a tool (network namespaces, Chromium, playwright, Prometheus/promtool,
kubectl) skip on a developer's machine without it, but in CI ``.ci/run`` installs them all, so a
skip there means a test that never ran. A skip meant to stay a skip in CI must be listed in
``CI_SKIP_ALLOWLIST`` (node id prefix → why) — it is empty on purpose.

Also the ``exo_cluster`` fixture: ``exo_cluster(3)`` starts real node processes (harness.cluster)
and kills them at teardown.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import DEFAULT_SECRET, Cluster, start_cluster

CI_SKIP_ALLOWLIST: dict[str, str] = {}

# No test reaches a real model hub: huggingface_hub in this process (and in every node process the
# tests start, see harness.cluster.node_environment) talks to a closed loopback port unless a test
# points it at its own loopback hub (tests/fake_hub.py).
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

# Tests send Ctrl-C (SIGINT) to the CLI and node processes they start. A suite launched in the
# background of a non-interactive shell inherits SIGINT ignored, and so would those children:
# restore the default so a child's exec starts with SIGINT delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _allowed(nodeid: str) -> bool:
    return any(nodeid == prefix or nodeid.startswith(prefix + "::") or nodeid.startswith(prefix + "[")
               for prefix in CI_SKIP_ALLOWLIST)


def _skip_reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


def _fail_if_skipped(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not in_ci() or _allowed(report.nodeid):
        return
    report.outcome = "failed"
    report.longrepr = (f"{report.nodeid} was skipped under CI=true ({_skip_reason(report.longrepr)}); "
                       "CI installs every tool the tests need (.ci/run), or list the test in "
                       "CI_SKIP_ALLOWLIST in tests/conftest.py with a reason")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Module-level skips (``pytest.importorskip``, ``allow_module_level=True``) happen here."""
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.fixture
def exo_cluster(tmp_path: Path) -> Iterator[Any]:
    """A factory: ``exo_cluster(3)`` starts a cluster; all of them are killed at teardown."""
    started: list[Cluster] = []

    def factory(n: int, *, secret: str = DEFAULT_SECRET, extra_args: Sequence[str] = (),
                discovery: bool = False) -> Cluster:
        cluster = start_cluster(n, tmp_path / f"cluster{len(started)}", secret=secret, extra_args=extra_args,
                                discovery=discovery)
        started.append(cluster)
        return cluster

    yield factory
    for cluster in started:
        cluster.close()
        print(cluster.logs())
