"""A real Prometheus (Debian's ``prometheus``) scrapes a real three-node cluster that serves the
tiny model, configured from grafana/prometheus.yml (targets found through ``/sd``); after some
chat requests, every query of every dashboard returns data.

The test starts its own Prometheus on 127.0.0.1 with a temporary config and data dir, and kills
it at the end; it never touches a system service."""
from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.cluster import Cluster
from harness.serving import apply, wait_nodes_ready, wait_serving
from tests.grafana.dashboards import DASHBOARDS, GRAFANA_DIR, Query, metric_names, queries

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SCRAPE_INTERVAL = "1s"
MODEL = "tiny-metrics"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="no prometheus binary: apt-get install -y prometheus"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_config(*, sd_url: str, token_file: Path) -> dict[str, Any]:
    """grafana/prometheus.yml, pointed at this cluster and scraping every second."""
    config = yaml.safe_load((GRAFANA_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, evaluation_interval=SCRAPE_INTERVAL)
    (job,) = config["scrape_configs"]
    job["authorization"]["credentials_file"] = str(token_file)
    (sd,) = job["http_sd_configs"]
    sd.update(url=sd_url, refresh_interval="1s")
    sd["authorization"]["credentials_file"] = str(token_file)
    return config


class Prometheus:
    def __init__(self, root: Path, *, config: dict[str, Any]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = root / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            document = json.load(response)
        assert document["status"] == "success", document
        return document["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.api("query", query=promql)["result"]

    def active_targets(self) -> list[dict[str, Any]]:
        try:
            return self.api("targets", state="active")["activeTargets"]
        except OSError:
            return []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(config: dict[str, Any]) -> Prometheus:
        started.append(Prometheus(tmp_path / "prometheus", config=config))
        return started[-1]

    yield start
    for server in started:
        server.stop()
        print(f"===== prometheus log =====\n{server.log()}")


def wait_for(condition: Any, *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.25)


def chat(cluster: Cluster, index: int, model: str, *, stream: bool) -> int:
    node = cluster.nodes[index % len(cluster.nodes)]
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell me story number {index}."}],
            "max_tokens": 12, "stream": stream}
    status, _, _ = node.request("POST", "/v1/chat/completions", body=body, timeout=30)
    return status


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_every_dashboard_query_returns_data_from_a_cluster_serving_the_tiny_model(exo_cluster, prometheus,
                                                                                 tmp_path: Path) -> None:
    from exo_ctl.model_builder.build_model import build_model

    model_dir = build_model("tiny")
    cluster = exo_cluster(3)
    token_file = tmp_path / "exo-token"
    token_file.write_text(cluster.secret)
    server = prometheus(prometheus_config(sd_url=f"{cluster.nodes[0].api_url}/sd", token_file=token_file))

    wait_nodes_ready(cluster, 3)
    apply(cluster.nodes[1], MODEL, model_dir)
    # /sd lists every Ready node; Prometheus scrapes them all with the token.
    targets = wait_for(lambda: [t for t in server.active_targets() if t["health"] == "up"] if len(
        [t for t in server.active_targets() if t["health"] == "up"]) == 3 else None,
        timeout=30, what=f"3 healthy targets\n{server.log()}")
    assert sorted(t["labels"]["node"] for t in targets) == sorted(n.name for n in cluster.nodes)
    wait_serving(cluster.nodes[0], MODEL, stages=3, timeout=60)

    # Requests spread over several scrapes, so every rate() window sees counters grow.
    for index in range(6):
        assert chat(cluster, index, MODEL, stream=index % 2 == 0) == 200
        if index in (1, 4):
            assert chat(cluster, index, "no-such-model", stream=False) == 404
        time.sleep(0.6)
    time.sleep(2.5)

    all_queries: list[Query] = [q for path in DASHBOARDS for q in queries(path)]
    empty = [q.where() for q in all_queries if not has_finite_value(server.query(q.promql))]
    unexported = sorted({name for q in all_queries for name in metric_names(q.expr)
                         if not server.query(f'count({{__name__="{name}"}})')})
    assert not unexported and not empty, (f"dashboards use metrics no node exports: {unexported}\n"
                                          "dashboard queries without data:\n" + "\n".join(empty))

    # What one scrape costs: printed for the record (pytest -s).
    durations = server.query('scrape_duration_seconds{job="exo"}')
    samples = server.query('scrape_samples_scraped{job="exo"}')
    print("scrape duration (s):", {s["metric"]["node"]: round(float(s["value"][1]), 4) for s in durations})
    print("samples per scrape:", {s["metric"]["node"]: int(float(s["value"][1])) for s in samples})
    assert all(float(s["value"][1]) < 0.5 for s in durations)
