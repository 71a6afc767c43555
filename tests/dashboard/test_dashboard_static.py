"""The dashboard's routes on the node app: static files, path safety, and the throughput stream."""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from reconciler.metrics import NodeMetrics
from reconciler.server import create_app
from reconciler.server.dashboard import (DASHBOARD_DIR, THROUGHPUT_PATH, add_dashboard_routes, static_files,
                                         throughput)
from reconciler.store.memory import MemoryStore

TOKEN = "dashboard-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def metrics() -> NodeMetrics:
    return NodeMetrics(node="node-a")


@pytest.fixture
async def client(metrics: NodeMetrics) -> AsyncIterator[TestClient]:
    app = create_app(store=MemoryStore(), token=TOKEN, node_name="node-a")
    add_dashboard_routes(app, metrics=metrics, throughput_interval_s=0.05)
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        yield test_client


async def test_root_serves_the_dashboard_page_without_a_token(client: TestClient) -> None:
    response = await client.get("/")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    page = await response.text()
    assert '<script type="module" src="/dashboard/app.js">' in page
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(("name", "content_type"), [
    ("app.js", "text/javascript; charset=utf-8"),
    ("api.js", "text/javascript; charset=utf-8"),
    ("style.css", "text/css; charset=utf-8"),
    ("favicon.svg", "image/svg+xml"),
])
async def test_dashboard_files_are_served_with_their_content_type(client: TestClient, name: str,
                                                                  content_type: str) -> None:
    response = await client.get(f"/dashboard/{name}")
    assert response.status == 200
    assert response.headers["Content-Type"] == content_type
    assert await response.read() == (DASHBOARD_DIR / name).read_bytes()


async def test_every_module_the_page_imports_is_served(client: TestClient) -> None:
    """A module missing from the server would leave a blank page in the browser."""
    imports = {(path.name, target) for path in DASHBOARD_DIR.glob("*.js")
               for target in re.findall(r"from '\./([^']+)'", path.read_text())}
    assert ("app.js", "api.js") in imports
    for importer, target in sorted(imports):
        assert (await client.get(f"/dashboard/{target}")).status == 200, f"{importer} imports {target}"


@pytest.mark.parametrize("path", [
    "/dashboard/",
    "/dashboard",
    "/dashboard/missing.js",
    "/dashboard/..%2Fdashboard.py",
    "/dashboard/%2e%2e%2fapp.py",
    "/dashboard/../app.py",
    "/dashboard/..%2F..%2F..%2Fpyproject.toml",
    "/dashboard/%2Fetc%2Fpasswd",
    "/dashboard/.hidden.js",
])
async def test_paths_outside_the_dashboard_files_are_refused(client: TestClient, path: str) -> None:
    response = await client.get(path, allow_redirects=False)
    assert response.status == 404
    body = await response.text()
    assert "import" not in body and "root:" not in body


def test_only_plain_files_of_known_types_are_servable(tmp_path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("export {}")
    (tmp_path / "notes.txt").write_text("secret")
    (tmp_path / ".env.js").write_text("x")
    (tmp_path / "sub.js").mkdir()
    (tmp_path / "link.js").symlink_to(tmp_path / "app.js")
    assert sorted(static_files(tmp_path)) == ["app.js", "index.html"]


def test_a_dashboard_folder_without_index_html_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "app.js").write_text("export {}")
    with pytest.raises(FileNotFoundError, match="index.html"):
        static_files(tmp_path)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
async def test_the_throughput_stream_needs_the_token(client: TestClient, headers: dict[str, str]) -> None:
    response = await client.get(THROUGHPUT_PATH, headers=headers)
    assert response.status == 401
    assert (await response.json())["kind"] == "Status"


async def _events(response, count: int) -> list[dict]:
    events: list[dict] = []
    while len(events) < count:
        line = (await asyncio.wait_for(response.content.readline(), 5)).decode()
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: "):]))
    return events


async def test_the_throughput_stream_reports_tokens_per_second_from_the_counters(
        client: TestClient, metrics: NodeMetrics) -> None:
    metrics.generated_tokens.labels("default/llama").inc(7)
    response = await client.get(THROUGHPUT_PATH, headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    [first] = await _events(response, 1)
    assert first == {"node": "node-a", "tokensPerSecond": 0.0, "models": {"default/llama": 0.0},
                     "generatedTokens": 7}
    metrics.generated_tokens.labels("default/llama").inc(40)
    samples = await _events(response, 3)
    assert any(sample["tokensPerSecond"] > 0 for sample in samples)
    assert samples[-1]["generatedTokens"] == 47
    response.close()


def test_throughput_is_the_counter_increase_over_the_elapsed_time() -> None:
    rates = throughput(before={"a": 10.0}, after={"a": 30.0, "b": 5.0}, seconds=2.0)
    assert rates == {"a": 10.0, "b": 2.5}


def test_throughput_never_goes_negative_and_survives_a_zero_interval() -> None:
    assert throughput(before={"a": 10.0}, after={"a": 4.0}, seconds=1.0) == {"a": 0.0}
    assert throughput(before={}, after={"a": 4.0}, seconds=0.0) == {"a": 0.0}


async def test_without_metrics_the_page_is_served_and_the_stream_is_absent() -> None:
    app = create_app(store=MemoryStore(), token=TOKEN, node_name="node-a")
    add_dashboard_routes(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        assert (await test_client.get("/")).status == 200
        assert (await test_client.get(THROUGHPUT_PATH, headers=AUTH)).status == 404


async def test_the_throughput_stream_ends_when_the_node_shuts_down(metrics: NodeMetrics) -> None:
    app = create_app(store=MemoryStore(), token=TOKEN, node_name="node-a")
    add_dashboard_routes(app, metrics=metrics, throughput_interval_s=30.0)
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        response = await test_client.get(THROUGHPUT_PATH, headers=AUTH)
        await _events(response, 1)
        await asyncio.wait_for(test_client.server.runner.shutdown(), 5)
        rest = await asyncio.wait_for(response.content.read(), 5)
        assert b"data:" not in rest
