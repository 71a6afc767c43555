"""The Grafana files, checked without Prometheus: the dashboards name only metrics a node exports,
use the provisioned datasource, and the shipped Prometheus config is valid."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from reconciler.metrics import NodeMetrics
from reconciler.observability import StateSources, install_node_metrics
from reconciler.server import create_app
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore

from tests.grafana.dashboards import DASHBOARDS, GRAFANA_DIR, load, metric_names, panels, queries
from tests.server.server_helpers import deployment, node, shard

class RaftLikeStore(MemoryStore):
    """Reports the Raft fields of ``RaftStore.cluster_status()`` (term, indexes, members)."""

    def cluster_status(self) -> dict:
        return {**super().cluster_status(), "isLeader": True, "term": 2, "commitIndex": 9, "lastApplied": 9,
                "members": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


async def exported_metric_names() -> set[str]:
    """Every series name a node can export (a populated store, so the state collector yields all)."""
    store = RaftLikeStore()
    for obj in (node("node-a"), deployment("llama"), shard("llama-0-0")):
        namespace = "default" if obj["kind"] == "ModelDeployment" else ""
        await store.submit(make_command("create", (obj["kind"], namespace, obj["metadata"]["name"]), body=obj))
    metrics = NodeMetrics(node="node-a")
    app = create_app(store=store, token="t", node_name="node-a")
    install_node_metrics(metrics, app=app, sources=StateSources(
        store=store, node_name="node-a", lease_ages=lambda: {"node-a": 0.1}, queue_depth=lambda: 0))
    return {family.name + suffix for family in metrics.registry.collect() for suffix in SUFFIXES[family.type]}


def test_there_are_three_dashboards_with_unique_uids() -> None:
    uids = [load(path)["uid"] for path in DASHBOARDS]
    assert len(DASHBOARDS) == 3 and len(set(uids)) == 3, uids


async def test_every_metric_a_dashboard_queries_is_exported_by_a_node() -> None:
    exported = await exported_metric_names()
    used = {name: query.where() for path in DASHBOARDS for query in queries(path) for name in metric_names(query.expr)}
    assert len(used) >= 30
    missing = {name: where for name, where in used.items() if name not in exported}
    assert not missing, f"dashboards query metrics nobody exports: {missing}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_queries_the_provisioned_datasource_and_fits_the_grid(path: Path) -> None:
    provisioned = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/exo.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    board = load(path)
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    for panel in panels(board):
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, f"{path.name}: {panel['title']} overflows"
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{path.name}: {panel['title']} has no query"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"]["uid"] == uid, f"{path.name}: {panel['title']}"
    assert list(queries(path))  # every variable in every query is defined (substitution raises otherwise)


def test_the_dashboard_provider_and_the_prometheus_config_are_valid(tmp_path: Path) -> None:
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/exo.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool (Debian package prometheus)")
    config = tmp_path / "prometheus.yml"
    shutil.copy(GRAFANA_DIR / "prometheus.yml", config)
    (tmp_path / "exo-token").write_text("secret")
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
